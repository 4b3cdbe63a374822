"""Every invalid hyper-parameter raises a ValueError that names it; bad tensors raise clearly."""

import pytest
import torch

from largebatch import LAMB, LARS, AdaGradNorm, Adan

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
