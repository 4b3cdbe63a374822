"""The batch-size tests and the `AdaptiveBatchSize` controller."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.batching import (
    AdaptiveBatchSize,
    GradientNoiseScale,
    GradientStatistics,
    augmented_inner_product_test,
    coordinate_test,
    gradient_statistics,
    inner_product_test,
    norm_test,
    orthogonality_test,
)
from largebatch.schedules import BatchSizeCoupledLR


def make_statistics(trace=1.0, inner=1.0, orthogonal=1.0, mean=(1.0,), coordinates=None) -> GradientStatistics:
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    mean_t = torch.tensor(mean, dtype=torch.float64)
    return GradientStatistics(
        num_units=f64(8.0),
        num_samples=f64(8.0),
        mean_sq_norm=mean_t.square().sum(),
        variance_trace=f64(trace),
        inner_product_variance=f64(inner),
        orthogonal_variance=f64(orthogonal),
        mean_gradient=(mean_t,),
        coordinate_variance=None if coordinates is None else f64(coordinates),
    )


def linear_regression_statistics(seed=0, batch=16, noise=1.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, generator=generator, dtype=torch.float64)
    residual = 1.0 + noise * torch.randn(batch, 1, generator=generator, dtype=torch.float64)
    return gradient_statistics([residual * x, residual], coordinatewise=True)  # closed-form gradients of ½r²


# ---------------------------------------------------------------------------- the tests' formulas


@settings(max_examples=30, deadline=None)
@given(
    trace=st.floats(0.0, 1e3),
    inner=st.floats(0.0, 1e3),
    orthogonal=st.floats(0.0, 1e3),
    mean=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=4),
    eta=st.floats(0.01, 2.0),
    theta=st.floats(0.01, 2.0),
    nu=st.floats(0.01, 2.0),
)
def test_required_batch_sizes_follow_their_formulas(trace, inner, orthogonal, mean, eta, theta, nu):
    coordinates = [trace / len(mean)] * len(mean)
    stats = make_statistics(trace, inner, orthogonal, mean, coordinates)
    s = sum(m * m for m in mean)
    assert float(norm_test(stats, eta)) == pytest.approx(trace / (eta**2 * s), rel=1e-12)
    assert float(inner_product_test(stats, theta)) == pytest.approx(inner / (theta**2 * s * s), rel=1e-12)
    assert float(orthogonality_test(stats, nu)) == pytest.approx(orthogonal / (nu**2 * s), rel=1e-12)
    expected_augmented = max(inner / (theta**2 * s * s), orthogonal / (nu**2 * s))
    augmented = float(augmented_inner_product_test(stats, theta, nu))
    assert augmented == pytest.approx(expected_augmented, rel=1e-12)
    expected_coordinate = max(v / (eta**2 * m * m) for v, m in zip(coordinates, mean))
    assert float(coordinate_test(stats, eta)) == pytest.approx(expected_coordinate, rel=1e-12)


def test_augmented_test_pairs_each_tolerance_with_its_own_test():
    """θ goes with the inner-product variance, ν with the orthogonal one: swapped, the answer changes."""
    stats = make_statistics(inner=20.0, orthogonal=30.0)  # ‖ḡ‖ = 1
    assert float(augmented_inner_product_test(stats, theta=0.5, nu=0.25)) == pytest.approx(480.0)  # max(80, 480)
    assert float(augmented_inner_product_test(stats, theta=0.25, nu=0.5)) == pytest.approx(320.0)  # max(320, 120)


def test_tests_return_tensors_without_host_sync():
    stats = linear_regression_statistics()
    for test in (norm_test, inner_product_test, orthogonality_test, augmented_inner_product_test, coordinate_test):
        result = test(stats)
        assert isinstance(result, torch.Tensor) and result.dim() == 0 and result.dtype == torch.float64


def test_zero_variance_asks_for_nothing_and_zero_mean_asks_for_everything():
    quiet = make_statistics(trace=0.0, inner=0.0, orthogonal=0.0, mean=(0.0,), coordinates=[0.0])
    for test in (norm_test, inner_product_test, orthogonality_test, coordinate_test):
        assert float(test(quiet)) == 0.0
    noisy = make_statistics(trace=1.0, inner=1.0, orthogonal=1.0, mean=(0.0,), coordinates=[1.0])
    for test in (norm_test, inner_product_test, orthogonality_test, coordinate_test):
        assert float(test(noisy)) == math.inf


def test_coordinate_test_uses_the_worst_coordinate():
    stats = make_statistics(mean=(1.0, 2.0), coordinates=[1.0, 100.0])
    assert float(coordinate_test(stats, 1.0)) == pytest.approx(25.0)  # max(1/1, 100/4)
    with pytest.raises(ValueError, match="coordinatewise=True"):
        coordinate_test(make_statistics())


# ---------------------------------------------------------------------------- the controller


def expected_next(batch, required, b_max, multiple):
    """b_{k+1} = min(b_max, round_up(max(b_k, ⌈b_req⌉), multiple)), written plainly."""
    if required >= b_max:
        return b_max
    grown = max(batch, math.ceil(required))
    while grown % multiple:
        grown += 1
    return min(b_max, grown)


@settings(max_examples=40, deadline=None)
@given(
    b0=st.integers(2, 32),
    extra=st.integers(0, 500),
    multiple=st.integers(1, 16),
    required=st.lists(st.one_of(st.floats(0.0, 2000.0), st.just(math.inf)), min_size=1, max_size=20),
)
def test_batch_never_shrinks_never_exceeds_max_and_follows_the_rule(b0, extra, multiple, required):
    b_max = b0 + extra
    controller = AdaptiveBatchSize(b0, b_max, eta=1.0, multiple=multiple)
    batch = b0
    for r in required:
        # With eta = 1 and ‖ḡ‖ = 1, b_req = trace; noise with ḡ = 0 asks for +inf.
        new = controller.step(make_statistics(trace=r) if math.isfinite(r) else make_statistics(mean=(0.0,)))
        assert new == expected_next(batch, r, b_max, multiple)
        assert batch <= new <= b_max
        batch = new
    assert [record.batch_size for record in controller.history][-1] == controller.batch_size
    assert [record.required for record in controller.history] == pytest.approx(required)


def test_tiny_eta_jumps_to_max_and_huge_eta_stays_fixed():
    stats = linear_regression_statistics()
    tiny = AdaptiveBatchSize(4, 512, eta=1e-6)
    assert tiny.step(stats) == 512
    huge = AdaptiveBatchSize(4, 512, eta=1e6)
    for _ in range(5):
        assert huge.step(stats) == 4


# ‖ḡ‖ = 1 and the tolerances η = 1, θ = 1/2, ν = 1/4: tr Σ = 10, Var_ip = 20, Var_orth = 30 and the
# coordinate variance 40 ask for 10, 20/θ² = 80, 30/ν² = 480, max(80, 480) and 40. Each test, and
# each tolerance, gives its own answer: a test that read another's tolerance would be off.
NAMED_TEST_ANSWERS = {
    "norm": 10,
    "inner_product": 80,
    "orthogonality": 480,
    "augmented_inner_product": 480,
    "coordinate": 40,
}


@pytest.mark.parametrize(("test", "expected"), NAMED_TEST_ANSWERS.items())
def test_every_named_test_grows_a_noisy_batch(test, expected):
    stats = make_statistics(trace=10.0, inner=20.0, orthogonal=30.0, coordinates=[40.0])
    controller = AdaptiveBatchSize(2, 10_000, test=test, eta=1.0, theta=0.5, nu=0.25)
    assert controller.coordinatewise == (test == "coordinate")
    assert controller.step(stats) == expected
    # θ and ν exchanged: 20/ν² = 320 and 30/θ² = 120 where they are used, the rest unchanged
    swapped = AdaptiveBatchSize(2, 10_000, test=test, eta=1.0, theta=0.25, nu=0.5)
    swapped_answers = {"inner_product": 320, "orthogonality": 120, "augmented_inner_product": 320}
    assert swapped.step(stats) == swapped_answers.get(test, expected)
    # and on real gradient statistics of a noisy regression, with the default tolerances
    assert AdaptiveBatchSize(2, 10_000, test=test).step(linear_regression_statistics(noise=3.0)) > 2


def test_interval_tests_only_every_interval_steps():
    controller = AdaptiveBatchSize(2, 100, eta=1.0, interval=3)
    needs = []
    for step in range(7):
        needs.append(controller.needs_statistics)
        controller.step(make_statistics(trace=10.0 * (step + 1)) if controller.needs_statistics else None)
    assert needs == [True, False, False, True, False, False, True]
    assert [record.step for record in controller.history] == [0, 3, 6]
    assert controller.batch_size == 70
    controller.step(None)  # step 7: no test, no statistics needed
    controller.step(None)
    with pytest.raises(ValueError, match="statistics is None at step 9"):
        controller.step(None)


class RecordingCoupling:
    def __init__(self):
        self.sizes = []

    def set_batch_size(self, batch_size: int) -> None:
        self.sizes.append(batch_size)


def test_lr_coupling_is_told_each_growth_once():
    coupling = RecordingCoupling()
    controller = AdaptiveBatchSize(4, 64, eta=1.0, lr_coupling=coupling)
    for required in (2.0, 9.5, 9.0, 40.0, 1000.0, 1000.0):
        controller.step(make_statistics(trace=required))
    assert coupling.sizes == [10, 40, 64]


def test_state_dict_round_trip_continues_identically():
    sequence = [3.0, 12.0, 5.0, 30.0, 31.5, 100.0]
    full = AdaptiveBatchSize(2, 64, eta=1.0, interval=2)
    for r in sequence:
        full.step(make_statistics(trace=r))
    first = AdaptiveBatchSize(2, 64, eta=1.0, interval=2)
    for r in sequence[:3]:
        first.step(make_statistics(trace=r))
    resumed = AdaptiveBatchSize(2, 64, eta=1.0, interval=2)
    resumed.load_state_dict(first.state_dict())
    for r in sequence[3:]:
        resumed.step(make_statistics(trace=r))
    assert resumed.state_dict() == full.state_dict()
    with pytest.raises(ValueError, match=r"batch_size 128 \(must be an int in \[initial_batch_size=2, max_batch_size=64\]"):
        resumed.load_state_dict({"batch_size": 128, "step_count": 0, "history": []})


def test_nan_statistics_raise():
    with pytest.raises(ValueError, match="NaN"):
        AdaptiveBatchSize(2, 8).step(make_statistics(trace=float("nan")))


def test_infinite_statistics_raise_instead_of_jumping_to_the_maximum():
    """An overflowing step (GradScaler skips it) must not grow the batch to b_max for good."""
    controller = AdaptiveBatchSize(2, 8)
    with pytest.raises(ValueError, match="NaN or inf"):
        controller.step(make_statistics(trace=float("inf")))
    assert controller.batch_size == 2 and controller.step_count == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eta": 0.0}, "eta"),
        ({"eta": -1.0}, "eta"),
        ({"theta": 0.0}, "theta"),
        ({"nu": -0.1}, "nu"),
        ({"max_batch_size": 4}, "max_batch_size"),
        ({"initial_batch_size": 1}, "initial_batch_size"),
        ({"initial_batch_size": 8.0}, "initial_batch_size"),
        ({"interval": 0}, "interval"),
        ({"interval": -2}, "interval"),
        ({"multiple": 0}, "multiple"),
        ({"test": "variance"}, "test"),
        ({"lr_coupling": object()}, "lr_coupling"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, name):
    arguments = {"initial_batch_size": 8, "max_batch_size": 64} | kwargs
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        AdaptiveBatchSize(arguments.pop("initial_batch_size"), arguments.pop("max_batch_size"), **arguments)


def test_test_functions_reject_bad_tolerances():
    stats = make_statistics(coordinates=[1.0])
    tests = ((norm_test, "eta"), (inner_product_test, "theta"), (orthogonality_test, "nu"), (coordinate_test, "eta"))
    for test, name in tests:
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            test(stats, 0.0)
    assert np.isfinite(float(norm_test(stats)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 8.5}, r"batch_size 8.5 \(must be an int"),
        ({"batch_size": True}, r"batch_size True \(must be an int"),
        ({"step_count": 3.0}, r"step_count'\]: 3.0"),
        ({"step_count": -1}, r"step_count'\]: -1"),
        ({"history": None}, r"history None"),
        ({"history": [(0, 5.0)]}, r"history entry \(0, 5.0\)"),
        ({"history": [(0.5, 5.0, 8)]}, r"history entry \(0.5, 5.0, 8\)"),
        ({"history": [(0, "a", 8)]}, r"required must be a number"),
        ({"history": [(0, float("nan"), 8)]}, r"required must be a number"),
    ],
)
def test_load_state_dict_refuses_bad_values_and_changes_nothing(change, message):
    controller = AdaptiveBatchSize(2, 64, eta=1.0)
    controller.step(make_statistics(trace=10.0))
    before = controller.state_dict()
    with pytest.raises(ValueError, match=message):
        controller.load_state_dict(before | change)
    assert controller.state_dict() == before


def test_a_load_failing_late_in_the_state_leaves_the_earlier_fields_alone():
    controller = AdaptiveBatchSize(2, 64)
    before = controller.state_dict()
    with pytest.raises(ValueError, match="history entry"):
        controller.load_state_dict({"batch_size": 16, "step_count": 5, "history": [(0, 16.0, 16), (1, 2.0)]})
    assert controller.state_dict() == before and controller.batch_size == 2


def test_load_state_dict_refuses_a_missing_key_and_a_noise_scale_mismatch():
    controller = AdaptiveBatchSize(2, 64)
    with pytest.raises(ValueError, match=r"missing \['history'\]"):
        controller.load_state_dict({"batch_size": 2, "step_count": 0})
    with pytest.raises(ValueError, match="holds a noise_scale state but this controller has no"):
        controller.load_state_dict(AdaptiveBatchSize(2, 64, test="noise_scale").state_dict())
    with_monitor = AdaptiveBatchSize(2, 64, test="noise_scale")
    with pytest.raises(ValueError, match="lacks a noise_scale state"):
        with_monitor.load_state_dict(controller.state_dict())


# ---------------------------------------------------------------------------- noise-scale warmup


def statistics_with_noise_scale(b_simple: float, num_samples: float = 1e12) -> GradientStatistics:
    """Statistics whose unbiased tr(Σ)/|G|² is `b_simple` (|G|² = 1; b so large the bias is nil)."""
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    trace = f64(b_simple)
    mean_sq_norm = 1.0 + trace / num_samples  # E‖ḡ‖² = |G|² + tr(Σ)/b
    one = f64(1.0)
    return GradientStatistics(f64(8.0), f64(num_samples), mean_sq_norm, trace, one, one, (one,))


@settings(max_examples=40, deadline=None)
@given(
    b0=st.integers(2, 16),
    extra=st.integers(0, 300),
    multiple=st.integers(1, 8),
    factor=st.floats(0.1, 10.0),
    b_simple=st.lists(st.floats(0.0, 500.0), min_size=1, max_size=12),
)
def test_noise_scale_warmup_is_the_clamped_monotone_rounded_rule(b0, extra, multiple, factor, b_simple):
    b_max = b0 + extra
    controller = AdaptiveBatchSize(
        b0, b_max, test="noise_scale", noise_scale=GradientNoiseScale(beta=0.0), noise_scale_factor=factor,
        multiple=multiple,
    )
    batch = b0
    for value in b_simple:  # beta = 0: B_simple is this step's estimate
        new = controller.step(statistics_with_noise_scale(value))
        assert new == expected_next(batch, factor * value, b_max, multiple)  # clamp(k·B, b0, b_max), monotone
        batch = new
    assert [r.b_simple for r in controller.noise_scale.history] == pytest.approx(b_simple, rel=1e-9, abs=1e-9)


def test_noise_scale_warmup_smooths_with_the_monitor_and_couples_the_lr():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    coupled = BatchSizeCoupledLR(optimizer, base_batch_size=8, rule="sqrt")
    controller = AdaptiveBatchSize(8, 512, test="noise_scale", noise_scale_factor=2.0, lr_coupling=coupled)
    assert controller.noise_scale.beta == 0.95  # a fresh default monitor
    for _ in range(3):
        controller.step(statistics_with_noise_scale(100.0))
    # Constant estimates: the bias-free ratio of the EMAs is 100 at once, so b = 2·100.
    assert controller.noise_scale.b_simple == pytest.approx(100.0)
    assert controller.batch_size == 200
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (200 / 8) ** 0.5)
    with pytest.raises(ValueError, match="required_batch_size is not defined for test='noise_scale'"):
        controller.required_batch_size(statistics_with_noise_scale(1.0))


def test_noise_scale_warmup_waits_for_min_updates_measurements():
    controller = AdaptiveBatchSize(
        4, 64, test="noise_scale", noise_scale=GradientNoiseScale(beta=0.0), noise_scale_min_updates=3
    )
    sizes = [controller.step(statistics_with_noise_scale(value)) for value in (50.0, 50.0, 20.0, 30.0)]
    assert sizes == [4, 4, 20, 30]  # the first two measurements only fill the monitor
    assert [r.required for r in controller.history] == pytest.approx([0.0, 0.0, 20.0, 30.0])


def test_noise_scale_warmup_growth_cap():
    controller = AdaptiveBatchSize(
        4, 100, test="noise_scale", noise_scale=GradientNoiseScale(beta=0.0), noise_scale_max_growth=2.0
    )
    sizes = [controller.step(statistics_with_noise_scale(value)) for value in (1e9, 5.0, 1000.0, 1000.0, 9.0)]
    assert sizes == [8, 8, 16, 32, 32]  # at most double per decision, never shrink


def test_a_monitor_beside_another_test_logs_every_test_step():
    monitor = GradientNoiseScale(beta=0.5)
    controller = AdaptiveBatchSize(2, 64, eta=1.0, interval=2, noise_scale=monitor)
    for _ in range(4):
        controller.step(statistics_with_noise_scale(30.0) if controller.needs_statistics else None)
    assert monitor.updates == 2 and controller.batch_size == 30  # the norm test: tr/(η²‖ḡ‖²) ≈ 30
    with pytest.raises(ValueError, match="NaN"):  # a failed test step leaves the monitor alone
        controller.step(make_statistics(trace=float("nan")))
    assert monitor.updates == 2


def test_noise_scale_state_round_trips_through_the_controller():
    def run(controller, values):
        for v in values:
            controller.step(statistics_with_noise_scale(v))

    values = [5.0, 40.0, 20.0, 90.0, 60.0, 200.0]
    full = AdaptiveBatchSize(4, 256, test="noise_scale", noise_scale_factor=1.5)
    run(full, values)
    first = AdaptiveBatchSize(4, 256, test="noise_scale", noise_scale_factor=1.5)
    run(first, values[:3])
    resumed = AdaptiveBatchSize(4, 256, test="noise_scale", noise_scale_factor=1.5)
    resumed.load_state_dict(first.state_dict())
    run(resumed, values[3:])
    assert resumed.state_dict() == full.state_dict()
    bad = first.state_dict()
    bad["noise_scale"] = bad["noise_scale"] | {"updates": 1.5}
    before = resumed.state_dict()
    with pytest.raises(ValueError, match="updates 1.5"):
        resumed.load_state_dict(bad)
    assert resumed.state_dict() == before


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"test": "noise_scale", "noise_scale_factor": 0.0}, "noise_scale_factor"),
        ({"test": "noise_scale", "noise_scale_factor": math.inf}, "noise_scale_factor"),
        ({"test": "noise_scale", "noise_scale_factor": True}, "noise_scale_factor"),
        ({"test": "noise_scale", "noise_scale": 0.9}, "noise_scale"),
        ({"test": "noise_scale", "eta": -1.0}, "eta"),
        ({"test": ["norm"]}, "test"),
        ({"test": "noise_scale", "noise_scale_min_updates": 0}, "noise_scale_min_updates"),
        ({"test": "noise_scale", "noise_scale_max_growth": 1.0}, "noise_scale_max_growth"),
        ({"test": "noise_scale", "noise_scale_max_growth": math.inf}, "noise_scale_max_growth"),
    ],
)
def test_bad_noise_scale_arguments_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}:"):
        AdaptiveBatchSize(8, 64, **kwargs)
    with pytest.raises(ValueError, match="Invalid statistics"):
        AdaptiveBatchSize(8, 64).step({"variance_trace": 1.0})
