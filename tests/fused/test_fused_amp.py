"""GradScaler's protocol: grad_scale unscales in-kernel, found_inf skips the whole step (params,
states and step counters untouched), with no host synchronisation needed — both through the
functional entry points and through the optimizer classes with torch.amp.GradScaler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _fused_cases import DEVICE, requires_kernels, step_counters
from largebatch import LAMB, LARS, Adan
from largebatch.fused import fused_adan, fused_lamb, fused_lars

pytestmark = requires_kernels

SIZES = [(), (0,), (5,), (37,), (4, 9)]


def _lamb(params, grads, states, steps, **amp):
    fused_lamb(params, grads, states[0], states[1], steps, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6,
               weight_decay=0.01, bias_correction=True, grad_averaging=True, trust_clip=None, adapt=True,
               maximize=False, grad_clip_coef=None, **amp)  # fmt: skip


def _lars(params, grads, states, steps, **amp):
    fused_lars(params, grads, states[0], steps, lr=0.5, momentum=0.9, dampening=0.0, nesterov=False,
               weight_decay=1e-4, trust_coefficient=0.01, eps=1e-8, trust_clip=False, adapt=True,
               lr_in_momentum=False, maximize=False, **amp)  # fmt: skip


def _adan(params, grads, states, steps, **amp):
    fused_adan(params, grads, *states, steps, lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8,
               weight_decay=0.02, no_prox=False, maximize=False, grad_clip_coef=None, **amp)  # fmt: skip


STEPS = pytest.mark.parametrize("step", [_lamb, _lars, _adan], ids=["lamb", "lars", "adan"])


def _setup(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator).to(DEVICE) for s in SIZES]
    grads = [torch.randn(s, generator=generator).to(DEVICE) for s in SIZES]
    states = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    return params, grads, states, step_counters(params)


def _snapshot(params, states, steps):
    return [t.clone() for t in params + [s for state in states for s in state] + steps]


@STEPS
def test_found_inf_changes_nothing_and_the_step_is_not_counted(step):
    params, grads, states, steps = _setup()
    step(params, grads, states, steps, grad_scale=None, found_inf=None)  # non-zero states to protect
    before = _snapshot(params, states, steps)
    grads[3][7] = float("inf")
    step(params, grads, states, steps, grad_scale=torch.tensor(1024.0, device=DEVICE),
         found_inf=torch.tensor(1.0, device=DEVICE))  # fmt: skip
    after = _snapshot(params, states, steps)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(float(s) == 1.0 for s in steps)


@STEPS
def test_grad_scale_unscales_in_kernel_as_pre_unscaled_gradients_would(step):
    scale = 2.0**12
    scaled, unscaled = _setup(), _setup()
    scaled_grads = [g * scale for g in scaled[1]]
    step(scaled[0], scaled_grads, scaled[2], scaled[3], grad_scale=torch.tensor(scale, device=DEVICE),
         found_inf=torch.tensor(0.0, device=DEVICE))  # fmt: skip
    step(*unscaled, grad_scale=None, found_inf=None)
    assert all(torch.equal(a, b) for a, b in zip(scaled[0], unscaled[0]))
    assert all(float(s) == 1.0 for s in scaled[3])
    assert all(torch.equal(g, u * scale) for g, u in zip(scaled_grads, unscaled[1])), "gradients were modified"


OPTIMIZERS = pytest.mark.parametrize(
    "make",
    [
        lambda params, fused: LAMB(params, lr=0.01, weight_decay=0.01, max_grad_norm=1.0, fused=fused),
        lambda params, fused: LARS(params, lr=0.5, weight_decay=1e-4, fused=fused),
        lambda params, fused: Adan(params, lr=0.01, weight_decay=0.02, max_grad_norm=1.0, fused=fused),
    ],
    ids=["LAMB", "LARS", "Adan"],
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DEVICE)


def _scaled_step(model, opt, scaler, x, y, poison: bool = False) -> None:
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    if poison:
        next(model.parameters()).grad.view(-1)[0] = float("nan")
    scaler.step(opt)
    scaler.update()


@OPTIMIZERS
def test_grad_scaler_skips_the_poisoned_step_and_otherwise_matches_the_unfused_optimizer(make):
    torch.manual_seed(1)
    batches = [(torch.randn(8, 5, device=DEVICE), torch.randn(8, 3, device=DEVICE)) for _ in range(3)]
    runs = []
    for fused in (True, False):
        model = _model()
        opt = make(model.parameters(), fused)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
        _scaled_step(model, opt, scaler, *batches[0])
        before = [p.detach().clone() for p in model.parameters()]
        state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
        _scaled_step(model, opt, scaler, *batches[1], poison=True)
        assert scaler.get_scale() == 2.0**9, "the scaler saw the NaN"
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        for p, saved in zip(model.parameters(), state_before):
            assert all(torch.equal(saved[k], v) for k, v in opt.state[p].items()), "state changed on a skipped step"
            assert float(opt.state[p]["step"]) == 1.0
        _scaled_step(model, opt, scaler, *batches[2])
        runs.append([p.detach().clone() for p in model.parameters()])
    for fused_param, reference_param in zip(*runs):
        torch.testing.assert_close(fused_param, reference_param, rtol=1e-5, atol=1e-6)
