"""AdaGrad-Norm's one accumulator per group: what a non-finite gradient does (documented), and
GradScaler's usual protocol, which skips such steps and leaves b² untouched."""

from __future__ import annotations

import math

import pytest
import torch

from largebatch import AdaGradNorm


def group_of_two(**kw):
    params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    return AdaGradNorm(params, lr=0.1, **kw), params


def step(opt, params, first_grad):
    params[0].grad, params[1].grad = first_grad, torch.ones(2)
    opt.step()


def test_the_docstring_says_what_non_finite_gradients_do_and_how_to_use_grad_scaler():
    doc = " ".join(AdaGradNorm.__doc__.split())
    assert "NaN gradient anywhere in the group makes b² NaN" in doc
    assert "inf gradient makes b² inf" in doc and "frozen" in doc
    assert "GradScaler" in doc and "not supported" in doc


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_one_nan_gradient_poisons_the_whole_group_for_good(foreach):
    opt, params = group_of_two(foreach=foreach)
    step(opt, params, torch.tensor([math.nan, 1.0, 1.0]))
    step(opt, params, torch.ones(3))
    assert math.isnan(opt.accumulator().item())
    assert all(torch.isnan(p).all() for p in params)  # the other tensor too


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_one_inf_gradient_freezes_the_group_for_good(foreach):
    opt, params = group_of_two(foreach=foreach)
    step(opt, params, torch.tensor([math.inf, 1.0, 1.0]))
    step(opt, params, torch.ones(3))
    assert opt.accumulator().item() == math.inf
    assert torch.isnan(params[0][0])  # inf / inf
    assert torch.equal(params[0][1:].detach(), torch.ones(2))  # the rest never moved
    assert torch.equal(params[1].detach(), torch.ones(2))


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_grad_scaler_skips_non_finite_steps_and_leaves_the_accumulator_untouched(foreach):
    opt, params = group_of_two(foreach=foreach)
    reference, reference_params = group_of_two(foreach=foreach)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for first_grad in [torch.ones(3), torch.tensor([math.inf, 1.0, 1.0]), torch.tensor([math.nan, 1.0, 1.0]), torch.ones(3)]:
        scaled = scaler.scale(sum((p * torch.ones_like(p)).sum() for p in params))  # registers the scale
        scaled.backward()
        params[0].grad, params[1].grad = first_grad * scaler.get_scale(), torch.ones(2) * scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if torch.isfinite(first_grad).all():
            step(reference, reference_params, first_grad)  # the run without the skipped steps
    assert opt.accumulator().item() == reference.accumulator().item() == 2 * (3 + 2)
    for p, expected in zip(params, reference_params):
        assert torch.equal(p.detach(), expected.detach())
