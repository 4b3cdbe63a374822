"""BatchSizeCoupledLR: the lr follows the batch size at once, on top of other schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import ExponentialLR, SequentialLR, StepLR

from largebatch.schedules import BatchSizeCoupledLR, LinearWarmup

REL = 1e-10


def make_optimizer(lrs=(0.1,)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups)


def lrs_of(optimizer):
    return [float(group["lr"]) for group in optimizer.param_groups]


def test_linear_rule_doubles_the_lr_at_once_when_the_batch_doubles():
    optimizer = make_optimizer([0.1, 0.4])
    scheduler = BatchSizeCoupledLR(optimizer, base_batch_size=256)
    assert scheduler.batch_size == 256
    assert lrs_of(optimizer) == [0.1, 0.4]
    scheduler.set_batch_size(512)
    assert lrs_of(optimizer) == pytest.approx([0.2, 0.8])
    assert scheduler.get_last_lr() == pytest.approx([0.2, 0.8])
    assert scheduler.batch_size == 512
    optimizer.step()
    scheduler.step()
    assert lrs_of(optimizer) == pytest.approx([0.2, 0.8])


def test_sqrt_rule_doubles_the_lr_when_the_batch_quadruples():
    optimizer = make_optimizer([1e-3])
    scheduler = BatchSizeCoupledLR(optimizer, base_batch_size=1024, rule="sqrt")
    scheduler.batch_size = 4096
    assert lrs_of(optimizer) == pytest.approx([2e-3])
    scheduler.batch_size = 1024
    assert lrs_of(optimizer) == pytest.approx([1e-3])


def test_initial_batch_size_scales_at_construction():
    optimizer = make_optimizer([0.1])
    scheduler = BatchSizeCoupledLR(optimizer, base_batch_size=256, rule=0.75, batch_size=4096)
    assert lrs_of(optimizer) == pytest.approx([0.1 * 16**0.75])
    assert scheduler.multiplier(4096) == pytest.approx(16**0.75)


def test_goyal_recipe_scaled_lr_with_warmup_from_the_small_batch_lr():
    optimizer = make_optimizer([0.1])  # tuned at batch 256
    coupled = BatchSizeCoupledLR(optimizer, base_batch_size=256, batch_size=8192)
    warmup = LinearWarmup(optimizer, warmup_steps=5, start_factor=256 / 8192)
    history = []
    for _ in range(7):
        history.append(lrs_of(optimizer)[0])
        optimizer.step()
        warmup.step()
        coupled.step()
    assert history[0] == pytest.approx(0.1)
    assert history[4:] == pytest.approx([3.2, 3.2, 3.2])


@settings(max_examples=50, deadline=None)
@given(
    rule=st.one_of(st.sampled_from(["linear", "sqrt"]), st.floats(0.0, 1.5)),
    base_batch_size=st.integers(1, 1024),
    # For each step: the batch size set before it (or None to keep it).
    plan=st.lists(st.one_of(st.none(), st.integers(1, 8192)), min_size=1, max_size=25),
    lrs=st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=3),
)
def test_lr_is_the_other_schedule_times_the_rule(rule, base_batch_size, plan, lrs):
    exponent = {"linear": 1.0, "sqrt": 0.5}.get(rule, rule)
    optimizer = make_optimizer(lrs)
    decay = ExponentialLR(optimizer, gamma=0.95)
    coupled = BatchSizeCoupledLR(optimizer, base_batch_size=base_batch_size, rule=rule)
    batch = base_batch_size
    for step, new_batch in enumerate(plan):
        if new_batch is not None:
            coupled.set_batch_size(new_batch)
            batch = new_batch
        expected = [lr * 0.95**step * (batch / base_batch_size) ** exponent for lr in lrs]
        for got, want in zip(lrs_of(optimizer), expected):
            assert math.isclose(got, want, rel_tol=REL), (step, got, want)
        optimizer.step()
        decay.step()
        coupled.step()


@pytest.mark.parametrize("split", [0, 3, 9])
def test_resume_from_state_dict_keeps_the_batch_size_and_the_sequence(split):
    plan = [None, 512, None, None, 2048, None, 128, None, None, 1024, None, None]

    def run(optimizer, schedulers, coupled, steps):
        history = []
        for new_batch in steps:
            if new_batch is not None:
                coupled.set_batch_size(new_batch)
            history.append(lrs_of(optimizer))
            optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
        return history

    def build():
        optimizer = make_optimizer([0.1, 0.03])
        step_lr = StepLR(optimizer, step_size=4, gamma=0.5)
        coupled = BatchSizeCoupledLR(optimizer, base_batch_size=256, rule="sqrt", batch_size=384)
        return optimizer, [step_lr, coupled], coupled

    optimizer, schedulers, coupled = build()
    straight = run(optimizer, schedulers, coupled, plan)

    optimizer, schedulers, coupled = build()
    first = run(optimizer, schedulers, coupled, plan[:split])
    saved_optimizer, saved_schedulers = optimizer.state_dict(), [s.state_dict() for s in schedulers]
    optimizer, schedulers, coupled = build()
    optimizer.load_state_dict(saved_optimizer)
    for scheduler, state in zip(schedulers, saved_schedulers):
        scheduler.load_state_dict(state)
    expected_batch = next((b for b in reversed(plan[:split]) if b is not None), 384)
    assert coupled.batch_size == expected_batch
    assert first + run(optimizer, schedulers, coupled, plan[split:]) == straight


def test_tensor_lr_is_scaled_in_place():
    lr = torch.tensor(0.1, dtype=torch.float64)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, foreach=False)
    decay = ExponentialLR(optimizer, gamma=0.5)
    coupled = BatchSizeCoupledLR(optimizer, base_batch_size=32, batch_size=64)
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(0.2)
    optimizer.step()
    decay.step()
    coupled.step()
    coupled.set_batch_size(256)
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(0.1 * 0.5 * 8)
    assert isinstance(coupled.get_last_lr()[0], torch.Tensor) and coupled.get_last_lr()[0] is not lr


def test_sequential_lr_closed_form_keeps_the_batch_multiplier():
    optimizer = make_optimizer([0.1])
    coupled = BatchSizeCoupledLR(optimizer, base_batch_size=100, batch_size=300)
    warmup = LinearWarmup(optimizer, 3)
    sequential = SequentialLR(optimizer, [warmup, coupled], milestones=[3])
    history = []
    for _ in range(5):
        history.append(lrs_of(optimizer)[0])
        optimizer.step()
        sequential.step()
    assert history == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.3, 0.3])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"base_batch_size": 0}, "base_batch_size"),
        ({"base_batch_size": 2.5}, "base_batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -64}, "batch_size"),
        ({"rule": "quadratic"}, "rule"),
        ({"rule": -1.0}, "rule"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BatchSizeCoupledLR(make_optimizer(), **{"base_batch_size": 256, **kwargs})


@pytest.mark.parametrize("bad", [0, -1, 3.0, True])
def test_set_batch_size_rejects_bad_sizes_and_leaves_the_lr(bad):
    optimizer = make_optimizer([0.1])
    scheduler = BatchSizeCoupledLR(optimizer, base_batch_size=256)
    with pytest.raises(ValueError, match="batch_size"):
        scheduler.set_batch_size(bad)
    assert lrs_of(optimizer) == [0.1] and scheduler.batch_size == 256
