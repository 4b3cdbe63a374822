"""Every invalid hyper-parameter raises a ValueError that names it; bad tensors raise clearly."""

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch

from largebatch import LAMB, LARS, AdaGradNorm, Adan
from largebatch.optimizers._base import check_non_negative, check_positive

INVALID = [
    (LAMB, {"lr": -1e-3}, "lr"),
    (LAMB, {"lr": float("nan")}, "lr"),
    (LAMB, {"lr": torch.tensor([0.1, 0.2])}, "lr"),
    (LAMB, {"betas": (1.0, 0.999)}, r"betas\[0\]"),
    (LAMB, {"betas": (0.9, -0.1)}, r"betas\[1\]"),
    (LAMB, {"betas": (0.9,)}, "betas"),
    (LAMB, {"eps": -1e-6}, "eps"),
    (LAMB, {"weight_decay": -0.1}, "weight_decay"),
    (LAMB, {"trust_clip": 0.0}, "trust_clip"),
    (LAMB, {"max_grad_norm": -1.0}, "max_grad_norm"),
    (LAMB, {"always_adapt": 1}, "always_adapt"),
    (LAMB, {"layer_adaptation": "yes"}, "layer_adaptation"),
    (LAMB, {"maximize": None}, "maximize"),
    (LARS, {"lr": -0.1}, "lr"),
    (LARS, {"momentum": -0.9}, "momentum"),
    (LARS, {"dampening": -0.1}, "dampening"),
    (LARS, {"weight_decay": -1e-4}, "weight_decay"),
    (LARS, {"trust_coefficient": 0.0}, "trust_coefficient"),
    (LARS, {"trust_coefficient": -0.001}, "trust_coefficient"),
    (LARS, {"eps": -1.0}, "eps"),
    (LARS, {"nesterov": True, "momentum": 0.0}, "nesterov"),
    (LARS, {"nesterov": True, "dampening": 0.5}, "nesterov"),
    (LARS, {"trust_clip": 1.0}, "trust_clip"),
    (Adan, {"lr": -1.0}, "lr"),
    (Adan, {"betas": (0.98, 0.92)}, "betas"),
    (Adan, {"betas": (0.98, 1.5, 0.99)}, r"betas\[1\]"),
    (Adan, {"eps": -1e-8}, "eps"),
    (Adan, {"weight_decay": -0.02}, "weight_decay"),
    (Adan, {"max_grad_norm": 0.0}, "max_grad_norm"),
    (Adan, {"no_prox": "no"}, "no_prox"),
    (AdaGradNorm, {"lr": -0.1}, "lr"),
    (AdaGradNorm, {"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
    (AdaGradNorm, {"eps": -1e-10}, "eps"),
    (AdaGradNorm, {"weight_decay": -0.1}, "weight_decay"),
    (AdaGradNorm, {"foreach": "auto"}, "foreach"),
    # lr of the wrong type, non-finite, a bool, complex, or beyond float32
    (LAMB, {"lr": None}, "lr"),
    (LAMB, {"lr": "1e-3"}, "lr"),
    (LAMB, {"lr": 1e-3 + 0j}, "lr"),
    (LAMB, {"lr": float("inf")}, "lr"),
    (LAMB, {"lr": True}, "lr"),
    (LAMB, {"lr": Fraction(1, 1000)}, "lr"),
    (LAMB, {"betas": (Fraction(9, 10), 0.999)}, r"betas\[0\]"),
    (LAMB, {"lr": 1e39}, "lr"),
    (LAMB, {"lr": torch.tensor(1e-3, dtype=torch.complex64)}, "lr"),
    (LAMB, {"lr": torch.tensor(True)}, "lr"),
    (LAMB, {"lr": torch.tensor(float("inf"))}, "lr"),
    (LAMB, {"lr": torch.tensor([[1e39]], dtype=torch.float64)}, "lr"),
    (LARS, {"lr": None}, "lr"),
    (Adan, {"lr": 2j}, "lr"),
    (AdaGradNorm, {"lr": "0.1"}, "lr"),
    # non-finite, too large, and bool hyper-parameters
    (LAMB, {"weight_decay": float("inf")}, "weight_decay"),
    (LAMB, {"weight_decay": float("nan")}, "weight_decay"),
    (LAMB, {"weight_decay": True}, "weight_decay"),
    (LAMB, {"eps": float("inf")}, "eps"),
    (LAMB, {"eps": True}, "eps"),
    (LAMB, {"eps": 1e39}, "eps"),
    (LAMB, {"trust_clip": float("inf")}, "trust_clip"),
    (LAMB, {"max_grad_norm": float("inf")}, "max_grad_norm"),
    (LARS, {"momentum": float("inf")}, "momentum"),
    (LARS, {"momentum": float("nan")}, "momentum"),
    (LARS, {"dampening": float("inf")}, "dampening"),
    (LARS, {"weight_decay": float("nan")}, "weight_decay"),
    (LARS, {"weight_decay": True}, "weight_decay"),
    (LARS, {"eps": float("inf")}, "eps"),
    (LARS, {"trust_coefficient": float("inf")}, "trust_coefficient"),
    (LARS, {"trust_coefficient": 1e39}, "trust_coefficient"),
    (LARS, {"trust_coefficient": None}, "trust_coefficient"),
    (Adan, {"eps": float("nan")}, "eps"),
    (Adan, {"weight_decay": float("inf")}, "weight_decay"),
    (Adan, {"max_grad_norm": float("nan")}, "max_grad_norm"),
    (AdaGradNorm, {"initial_accumulator_value": float("inf")}, "initial_accumulator_value"),
    (AdaGradNorm, {"initial_accumulator_value": 1e39}, "initial_accumulator_value"),
    (AdaGradNorm, {"eps": float("inf")}, "eps"),
    (AdaGradNorm, {"weight_decay": float("nan")}, "weight_decay"),
]


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_shard_group_must_be_a_process_group(cls):
    with pytest.raises(ValueError, match="shard_group"):
        cls([{"params": [torch.zeros(2, requires_grad=True)], "shard_group": "world"}])


@pytest.mark.parametrize(
    "cls, kwargs, name", INVALID, ids=[f"{c.__name__}-{'-'.join(k)}-{i}" for i, (c, k, _) in enumerate(INVALID)]
)
def test_invalid_hyper_parameter_names_itself(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_invalid_per_group_override_is_caught_too(cls):
    opt = cls([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bad_lr", [None, "0.1", 1j, True, torch.tensor(0.1j)], ids=repr)
@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_a_rejected_group_is_never_kept(cls, bad_lr):
    """Whatever the bad value (once a TypeError), the group is not kept and the next step works."""
    p = torch.ones(2, requires_grad=True)
    opt = cls([p])
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": bad_lr})
    assert len(opt.param_groups) == 1
    p.grad = torch.ones(2)
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.ones(2))


@pytest.mark.parametrize("error", [TypeError, KeyError, RuntimeError, KeyboardInterrupt])
def test_a_group_rejected_by_any_exception_is_not_kept(monkeypatch, error):
    opt = LAMB([torch.zeros(2, requires_grad=True)])

    def rejects(group):
        raise error("rejected")

    monkeypatch.setattr(opt, "_validate_group", rejects)
    with pytest.raises(error):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_numpy_numbers_are_accepted(cls):
    p = torch.ones(2, requires_grad=True)
    opt = cls([p], lr=np.float32(0.1), weight_decay=np.int64(0), eps=np.float64(1e-6))
    p.grad = torch.ones(2)
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.ones(2))


def test_check_non_negative_refuses_bools():
    for value in (True, False):
        with pytest.raises(ValueError, match="eps"):
            check_non_negative("eps", value)


def test_check_positive_admits_none_only_when_allowed():
    with pytest.raises(ValueError, match="trust_coefficient"):
        check_positive("trust_coefficient", None)
    check_positive("trust_clip", None, allow_none=True)
    with pytest.raises(ValueError, match="trust_clip"):
        check_positive("trust_clip", True, allow_none=True)


@pytest.mark.parametrize("cls", [LARS, AdaGradNorm], ids=lambda c: c.__name__)
def test_max_grad_norm_is_refused_where_it_is_not_applied(cls):
    """LARS and AdaGrad-Norm do not clip: a max_grad_norm group key would silently do nothing."""
    with pytest.raises(ValueError, match="max_grad_norm"):
        cls([{"params": [torch.zeros(2, requires_grad=True)], "max_grad_norm": 1.0}])
    opt = cls([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "max_grad_norm": 1.0})
    assert len(opt.param_groups) == 1
    cls([{"params": [torch.zeros(2, requires_grad=True)], "max_grad_norm": None}])  # None: no clipping


@pytest.mark.parametrize("cls", [LAMB, Adan], ids=lambda c: c.__name__)
def test_bad_gradients_are_named_before_the_clipping_norm_reads_them(cls):
    p = torch.zeros(3, requires_grad=True)
    opt = cls([p], max_grad_norm=1.0)
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,))
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        opt.step()
    c = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    opt = cls([c], max_grad_norm=1.0)
    c.grad = torch.ones_like(c)
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support complex parameters"):
        opt.step()


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan], ids=lambda c: c.__name__)
@pytest.mark.parametrize("clip", [False, True], ids=["plain", "max_grad_norm"])
def test_fused_steps_name_a_sparse_gradient_or_a_complex_parameter_as_the_others_do(cls, clip):
    """A fused group leaves these checks to its step plan, and names them only when the plan
    refuses: after a good step (a plan that is current), and on the first step. Nothing changes."""
    kwargs = {"max_grad_norm": 1.0} if clip and cls is not LARS else {}
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p], fused=True, **kwargs)
    p.grad = torch.ones(3)
    opt.step()  # a current plan
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,))
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        opt.step()
    p.data = torch.zeros(3, dtype=torch.complex64)  # .data bypasses the constructor's fused dtype check
    p.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support complex parameters"):
        opt.step()
    assert torch.equal(opt.state_dict()["state"][0]["step"], before[1]["state"][0]["step"])
    fresh = torch.nn.Parameter(torch.ones(3))
    opt = cls([fresh], fused=True, **kwargs)
    fresh.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,))
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        opt.step()
    assert opt.state_dict()["state"] == {}  # the refused first step made no state


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_sparse_gradient_raises(cls):
    p = torch.zeros(3, requires_grad=True)
    opt = cls([p])
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_complex_parameter_raises(cls):
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    opt = cls([p])
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_foreach_with_differentiable_raises(cls):
    p = torch.zeros(3, requires_grad=True)
    opt = cls([p], foreach=True, differentiable=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="differentiable"):
        opt.step()


def test_adagrad_norm_has_no_fused_path():
    with pytest.raises(RuntimeError, match="no fused implementation"):
        AdaGradNorm([torch.zeros(2, requires_grad=True)], fused=True)


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan], ids=lambda c: c.__name__)
def test_fused_and_foreach_together_raise(cls):
    with pytest.raises(RuntimeError, match="cannot both"):
        cls([torch.zeros(2, requires_grad=True)], fused=True, foreach=True)
