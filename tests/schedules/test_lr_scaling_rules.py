"""scale_lr, suggest_scaling_rule and adapt_regime against plain float64 transcriptions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.schedules import Regime, adapt_regime, scale_lr, scaling_exponent, suggest_scaling_rule

lrs = st.floats(1e-6, 10.0)
batch_sizes = st.integers(1, 2**20)


@settings(max_examples=50, deadline=None)
@given(base_lr=lrs, batch_size=batch_sizes, base_batch_size=batch_sizes)
def test_linear_rule_doubles_the_lr_when_the_batch_doubles(base_lr, batch_size, base_batch_size):
    single = scale_lr(base_lr, batch_size, base_batch_size, "linear")
    assert math.isclose(scale_lr(base_lr, 2 * batch_size, base_batch_size, "linear"), 2 * single, rel_tol=1e-12)
    assert math.isclose(single, base_lr * batch_size / base_batch_size, rel_tol=1e-12)


@settings(max_examples=50, deadline=None)
@given(base_lr=lrs, batch_size=batch_sizes, base_batch_size=batch_sizes)
def test_sqrt_rule_doubles_the_lr_when_the_batch_quadruples(base_lr, batch_size, base_batch_size):
    single = scale_lr(base_lr, batch_size, base_batch_size, "sqrt")
    assert math.isclose(scale_lr(base_lr, 4 * batch_size, base_batch_size, "sqrt"), 2 * single, rel_tol=1e-12)
    doubled = scale_lr(base_lr, 2 * batch_size, base_batch_size, "sqrt")
    assert math.isclose(doubled, math.sqrt(2) * single, rel_tol=1e-12)


@settings(max_examples=50, deadline=None)
@given(base_lr=lrs, batch_size=batch_sizes, base_batch_size=batch_sizes, exponent=st.floats(0.0, 2.0))
def test_float_exponent(base_lr, batch_size, base_batch_size, exponent):
    expected = math.exp(math.log(base_lr) + exponent * (math.log(batch_size) - math.log(base_batch_size)))
    assert math.isclose(scale_lr(base_lr, batch_size, base_batch_size, exponent), expected, rel_tol=1e-9)
    assert scale_lr(base_lr, base_batch_size, base_batch_size, exponent) == base_lr


def test_named_rules_are_their_exponents():
    assert scaling_exponent("linear") == 1.0
    assert scaling_exponent("sqrt") == 0.5
    assert scale_lr(0.1, 8192, 256) == pytest.approx(3.2)  # Goyal et al.: 0.1 per 256 samples


@pytest.mark.parametrize("rule", ["linear", "sqrt", 0.0, 1.5])
def test_a_zero_base_lr_stays_zero(rule):
    """base_lr ≥ 0, as documented: 0 (a frozen group, an lr set later by a scheduler) is allowed."""
    assert scale_lr(0.0, 4096, 256, rule) == 0.0
    assert scale_lr(0, 256, 256, rule) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -8}, "batch_size"),
        ({"batch_size": 8.0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"base_batch_size": 0}, "base_batch_size"),
        ({"base_lr": -0.1}, "base_lr"),
        ({"base_lr": float("nan")}, "base_lr"),
        ({"rule": "cubic"}, "rule"),
        ({"rule": -0.5}, "rule"),
        ({"rule": float("inf")}, "rule"),
    ],
)
def test_scale_lr_rejects_bad_input(kwargs, name):
    arguments = {"base_lr": 0.1, "batch_size": 512, "base_batch_size": 256, "rule": "linear", **kwargs}
    with pytest.raises(ValueError, match=name):
        scale_lr(**arguments)


def _named(name, base=object):
    return type(name, (base,), {})


@pytest.mark.parametrize(
    ("optimizer", "rule"),
    [
        (torch.optim.SGD, "linear"),
        (torch.optim.Adam, "sqrt"),
        (torch.optim.AdamW, "sqrt"),
        (torch.optim.Adagrad, "sqrt"),
        (torch.optim.RMSprop, "sqrt"),
        (_named("LARS"), "linear"),
        (_named("LAMB"), "sqrt"),
        (_named("Adan"), "sqrt"),
        (_named("AdaGradNorm"), "sqrt"),
        (_named("MySGD", torch.optim.SGD), "linear"),  # inherits its parent's rule
        (_named("MyAdamW", torch.optim.AdamW), "sqrt"),
    ],
)
def test_suggest_scaling_rule_by_class(optimizer, rule):
    assert suggest_scaling_rule(optimizer) == rule


def test_suggest_scaling_rule_for_instances_and_largebatch_optimizers():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert suggest_scaling_rule(torch.optim.SGD(params, lr=0.1)) == "linear"
    assert suggest_scaling_rule(torch.optim.Adam(params)) == "sqrt"
    optimizers = pytest.importorskip("largebatch.optimizers")
    assert suggest_scaling_rule(optimizers.LARS) == "linear"
    for name in ("LAMB", "Adan", "AdaGradNorm"):
        assert suggest_scaling_rule(getattr(optimizers, name)) == "sqrt", name


def test_suggest_scaling_rule_rejects_unknown_optimizers():
    with pytest.raises(ValueError, match="optimizer_or_class"):
        suggest_scaling_rule(_named("Shampoo", torch.optim.Optimizer))


def test_adapt_regime_resnet_example():
    # Hoffer et al.: a 90-epoch regime at batch 256, dropping at 30/60/80, taken to batch 4096.
    regime = adapt_regime(0.1, epochs=90, milestones=[30, 60, 80], batch_size=4096, base_batch_size=256)
    assert regime == Regime(lr=pytest.approx(0.4), epochs=1440, milestones=(480, 960, 1280))


@settings(max_examples=50, deadline=None)
@given(
    lr=lrs,
    epochs=st.integers(1, 200),
    milestone_gaps=st.lists(st.integers(1, 50), max_size=4),
    batch_size=st.integers(1, 65536),
    base_batch_size=st.integers(1, 65536),
)
def test_adapt_regime_keeps_the_number_of_updates(lr, epochs, milestone_gaps, batch_size, base_batch_size):
    milestones = [sum(milestone_gaps[: i + 1]) for i in range(len(milestone_gaps))]
    regime = adapt_regime(lr, epochs, milestones, batch_size, base_batch_size)
    assert math.isclose(regime.lr, lr * math.sqrt(batch_size / base_batch_size), rel_tol=1e-12)
    # Rounded up: at least as many samples (so updates) as the base regime, less than one epoch more.
    for adapted, base in [(regime.epochs, epochs), *zip(regime.milestones, milestones)]:
        assert adapted * base_batch_size >= base * batch_size
        assert (adapted - 1) * base_batch_size < base * batch_size
    if batch_size >= base_batch_size:  # stretched milestones stay strictly increasing
        assert all(earlier < later for earlier, later in zip(regime.milestones, regime.milestones[1:]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"milestones": [30, 30]}, "milestones"),
        ({"milestones": [0, 30]}, "milestones"),
        ({"batch_size": 0}, "batch_size"),
        ({"base_batch_size": -1}, "base_batch_size"),
    ],
)
def test_adapt_regime_rejects_bad_input(kwargs, name):
    arguments = {"lr": 0.1, "epochs": 90, "milestones": [30, 60], "batch_size": 512, "base_batch_size": 256}
    with pytest.raises(ValueError, match=name):
        adapt_regime(**{**arguments, **kwargs})


def test_measured_exponents_are_looked_up_by_class_and_feed_scale_lr(monkeypatch):
    from largebatch.schedules import rules

    monkeypatch.setitem(rules.MEASURED_EXPONENTS, "SGD", 0.25)

    class MySGD(torch.optim.SGD):
        pass

    assert suggest_scaling_rule(torch.optim.SGD, source="measured") == 0.25
    assert suggest_scaling_rule(MySGD, source="measured") == 0.25  # inherited through the MRO
    assert scale_lr(0.1, 4096, 256, suggest_scaling_rule(MySGD, source="measured")) == pytest.approx(0.2)
    assert suggest_scaling_rule(torch.optim.SGD) == "linear"  # the papers' rule stays the default


def test_measured_rule_through_create_optimizer(monkeypatch):
    from largebatch.factory import create_optimizer
    from largebatch.schedules import rules

    monkeypatch.setitem(rules.MEASURED_EXPONENTS, "AdamW", 0.25)
    model = torch.nn.Linear(2, 2)
    opt = create_optimizer(model, "adamw", 1e-3, batch_size=4096, base_batch_size=256, scaling_rule="measured")
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)


def test_measured_exponents_are_valid_rules():
    from largebatch.schedules import MEASURED_EXPONENTS

    for name, exponent in MEASURED_EXPONENTS.items():
        assert isinstance(name, str) and scaling_exponent(exponent) == exponent


def test_unknown_source_or_unmeasured_optimizer_raise_value_errors(monkeypatch):
    from largebatch.schedules import rules

    with pytest.raises(ValueError, match="source"):
        suggest_scaling_rule(torch.optim.SGD, source="folklore")
    monkeypatch.delitem(rules.MEASURED_EXPONENTS, "RMSprop", raising=False)
    with pytest.raises(ValueError, match="no exponent was measured for RMSprop"):
        suggest_scaling_rule(torch.optim.RMSprop, source="measured")
