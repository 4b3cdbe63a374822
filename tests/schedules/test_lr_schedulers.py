"""Warmup/decay schedulers against plain float64 transcriptions of their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, ExponentialLR, SequentialLR, StepLR

from largebatch.schedules import (
    LinearWarmup,
    PowerScheduler,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    WarmupStableDecay,
)

# The chained form multiplies ratios step after step: a few ulps of drift over a few hundred steps.
REL = 1e-10


# ---------------------------------------------------------------- oracles: the factor at step t


def warmup(t, warmup_steps, start):
    if warmup_steps == 1:
        return 1.0
    return start + (1 - start) * t / (warmup_steps - 1)


def default_start(warmup_steps, start):
    return start if start is not None else 1 / max(warmup_steps, 1)


def shape(name, x):
    return {"linear": 1 - x, "cosine": (1 + math.cos(math.pi * x)) / 2, "sqrt": 1 - math.sqrt(x)}[name]


def polynomial_oracle(t, warmup_steps, total_steps, power, end, start):
    if t < warmup_steps:
        return warmup(t, warmup_steps, default_start(warmup_steps, start))
    x = min(t, total_steps) - warmup_steps
    return end + (1 - end) * (1 - x / (total_steps - warmup_steps)) ** power


def cosine_oracle(t, warmup_steps, total_steps, end, start):
    if t < warmup_steps:
        return warmup(t, warmup_steps, default_start(warmup_steps, start))
    x = (min(t, total_steps) - warmup_steps) / (total_steps - warmup_steps)
    return end + (1 - end) * (1 + math.cos(math.pi * x)) / 2


def wsd_oracle(t, warmup_steps, total_steps, decay_steps, decay_shape, end, start):
    if t < warmup_steps:
        return warmup(t, warmup_steps, default_start(warmup_steps, start))
    if t < total_steps - decay_steps:
        return 1.0
    x = (min(t, total_steps) - (total_steps - decay_steps)) / decay_steps
    return end + (1 - end) * shape(decay_shape, x)


def power_oracle(t, lr_max, a, b, batch, tokens, warmup_steps, total_steps, decay_steps, decay_shape, end, start):
    """The lr itself (not a factor): Shen et al. 2024."""

    def power(step):
        n = step * batch * tokens
        return lr_max if n == 0 else min(lr_max, batch * a * n**b)

    if t < warmup_steps:
        return warmup(t, warmup_steps, default_start(warmup_steps, start)) * power(warmup_steps)
    if total_steps is None or t < total_steps - decay_steps:
        return power(t)
    x = (min(t, total_steps) - (total_steps - decay_steps)) / decay_steps
    return power(total_steps - decay_steps) * (end + (1 - end) * shape(decay_shape, x))


# ---------------------------------------------------------------- helpers


def make_optimizer(lrs=(0.5,)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups)


def run(optimizer, schedulers, steps):
    """The lr of each group used at steps 0 … steps−1."""
    history = []
    for _ in range(steps):
        history.append([float(group["lr"]) for group in optimizer.param_groups])
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    return history


def assert_sequence(history, expected):
    assert len(history) == len(expected)
    for step, (got, want) in enumerate(zip(history, expected)):
        for g, w in zip(got, want):
            assert math.isclose(g, w, rel_tol=REL, abs_tol=1e-15), (step, got, want)


warmups = st.integers(0, 20)
starts = st.one_of(st.none(), st.floats(0.01, 1.0))
ends = st.one_of(st.just(0.0), st.floats(0.0, 1.0))
group_lrs = st.lists(st.floats(1e-4, 10.0), min_size=1, max_size=3)


# ---------------------------------------------------------------- each schedule against its oracle


@settings(max_examples=40, deadline=None)
@given(warmup_steps=warmups, start=starts, lrs=group_lrs)
def test_linear_warmup(warmup_steps, start, lrs):
    optimizer = make_optimizer(lrs)
    history = run(optimizer, [LinearWarmup(optimizer, warmup_steps, start_factor=start)], warmup_steps + 5)
    factors = [
        warmup(t, warmup_steps, default_start(warmup_steps, start)) if t < warmup_steps else 1.0
        for t in range(warmup_steps + 5)
    ]
    assert_sequence(history, [[lr * f for lr in lrs] for f in factors])


@settings(max_examples=40, deadline=None)
@given(
    warmup_steps=warmups,
    decay=st.integers(1, 40),
    power=st.floats(0.1, 4.0),
    end=ends,
    start=starts,
    lrs=group_lrs,
)
def test_warmup_polynomial_decay(warmup_steps, decay, power, end, start, lrs):
    total = warmup_steps + decay
    optimizer = make_optimizer(lrs)
    scheduler = WarmupPolynomialDecay(optimizer, warmup_steps, total, power=power, end_factor=end, start_factor=start)
    history = run(optimizer, [scheduler], total + 4)
    factors = [polynomial_oracle(t, warmup_steps, total, power, end, start) for t in range(total + 4)]
    assert_sequence(history, [[lr * f for lr in lrs] for f in factors])


@settings(max_examples=40, deadline=None)
@given(warmup_steps=warmups, decay=st.integers(1, 40), end=ends, start=starts, lrs=group_lrs)
def test_warmup_cosine_decay(warmup_steps, decay, end, start, lrs):
    total = warmup_steps + decay
    optimizer = make_optimizer(lrs)
    scheduler = WarmupCosineDecay(optimizer, warmup_steps, total, end_factor=end, start_factor=start)
    history = run(optimizer, [scheduler], total + 4)
    factors = [cosine_oracle(t, warmup_steps, total, end, start) for t in range(total + 4)]
    assert_sequence(history, [[lr * f for lr in lrs] for f in factors])


@settings(max_examples=40, deadline=None)
@given(
    warmup_steps=warmups,
    stable=st.integers(0, 20),
    decay=st.integers(1, 20),
    decay_shape=st.sampled_from(["linear", "cosine", "sqrt"]),
    end=ends,
    start=starts,
    lrs=group_lrs,
)
def test_warmup_stable_decay(warmup_steps, stable, decay, decay_shape, end, start, lrs):
    total = warmup_steps + stable + decay
    optimizer = make_optimizer(lrs)
    scheduler = WarmupStableDecay(
        optimizer, warmup_steps, total, decay, decay_shape=decay_shape, end_factor=end, start_factor=start
    )
    history = run(optimizer, [scheduler], total + 4)
    factors = [wsd_oracle(t, warmup_steps, total, decay, decay_shape, end, start) for t in range(total + 4)]
    assert_sequence(history, [[lr * f for lr in lrs] for f in factors])


@settings(max_examples=40, deadline=None)
@given(
    a=st.floats(0.1, 10.0),
    b=st.floats(-1.0, -0.1),
    batch=st.integers(1, 64),
    tokens=st.sampled_from([1, 128]),
    warmup_steps=warmups,
    middle=st.integers(0, 30),
    decay=st.one_of(st.none(), st.integers(1, 20)),
    decay_shape=st.sampled_from(["linear", "cosine", "sqrt"]),
    end=ends,
    start=starts,
    lrs=group_lrs,
)
def test_power_scheduler(a, b, batch, tokens, warmup_steps, middle, decay, decay_shape, end, start, lrs):
    total = None if decay is None else warmup_steps + middle + decay
    optimizer = make_optimizer(lrs)
    scheduler = PowerScheduler(
        optimizer,
        a=a,
        b=b,
        batch_size=batch,
        warmup_steps=warmup_steps,
        total_steps=total,
        decay_steps=decay,
        decay_shape=decay_shape,
        end_factor=end,
        tokens_per_sample=tokens,
        start_factor=start,
    )
    steps = warmup_steps + middle + (decay or 0) + 4
    history = run(optimizer, [scheduler], steps)
    expected = [
        [
            power_oracle(t, lr, a, b, batch, tokens, warmup_steps, total, decay or 0, decay_shape, end, start)
            for lr in lrs
        ]
        for t in range(steps)
    ]
    assert_sequence(history, expected)


def test_power_scheduler_follows_the_power_law_below_the_cap():
    # a = 4, b = −0.51, lr_max = 0.02 (the paper's 3B runs): β a n^b falls below the cap late.
    optimizer = make_optimizer([0.02])
    scheduler = PowerScheduler(optimizer, a=4.0, b=-0.51, batch_size=1024, warmup_steps=10, tokens_per_sample=4096)
    n = 10**6 * 1024 * 4096  # tokens seen before step 10⁶
    lr = 0.02 * scheduler.factor(10**6, 0)
    assert lr == pytest.approx(1024 * 4 * n**-0.51, rel=1e-12)
    assert lr < 0.02


# ---------------------------------------------------------------- properties named in the issue


@settings(max_examples=40, deadline=None)
@given(warmup_steps=st.integers(1, 50), start=starts, total_extra=st.integers(1, 30))
def test_warmup_is_monotone_and_peaks_at_its_last_step(warmup_steps, start, total_extra):
    for make in (
        lambda opt: LinearWarmup(opt, warmup_steps, start_factor=start),
        lambda opt: WarmupCosineDecay(opt, warmup_steps, warmup_steps + total_extra, start_factor=start),
        lambda opt: WarmupPolynomialDecay(opt, warmup_steps, warmup_steps + total_extra, 2.0, start_factor=start),
    ):
        optimizer = make_optimizer([0.8])
        lrs = [row[0] for row in run(optimizer, [make(optimizer)], warmup_steps)]
        assert all(later >= earlier for earlier, later in zip(lrs, lrs[1:]))
        assert lrs[-1] == pytest.approx(0.8, rel=REL)
        # Below the peak before the last step, unless the ramp starts within rounding of it
        # (start = 1 - 1e-16 gives warmup lrs that equal the peak in float64).
        assert all(lr < 0.8 * (1 - 1e-12) for lr in lrs[:-1]) or start > 1 - 1e-9


def test_goyal_warmup_starts_at_the_small_batch_lr():
    # Batch 8192 vs 256: ramp from η = 0.1 to 32η over 5 "epochs".
    optimizer = make_optimizer([3.2])
    history = run(optimizer, [LinearWarmup(optimizer, 5, start_factor=1 / 32)], 6)
    assert [row[0] for row in history] == pytest.approx([0.1, 0.875, 1.65, 2.425, 3.2, 3.2])


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: WarmupPolynomialDecay(opt, 7, 40, power=0.5),
        lambda opt: WarmupPolynomialDecay(opt, 7, 40, power=2.0, end_factor=0.1),
        lambda opt: WarmupCosineDecay(opt, 7, 40),
        lambda opt: WarmupStableDecay(opt, 7, 40, 10, decay_shape="sqrt"),
        lambda opt: PowerScheduler(opt, a=0.05, b=-0.5, batch_size=8, warmup_steps=7, total_steps=40, decay_steps=10),
    ],
    ids=["poly-0.5", "poly-2", "cosine", "wsd", "power"],
)
def test_continuous_at_phase_boundaries(make):
    """No jump at a phase boundary: the change there is no larger than the largest change within a phase."""
    optimizer = make_optimizer([1.0])
    scheduler = make(optimizer)
    lrs = [row[0] for row in run(optimizer, [scheduler], 45)]
    steps = [abs(later - earlier) for earlier, later in zip(lrs, lrs[1:])]
    decay_steps = getattr(scheduler, "decay_steps", None)
    # steps[i] goes from step i to i + 1: warmup → next phase, stable → decay, decay → flat end.
    boundaries = {6, 40} | ({40 - decay_steps - 1} if decay_steps else set())
    interior = max(step for index, step in enumerate(steps) if index not in boundaries)
    for boundary in boundaries:
        assert steps[boundary] <= interior + 1e-12, boundary
    assert lrs[6] == pytest.approx(lrs[7], rel=REL)  # the peak, held across the warmup's end
    assert lrs[40] == lrs[44]  # flat after the end


# ---------------------------------------------------------------- torch integration


FACTORIES = {
    "warmup": lambda opt: LinearWarmup(opt, 6),
    "poly": lambda opt: WarmupPolynomialDecay(opt, 4, 30, power=2.0),
    "cosine": lambda opt: WarmupCosineDecay(opt, 4, 30, end_factor=0.05),
    "wsd": lambda opt: WarmupStableDecay(opt, 4, 30, 8, decay_shape="cosine"),
    "power": lambda opt: PowerScheduler(
        opt, a=0.3, b=-0.6, batch_size=4, warmup_steps=4, total_steps=30, decay_steps=8
    ),
}


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("split", [1, 5, 17, 33])
def test_resume_from_state_dict_gives_the_identical_sequence(name, split):
    make = FACTORIES[name]
    optimizer = make_optimizer([0.3, 0.02])
    schedulers = [make(optimizer), StepLR(optimizer, step_size=5, gamma=0.7)]
    straight = run(optimizer, schedulers, 36)

    optimizer = make_optimizer([0.3, 0.02])
    schedulers = [make(optimizer), StepLR(optimizer, step_size=5, gamma=0.7)]
    first = run(optimizer, schedulers, split)
    saved = (optimizer.state_dict(), [s.state_dict() for s in schedulers])

    resumed_optimizer = make_optimizer([0.3, 0.02])
    resumed = [make(resumed_optimizer), StepLR(resumed_optimizer, step_size=5, gamma=0.7)]
    resumed_optimizer.load_state_dict(saved[0])
    for scheduler, state in zip(resumed, saved[1]):
        scheduler.load_state_dict(state)
    assert first + run(resumed_optimizer, resumed, 36 - split) == straight


@pytest.mark.parametrize("name", FACTORIES)
def test_chains_multiplicatively_with_torch_schedulers(name):
    make = FACTORIES[name]
    reference = make_optimizer([0.3])
    alone = run(reference, [make(reference)], 35)
    optimizer = make_optimizer([0.3])
    chained = ChainedScheduler([make(optimizer), ExponentialLR(optimizer, gamma=0.9)], optimizer=optimizer)
    together = run(optimizer, [chained], 35)
    assert_sequence(together, [[lr * 0.9**t for lr in row] for t, row in enumerate(alone)])


def test_two_of_ours_compose():
    optimizer = make_optimizer([1.0])
    history = run(optimizer, [LinearWarmup(optimizer, 4), WarmupCosineDecay(optimizer, 0, 20)], 22)
    expected = [[(warmup(t, 4, 0.25) if t < 4 else 1.0) * cosine_oracle(t, 0, 20, 0.0, None)] for t in range(22)]
    assert_sequence(history, expected)


@pytest.mark.parametrize("name", FACTORIES)
def test_tensor_lr_is_updated_in_place(name):
    make = FACTORIES[name]
    float_optimizer = make_optimizer([0.3])
    expected = run(float_optimizer, [make(float_optimizer)], 35)
    lr = torch.tensor(0.3, dtype=torch.float64)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, foreach=False)
    scheduler = make(optimizer)
    assert optimizer.param_groups[0]["lr"] is lr
    history = run(optimizer, [scheduler], 35)
    assert optimizer.param_groups[0]["lr"] is lr
    assert_sequence(history, expected)


def test_sequential_lr_uses_the_closed_form():
    optimizer = make_optimizer([0.5])
    first = ConstantLR(optimizer, factor=0.1, total_iters=5)
    second = WarmupCosineDecay(optimizer, 3, 20)
    history = run(optimizer, [SequentialLR(optimizer, [first, second], milestones=[5])], 28)
    expected = [[0.05]] * 5 + [[0.5 * cosine_oracle(t, 3, 20, 0.0, None)] for t in range(23)]
    assert_sequence(history, expected)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda opt: LinearWarmup(opt, -1), "warmup_steps"),
        (lambda opt: LinearWarmup(opt, 2.5), "warmup_steps"),
        (lambda opt: LinearWarmup(opt, 5, start_factor=0.0), "start_factor"),
        (lambda opt: LinearWarmup(opt, 5, start_factor=1.5), "start_factor"),
        (lambda opt: WarmupPolynomialDecay(opt, -2, 10), "warmup_steps"),
        (lambda opt: WarmupPolynomialDecay(opt, 2, 10, power=0.0), "power"),
        (lambda opt: WarmupPolynomialDecay(opt, 2, 10, power=-1.0), "power"),
        (lambda opt: WarmupPolynomialDecay(opt, 10, 10), "total_steps"),
        (lambda opt: WarmupPolynomialDecay(opt, 2, 0), "total_steps"),
        (lambda opt: WarmupPolynomialDecay(opt, 2, 10, end_factor=1.5), "end_factor"),
        (lambda opt: WarmupCosineDecay(opt, 2, 10, end_factor=-0.1), "end_factor"),
        (lambda opt: WarmupCosineDecay(opt, 5, 3), "total_steps"),
        (lambda opt: WarmupStableDecay(opt, 2, 10, 9), "decay_steps"),
        (lambda opt: WarmupStableDecay(opt, 2, 10, 0), "decay_steps"),
        (lambda opt: WarmupStableDecay(opt, 2, 10, 4, decay_shape="step"), "decay_shape"),
        (lambda opt: PowerScheduler(opt, a=0.0, b=-0.5, batch_size=4, warmup_steps=2), "a"),
        (lambda opt: PowerScheduler(opt, a=1.0, b=0.0, batch_size=4, warmup_steps=2), "b"),
        (lambda opt: PowerScheduler(opt, a=1.0, b=-0.5, batch_size=0, warmup_steps=2), "batch_size"),
        (lambda opt: PowerScheduler(opt, a=1.0, b=-0.5, batch_size=4, warmup_steps=-1), "warmup_steps"),
        (lambda opt: PowerScheduler(opt, a=1.0, b=-0.5, batch_size=4, warmup_steps=2, tokens_per_sample=0), "tokens"),
        (lambda opt: PowerScheduler(opt, a=1.0, b=-0.5, batch_size=4, warmup_steps=2, total_steps=10), "decay_steps"),
        (lambda opt: PowerScheduler(opt, a=1.0, b=-0.5, batch_size=4, warmup_steps=2, decay_steps=3), "decay_steps"),
    ],
)
def test_bad_arguments_raise(make, name):
    with pytest.raises(ValueError, match=name):
        make(make_optimizer())


def test_power_scheduler_needs_a_positive_lr_max():
    with pytest.raises(ValueError, match="lr_max"):
        PowerScheduler(make_optimizer([0.0]), a=1.0, b=-0.5, batch_size=4, warmup_steps=2)
