"""Schedules in epochs: equal to their step form, and an epoch clock that follows the batch size."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.schedules import (
    BatchSizeCoupledLR,
    LinearWarmup,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    WarmupStableDecay,
)


def optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def trace(make, steps, lr=1.0):
    opt = optimizer(lr)
    scheduler = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


@settings(max_examples=60, deadline=None)
@given(
    steps_per_epoch=st.integers(1, 40),
    warmup=st.floats(0.0, 3.0),
    extra=st.floats(0.1, 6.0),
    decay_fraction=st.floats(0.05, 1.0),
    shape=st.sampled_from(["poly", "cosine", "wsd", "warmup"]),
)
def test_epoch_schedules_equal_their_step_equivalents(steps_per_epoch, warmup, extra, decay_fraction, shape):
    total = warmup + extra
    w, t = round(warmup * steps_per_epoch), round(total * steps_per_epoch)
    if t <= w:  # rounding made the run no longer than its warmup: that is an error (tested below)
        return
    d = max(1, min(round(decay_fraction * (t - w)), t - w))
    epochs = {"steps_per_epoch": steps_per_epoch, "warmup_epochs": warmup}
    if shape == "poly":
        by_steps = lambda o: WarmupPolynomialDecay(o, w, t, power=2.0)  # noqa: E731
        by_epochs = lambda o: WarmupPolynomialDecay(o, total_epochs=total, power=2.0, **epochs)  # noqa: E731
    elif shape == "cosine":
        by_steps = lambda o: WarmupCosineDecay(o, w, t, end_factor=0.1)  # noqa: E731
        by_epochs = lambda o: WarmupCosineDecay(o, total_epochs=total, end_factor=0.1, **epochs)  # noqa: E731
    elif shape == "wsd":
        by_steps = lambda o: WarmupStableDecay(o, w, t, d, "sqrt")  # noqa: E731
        by_epochs = lambda o: WarmupStableDecay(  # noqa: E731
            o, total_epochs=total, decay_epochs=d / steps_per_epoch, decay_shape="sqrt", **epochs
        )
    else:
        by_steps = lambda o: LinearWarmup(o, w)  # noqa: E731
        by_epochs = lambda o: LinearWarmup(o, **epochs)  # noqa: E731
    assert trace(by_epochs, t + 3) == trace(by_steps, t + 3)


def test_a_new_steps_per_epoch_keeps_the_phases_at_the_same_epochs():
    # 1 epoch warmup, linear decay to 0 at epoch 4, 10 steps per epoch; at epoch 2 the batch doubles.
    opt = optimizer()
    scheduler = WarmupPolynomialDecay(opt, warmup_epochs=1, total_epochs=4, steps_per_epoch=10)
    lrs = []
    for epoch in range(4):
        if epoch == 2:
            scheduler.set_steps_per_epoch(5)
        for _ in range(10 if epoch < 2 else 5):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
    # At the start of epoch 2 the decay is a third done; each of the last 10 steps removes 1/15.
    assert lrs[20] == pytest.approx(1 - 10 / 30)
    assert lrs[21:] == pytest.approx([1 - (10 + 2 * i) / 30 for i in range(1, 10)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # The clock is state: a fresh scheduler loaded from it continues identically.
    clone = WarmupPolynomialDecay(optimizer(), warmup_epochs=1, total_epochs=4, steps_per_epoch=10)
    clone.load_state_dict(scheduler.state_dict())
    assert clone._schedule_step(clone.last_epoch) == scheduler._schedule_step(scheduler.last_epoch)


def test_batch_size_coupled_lr_moves_the_epoch_clock_of_its_schedules():
    n = 640
    opt = optimizer()
    schedule = WarmupCosineDecay(opt, warmup_epochs=1, total_epochs=3, steps_per_epoch=10)  # batch 64
    coupled = BatchSizeCoupledLR(opt, 64, "sqrt", dataset_size=n, epoch_schedulers=[schedule])
    steps = 0
    for epoch in range(3):
        if epoch == 1:
            coupled.set_batch_size(256)  # 3 steps per epoch from now on (ceil(640 / 256))
            assert coupled.steps_per_epoch(256) == 3
        for _ in range(coupled.steps_per_epoch(coupled.batch_size)):
            opt.step()
            schedule.step()
            coupled.step()
            steps += 1
    assert steps == 10 + 3 + 3
    # The cosine ends at epoch 3 however many steps the epochs had; the lr is at its end factor, 0.
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert "_epoch_schedulers" not in coupled.state_dict()
    assert BatchSizeCoupledLR(optimizer(), 64, dataset_size=640, drop_last=True).steps_per_epoch(256) == 2


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda o: WarmupPolynomialDecay(o, warmup_epochs=1, total_epochs=2), "steps_per_epoch"),
        (lambda o: WarmupPolynomialDecay(o, 5, 10, warmup_epochs=1, steps_per_epoch=5), "warmup_steps or warmup_epochs"),
        (lambda o: WarmupPolynomialDecay(o, warmup_epochs=-1, total_epochs=2, steps_per_epoch=5), "warmup_epochs"),
        (lambda o: WarmupPolynomialDecay(o, warmup_epochs=1, total_epochs=math.inf, steps_per_epoch=5), "total_epochs"),
        (lambda o: WarmupPolynomialDecay(o, warmup_epochs=1, total_epochs=2, steps_per_epoch=0), "steps_per_epoch"),
        (lambda o: WarmupPolynomialDecay(o, warmup_steps=1), "total_steps or total_epochs"),
        (lambda o: WarmupStableDecay(o, warmup_epochs=1, total_epochs=3, steps_per_epoch=4), "decay_steps"),
        (lambda o: LinearWarmup(o), "warmup_steps or warmup_epochs"),
    ],
)
def test_bad_lengths_raise_a_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make(optimizer())


def test_a_run_no_longer_than_its_warmup_says_how_to_fix_it():
    with pytest.raises(ValueError, match="raise total_epochs or lower warmup_epochs"):
        WarmupPolynomialDecay(optimizer(), warmup_epochs=2, total_epochs=2.1, steps_per_epoch=3)
    with pytest.raises(ValueError, match=r"raise total_steps or\s+lower warmup_steps"):
        WarmupCosineDecay(optimizer(), 50, 50)


def test_step_based_schedules_refuse_a_new_epoch_length():
    scheduler = WarmupPolynomialDecay(optimizer(), 2, 10)
    with pytest.raises(ValueError, match="built from steps"):
        scheduler.set_steps_per_epoch(4)
    with pytest.raises(ValueError, match="epoch_schedulers"):
        BatchSizeCoupledLR(optimizer(), 64, dataset_size=100, epoch_schedulers=[scheduler])
    epoch_based = WarmupPolynomialDecay(optimizer(), warmup_epochs=1, total_epochs=2, steps_per_epoch=4)
    with pytest.raises(ValueError, match="dataset_size"):
        BatchSizeCoupledLR(optimizer(), 64, epoch_schedulers=[epoch_based])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        epoch_based.set_steps_per_epoch(0)
