"""kahan_sum on the fused path: the Triton kernels (interpreted on CPU under TRITON_INTERPRET=1)
step bf16/fp16 parameters with their compensation buffers as the per-tensor reference does, in
groups that mix compensated and fp32 parameters, through the functional form, across
checkpoints (with and without buffers) and GradScaler's skipped steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _fused_cases import DEVICE, requires_kernels
from largebatch import LAMB, LARS, Adan
from largebatch.fused import fused_adan, fused_lamb, fused_lars
from optimizers._cases import ADAN_CASE, IGNORE_NO_ADAPTATION_WARNING, LAMB_CASE, LARS_CASE
from optimizers._kahan_cases import assert_kahan_close, kahan_runs, run_steps

pytestmark = [requires_kernels, pytest.mark.filterwarnings(IGNORE_NO_ADAPTATION_WARNING)]


@pytest.mark.parametrize("case", [LAMB_CASE, LARS_CASE, ADAN_CASE], ids=lambda c: c.name)
@settings(max_examples=8)
@given(data=st.data())
def test_fused_equals_per_tensor(case, data):
    hyper, params, grad_steps = data.draw(kahan_runs(case))
    reference = run_steps(case, hyper, params, grad_steps, foreach=False)
    assert_kahan_close(run_steps(case, hyper, params, grad_steps, device=DEVICE, fused=True), reference, params)


def _functional_lists(name, params, generator):
    """The functional form's tensor lists for `params` (zero states, one gradient)."""
    grads = [torch.randn(p.shape, generator=generator).to(DEVICE, p.dtype) for p in params]
    zeros = {"lamb": 2, "lars": 1, "adan": 4}[name]
    states = [[torch.zeros_like(p) for p in params] for _ in range(zeros)]
    return [params, grads, *states, [torch.zeros((), device=DEVICE) for _ in params]]


FUNCTIONAL = {
    "lamb": (fused_lamb, dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                              grad_averaging=True, trust_clip=None, adapt=True, grad_clip_coef=None)),
    "lars": (fused_lars, dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-4, trust_coefficient=1e-3,
                              eps=1e-8, trust_clip=False, adapt=True, lr_in_momentum=False)),
    "adan": (fused_adan, dict(beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.02, no_prox=False,
                              grad_clip_coef=None)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_fused_step_skips_on_found_inf_and_compensates_otherwise(name):
    """Called directly, with buffers for the bf16 tensors and None for the fp32 one: a step with
    found_inf set changes nothing (buffers included); the next one fills the bf16 buffers."""
    step, hyper = FUNCTIONAL[name]
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(40, generator=generator).to(DEVICE, dtype) for dtype in (torch.bfloat16, torch.float32)]
    comps = [torch.zeros_like(params[0]), None]
    lists = _functional_lists(name, params, generator)
    before = [p.clone() for p in params]
    args = dict(lr=1e-3, maximize=False, grad_scale=None, **hyper)
    step(*lists, comps, found_inf=torch.ones((), device=DEVICE), **args)
    assert all(map(torch.equal, params, before)) and not bool(comps[0].any())
    step(*lists, comps, found_inf=torch.zeros((), device=DEVICE), **args)
    assert bool(comps[0].ne(0).any())
    assert not torch.equal(params[1], before[1])


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan])
def test_fused_checkpoints_round_trip_and_old_ones_start_at_zero(cls):
    """A fused optimizer's buffers survive state_dict bit for bit, and the resumed optimizer steps
    as the original goes on; a state without buffers loads into a fused optimizer, whose plans
    then take the new (zero) buffers."""
    torch.manual_seed(0)
    params = [torch.randn(5, 7).to(DEVICE, torch.bfloat16).requires_grad_(), torch.randn(3, device=DEVICE).requires_grad_()]
    optimizer = cls(params, lr=1e-3, fused=True)

    def steps(opt, tensors, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(2):
            for p in tensors:
                p.grad = torch.randn(p.shape, generator=generator).to(DEVICE, p.dtype)
            opt.step()

    steps(optimizer, params, 1)
    saved = optimizer.state_dict()
    assert "kahan_comp" in saved["state"][0] and "kahan_comp" not in saved["state"][1]
    copies = [p.detach().clone().requires_grad_() for p in params]
    resumed = cls(copies, lr=1e-3, fused=True)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.state[copies[0]]["kahan_comp"], optimizer.state[params[0]]["kahan_comp"])
    steps(optimizer, params, 2)
    steps(resumed, copies, 2)
    assert all(map(torch.equal, params, copies))
    assert torch.equal(resumed.state[copies[0]]["kahan_comp"], optimizer.state[params[0]]["kahan_comp"])

    old = copy.deepcopy(optimizer.state_dict())  # its state's dicts are the live ones
    del old["state"][0]["kahan_comp"]
    for group in old["param_groups"]:
        del group["kahan_sum"]
    resumed.load_state_dict(old)
    optimizer.state[params[0]]["kahan_comp"].zero_()
    steps(optimizer, params, 3)
    steps(resumed, copies, 3)
    assert all(map(torch.equal, params, copies))
    assert torch.equal(resumed.state[copies[0]]["kahan_comp"], optimizer.state[params[0]]["kahan_comp"])


def test_a_group_switched_off_steps_without_its_buffers():
    """kahan_sum set to False on a live group: the next fused step takes the plain kernels (a
    plan of its own) and leaves the buffers as they were, as a per-tensor step does."""
    rng = np.random.default_rng(0)
    params = [torch.from_numpy(rng.standard_normal(40)).to(DEVICE, torch.bfloat16).requires_grad_()]
    fused = LAMB(params, lr=1e-3, fused=True)
    params[0].grad = torch.ones_like(params[0])
    fused.step()
    kept = fused.state[params[0]]["kahan_comp"].clone()
    copies = [params[0].detach().cpu().clone().requires_grad_()]
    per_tensor = LAMB(copies, lr=1e-3)
    per_tensor.load_state_dict(copy.deepcopy(fused.state_dict()))
    for optimizer in (fused, per_tensor):
        optimizer.param_groups[0]["kahan_sum"] = False
    params[0].grad, copies[0].grad = -torch.ones_like(params[0]), -torch.ones_like(copies[0])
    fused.step()
    per_tensor.step()
    assert torch.equal(fused.state[params[0]]["kahan_comp"], kept)
    assert torch.equal(per_tensor.state[copies[0]]["kahan_comp"], kept.cpu())
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(params[0].detach().cpu(), copies[0].detach(), rtol=4 * eps, atol=0)


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan])
def test_fused_gradient_release_with_kahan_is_bit_identical(cls):
    from largebatch.memory import prepare_for_gradient_release

    def train(release):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(DEVICE, torch.bfloat16)
        optimizer = cls(model.parameters(), lr=1e-3, fused=True)
        handle = prepare_for_gradient_release(model, optimizer) if release else None
        for step in range(3):
            model(torch.full((4, 6), 0.5 + step, device=DEVICE, dtype=torch.bfloat16)).square().sum().backward()
            if handle is None:
                optimizer.step()
                optimizer.zero_grad()
        return list(model.parameters()), optimizer

    (plain, plain_opt), (released, released_opt) = train(False), train(True)
    for p, q in zip(plain, released):
        assert torch.equal(p, q)
        assert torch.equal(plain_opt.state[p]["kahan_comp"], released_opt.state[q]["kahan_comp"])
