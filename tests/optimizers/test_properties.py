"""Properties the issue names: zero norms, trust_clip, lr = 0, maximize, LAMB ≡ Adam, state_dict resume."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _cases import CASE_IDS, CASES, IGNORE_NO_ADAPTATION_WARNING, make_grads, make_param, run_torch, shape_specs
from largebatch import LAMB, LARS, AdaGradNorm, Adan

pytestmark = pytest.mark.filterwarnings(IGNORE_NO_ADAPTATION_WARNING)

ALL = [LAMB, LARS, Adan, AdaGradNorm]
IMPLS = pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])


@IMPLS
def test_lamb_zero_param_norm_uses_ratio_one(foreach):
    """‖x‖ = 0 → r = 1: the first step is exactly −lr·u with u = g/(|g| + eps) (+ λ·0)."""
    g = torch.tensor([3.0, -4.0, 0.5], dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = LAMB([x], lr=0.1, weight_decay=0.1, always_adapt=True, eps=1e-6, foreach=foreach)
    x.grad = g.clone()
    opt.step()
    torch.testing.assert_close(x.detach(), -0.1 * g / (g.abs() + 1e-6), rtol=1e-12, atol=0)


@IMPLS
def test_lars_zero_grad_norm_uses_local_rate_one(foreach):
    """‖g‖ = 0 → local = 1: only weight decay moves the weights, at the full lr."""
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w = w0.clone().requires_grad_()
    opt = LARS([w], lr=0.5, momentum=0.0, weight_decay=0.1, foreach=foreach)
    w.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * 0.1 * w0, rtol=1e-12, atol=0)


@IMPLS
@settings(max_examples=15)
@given(clip=st.floats(0.05, 3.0), scale=st.floats(0.1, 100.0), seed=st.integers(0, 1000))
def test_lamb_trust_clip_bounds_the_ratio(foreach, clip, scale, seed):
    """The realised ratio ‖Δx‖/(lr‖u‖) is min(‖x‖/‖u‖, trust_clip)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = scale * torch.randn(20, dtype=torch.float64, generator=gen)
    g = torch.randn(20, dtype=torch.float64, generator=gen)
    lr, wd, eps = 0.01, 0.01, 1e-6
    x = x0.clone().requires_grad_()
    opt = LAMB([x], lr=lr, weight_decay=wd, eps=eps, trust_clip=clip, foreach=foreach)
    x.grad = g
    opt.step()
    u = g / (g.abs() + eps) + wd * x0  # the first bias-corrected Adam step plus decay
    realised = (x0 - x.detach()).norm() / (lr * u.norm())
    assert realised <= clip * (1 + 1e-9)
    torch.testing.assert_close(realised, torch.clamp(x0.norm() / u.norm(), max=clip), rtol=1e-9, atol=0)


@IMPLS
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=10)
@given(data=st.data())
def test_zero_lr_leaves_params_unchanged(case, foreach, data):
    hyper = {**data.draw(case.hyper, label="hyper"), "lr": 0.0}
    specs = data.draw(st.lists(shape_specs, min_size=1, max_size=4), label="shapes")
    rng = np.random.default_rng(data.draw(st.integers(0, 1000), label="seed"))
    params = [make_param(kind, shape, rng, torch.float32) for kind, shape in specs]
    after = run_torch(case, hyper, params, make_grads(params, 3, rng), foreach=foreach)
    for before, now in zip(params, after):
        assert torch.equal(before, now)


@IMPLS
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_maximize_equals_minimizing_the_negated_loss(cls, foreach):
    torch.manual_seed(0)
    target = torch.randn(6, 3)
    start = [torch.randn(6, 3), torch.randn(3)]
    runs = []
    for maximize in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        opt = cls(params, lr=0.05, maximize=maximize, foreach=foreach)
        for _ in range(5):
            opt.zero_grad()
            loss = ((params[0] - target) ** 2).sum() + params[1].abs().sum()
            (-loss if maximize else loss).backward()
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@IMPLS
def test_lamb_without_decay_or_adaptation_is_adam(foreach):
    torch.manual_seed(0)
    start = [torch.randn(5, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    lamb = LAMB(ours, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, foreach=foreach)
    adam = torch.optim.Adam(theirs, lr=0.01, betas=(0.8, 0.99), eps=1e-6, foreach=foreach)
    for _ in range(10):
        grads = [torch.randn_like(p) for p in start]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        lamb.step()
        adam.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@IMPLS
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=5)
@given(data=st.data())
def test_state_dict_resume_is_bit_identical(case, foreach, data):
    """Save mid-run, restore into a fresh optimizer on copied params: the rest of the run is identical."""
    hyper = data.draw(case.hyper, label="hyper")
    hyper["lr"] = hyper["lr"] or 0.01
    rng = np.random.default_rng(data.draw(st.integers(0, 1000), label="seed"))
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    grads = [[torch.from_numpy(g).float() for g in step] for step in make_grads(params, 6, rng)]
    opt = case.cls(params, foreach=foreach, **case.to_kwargs(hyper))

    def run(optimizer, tensors, steps):
        for step in steps:
            for p, g in zip(tensors, step):
                p.grad = g.clone()
            optimizer.step()

    run(opt, params, grads[:3])
    saved_params = [p.detach().clone().requires_grad_() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, grads[3:])

    resumed = case.cls(saved_params, foreach=foreach, **case.to_kwargs({**hyper, "lr": 123.0}))
    resumed.load_state_dict(saved_state)
    assert resumed.param_groups[0]["lr"] == hyper["lr"]  # hyper-parameters come from the checkpoint
    run(resumed, saved_params, grads[3:])
    for a, b in zip(params, saved_params):
        assert torch.equal(a, b)
    for key, value in opt.state[params[0]].items():
        assert torch.equal(value, resumed.state[saved_params[0]][key]), key


def test_adagrad_norm_accumulator_keeps_fp32_through_bf16_state_dict():
    p = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    opt = AdaGradNorm([p], lr=0.1)
    p.grad = torch.full_like(p, 1 / 3)
    opt.step()
    exact = opt.accumulator().clone()
    assert exact.dtype == torch.float32
    other = AdaGradNorm([p.detach().clone().requires_grad_()], lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert other.accumulator().dtype == torch.float32
    assert torch.equal(other.accumulator(), exact)


def test_adagrad_norm_one_accumulator_per_group():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    opt = AdaGradNorm([{"params": [a]}, {"params": [b], "initial_accumulator_value": 1.0}], lr=1.0)
    a.grad = torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([0.0, 0.0, 2.0])
    opt.step()
    assert opt.accumulator(0).item() == pytest.approx(25.0)
    assert opt.accumulator(1).item() == pytest.approx(5.0)
    torch.testing.assert_close(a.detach(), -torch.tensor([3.0, 4.0]) / 5.0)
    torch.testing.assert_close(b.detach(), -torch.tensor([0.0, 0.0, 2.0]) / 5.0**0.5)
