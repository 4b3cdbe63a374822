"""The functional forms refuse tensor lists of unequal length instead of zipping to the shortest."""

from __future__ import annotations

import pytest
import torch

from largebatch.optimizers.functional import adagrad_norm, adan, lamb, lars

LAMB_HYPER = dict(
    lr=0.1, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01, bias_correction=True,
    grad_averaging=True, trust_clip=None, adapt=True, maximize=False,
)
LARS_HYPER = dict(
    lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, trust_coefficient=0.001,
    eps=1e-8, trust_clip=False, adapt=True, lr_in_momentum=False, maximize=False,
)
ADAN_HYPER = dict(lr=0.1, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.0, no_prox=False, maximize=False)
ADAGRAD_NORM_HYPER = dict(lr=0.1, eps=1e-10, weight_decay=0.0, maximize=False)

# name -> (number of tensor lists, the call given those lists in signature order)
FORMS = {
    "lamb": (5, lambda lists, **kw: lamb(*lists, **LAMB_HYPER, **kw)),
    "lars": (4, lambda lists, **kw: lars(*lists, **LARS_HYPER, **kw)),
    "adan": (7, lambda lists, **kw: adan(*lists, **ADAN_HYPER, **kw)),
    "adagrad_norm": (
        3,
        lambda lists, **kw: adagrad_norm(lists[0], lists[1], torch.zeros(()), lists[2], **ADAGRAD_NORM_HYPER, **kw),
    ),
}
CASES = [(name, short) for name, (count, _) in FORMS.items() for short in range(count)]


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("name, short", CASES, ids=[f"{name}-list{short}" for name, short in CASES])
def test_unequal_list_lengths_raise(name, short, foreach):
    count, call = FORMS[name]
    # 0-dim tensors fit every role (parameter, gradient, state, step): without the check the
    # call would run over the shortest list.
    lists = [[torch.zeros(()) for _ in range(1 if i == short else 2)] for i in range(count)]
    with pytest.raises(ValueError, match="one entry per parameter"):
        call(lists, foreach=foreach)
