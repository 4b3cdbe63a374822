"""A tensor lr of any one-element shape steps exactly as the same 0-dim lr, and as the float lr,
on every path (per-tensor, foreach, fused), onto 0-dim, 1-D and 2-D parameters alike.

torch.optim accepts lr of shape (), (1,) and (1, 1) (its own suite tests the three); a (1,) or
(1, 1) lr that is not squeezed broadcasts a 0-dim or 1-D parameter's update to a bigger shape, and
the in-place step fails.
"""

from __future__ import annotations

import pytest
import torch

from largebatch import LAMB, LARS, AdaGradNorm, Adan
from largebatch.fused._engine import INTERPRETED

SETUPS = {
    "lamb-adapted": (LAMB, dict(weight_decay=0.01)),
    "lamb-wd0": (LAMB, dict(weight_decay=0.0)),  # Adam's update: the lr multiplies the raw update
    "lars-trust_clip": (LARS, dict(weight_decay=0.01, trust_clip=True)),  # local / lr
    "lars-lr_in_momentum": (LARS, dict(weight_decay=0.01, nesterov=True, lr_in_momentum=True)),
    "adan": (Adan, dict(weight_decay=0.02)),
    "adan-no_prox": (Adan, dict(weight_decay=0.02, no_prox=True)),
    "adagrad_norm": (AdaGradNorm, dict(weight_decay=0.01)),
}
PATHS = {"per_tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
LR_SHAPES = [(), (1,), (1, 1)]
PARAM_SHAPES = [(), (3,), (2, 5)]
LR, STEPS = 0.05, 3


def run(cls, options, lr):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in PARAM_SHAPES]
    opt = cls(params, lr=lr, **options)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()
    return opt, [p.detach() for p in params]


@pytest.mark.filterwarnings("ignore:LAMB adapts no param group")
@pytest.mark.parametrize("lr_shape", LR_SHAPES, ids=lambda s: f"lr{list(s)}")
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_tensor_lr_of_any_one_element_shape_steps_as_the_float(setup, path, lr_shape):
    cls, hyper = SETUPS[setup]
    if path == "fused":
        if not cls._has_fused:
            pytest.skip(f"{cls.__name__} has no fused path")
        if not INTERPRETED and not torch.cuda.is_available():
            pytest.skip("the fused kernels need TRITON_INTERPRET=1 or a CUDA GPU")
    options = {**hyper, **PATHS[path]}
    lr = torch.full(lr_shape, LR)
    opt, got = run(cls, options, lr)
    _, with_0dim = run(cls, options, torch.tensor(LR))
    _, with_float = run(cls, options, LR)
    assert opt.param_groups[0]["lr"] is lr  # the caller's tensor is kept, not replaced by a copy
    for tensor_result, zero_dim_result, float_result in zip(got, with_0dim, with_float):
        assert tensor_result.shape == zero_dim_result.shape
        assert torch.equal(tensor_result, zero_dim_result)
        torch.testing.assert_close(tensor_result, float_result, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ["per_tensor", "foreach"])
@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_filling_a_one_element_lr_in_place_is_seen_by_the_step(cls, path):
    """A scheduler may update a tensor lr in place: the (1, 1) lr is squeezed as a view."""
    lr = torch.full((1, 1), LR)
    params = [torch.randn(3).requires_grad_()]
    opt = cls(params, lr=lr, weight_decay=0.01, **PATHS[path])
    lr.fill_(0.0)
    before = params[0].detach().clone()
    params[0].grad = torch.ones(3)
    opt.step()
    assert torch.equal(params[0].detach(), before)
