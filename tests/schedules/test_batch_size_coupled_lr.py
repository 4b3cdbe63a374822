"""BatchSizeCoupledLR: the lr follows the batch size at once, on top of other schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import ExponentialLR, MultiplicativeLR, SequentialLR, StepLR

from largebatch import create_optimizer
from largebatch.batching import AdaptiveBatchSize, GradientStatistics
from largebatch.schedules import BatchSizeCoupledLR, LinearWarmup, scaling_exponent

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


def shared_lr_optimizer():
    """create_optimizer hands one lr tensor to all of its groups (decay and no-decay)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = create_optimizer(model, "lamb", lr=torch.tensor(1e-3, dtype=torch.float64))
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert len(lrs) == 2 and lrs[0] is lrs[1]
    return optimizer


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_a_lr_tensor_shared_by_groups_is_scaled_once(rule):
    optimizer = shared_lr_optimizer()
    multiplicative = shared_lr_optimizer()
    coupled = BatchSizeCoupledLR(optimizer, base_batch_size=256, rule=rule)
    coupled.set_batch_size(4096)
    factor = 16 ** scaling_exponent(rule)
    assert lrs_of(optimizer) == pytest.approx([1e-3 * factor] * 2, rel=REL)
    # torch's own multiplicative scheduler, the same factor once: the same lr.
    torch_scheduler = MultiplicativeLR(multiplicative, lambda epoch: factor)
    multiplicative.step()  # no gradients: moves nothing, keeps torch's call-order check quiet
    torch_scheduler.step()
    assert lrs_of(optimizer) == pytest.approx(lrs_of(multiplicative), rel=REL)
    assert optimizer.param_groups[0]["lr"] is optimizer.param_groups[1]["lr"]
    assert coupled.get_last_lr() == pytest.approx([1e-3 * factor] * 2, rel=REL)
    # The same batch size given at construction: scaled once there too.
    at_construction = shared_lr_optimizer()
    BatchSizeCoupledLR(at_construction, base_batch_size=256, rule=rule, batch_size=4096)
    assert lrs_of(at_construction) == pytest.approx([1e-3 * factor] * 2, rel=REL)


def test_adaptive_batch_size_coupling_scales_a_shared_lr_tensor_once():
    optimizer = shared_lr_optimizer()
    coupled = BatchSizeCoupledLR(optimizer, base_batch_size=4, rule="sqrt")
    controller = AdaptiveBatchSize(4, 256, eta=1.0, lr_coupling=coupled)
    # With eta = 1 and ‖mean gradient‖ = 1 the norm test asks for b = variance trace.
    for required in (2.0, 16.0, 9.0, 64.0):
        controller.step(make_statistics(required))
        assert controller.batch_size == coupled.batch_size
        expected = 1e-3 * math.sqrt(controller.batch_size / 4)
        assert lrs_of(optimizer) == pytest.approx([expected] * 2, rel=REL)
    assert controller.batch_size == 64


def make_statistics(trace: float) -> GradientStatistics:
    f64 = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731
    return GradientStatistics(
        num_units=f64(8.0),
        num_samples=f64(8.0),
        mean_sq_norm=f64(1.0),
        variance_trace=f64(trace),
        inner_product_variance=f64(1.0),
        orthogonal_variance=f64(1.0),
        mean_gradient=(f64([1.0]),),
        coordinate_variance=None,
    )


@pytest.mark.parametrize(
    ("key", "bad", "match"),
    [
        ("_batch_size", 0, "_batch_size"),
        ("_batch_size", -256, "_batch_size"),
        ("_batch_size", 2.5, "_batch_size"),
        ("_batch_size", None, "_batch_size"),
        ("base_batch_size", 0, "base_batch_size"),
        ("rule", "cubic", "rule"),
        ("exponent", 3.0, "exponent"),
    ],
)
def test_load_state_dict_refuses_a_bad_state_and_changes_nothing(key, bad, match):
    optimizer = make_optimizer([0.1])
    scheduler = BatchSizeCoupledLR(optimizer, base_batch_size=256, batch_size=512)
    optimizer.step()
    scheduler.step()
    before = dict(scheduler.state_dict())
    saved = {**scheduler.state_dict(), key: bad, "last_epoch": 17}
    with pytest.raises(ValueError, match=match):
        scheduler.load_state_dict(saved)
    assert scheduler.state_dict() == before
    scheduler.set_batch_size(1024)
    assert lrs_of(optimizer) == pytest.approx([0.4])


def test_load_state_dict_refuses_a_missing_batch_size():
    scheduler = BatchSizeCoupledLR(make_optimizer([0.1]), base_batch_size=256)
    saved = scheduler.state_dict()
    del saved["_batch_size"]
    with pytest.raises(ValueError, match="_batch_size"):
        scheduler.load_state_dict(saved)
    assert scheduler.batch_size == 256
