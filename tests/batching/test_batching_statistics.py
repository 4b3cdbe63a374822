"""Gradient statistics against closed-form per-sample gradients of linear regression.

Model f(x) = w·x + c, loss ½(f(x) − y)²: the per-sample gradient is r·(x, 1) with r = f(x) − y.
The oracle below computes every statistic straight from its formula, in float64 loops.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.batching import MicroBatchGradients, gradient_statistics, per_sample_gradients

# ---------------------------------------------------------------------------- the oracle


def closed_form_gradients(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """Row i: the gradient of ½(w·x_i + c − y_i)² with respect to (w, c)."""
    rows = []
    for xi, yi in zip(x, y):
        r = float(np.dot(w, xi) + c - yi)
        rows.append(np.append(r * xi, r))
    return np.array(rows)


def oracle_statistics(units: np.ndarray, sizes: np.ndarray) -> dict:
    """Weighted unit statistics from their definitions (units: K×d, sizes: K)."""
    k = len(units)
    mean = sum(m * g for m, g in zip(sizes, units)) / sizes.sum()
    s = float(mean @ mean)
    trace = sum(m * float((g - mean) @ (g - mean)) for m, g in zip(sizes, units)) / (k - 1)
    inner = sum(m * (float(g @ mean) - s) ** 2 for m, g in zip(sizes, units)) / (k - 1)
    orthogonal = 0.0
    for m, g in zip(sizes, units):
        residual = g - (float(g @ mean) / s) * mean
        orthogonal += m * float(residual @ residual)
    orthogonal /= k - 1
    coordinates = sum(m * (g - mean) ** 2 for m, g in zip(sizes, units)) / (k - 1)
    return {"mean": mean, "s": s, "trace": trace, "inner": inner, "orthogonal": orthogonal, "coordinates": coordinates}


# ---------------------------------------------------------------------------- helpers


def half_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (output - target).square().sum()


def regression_problem(seed: int, batch: int, dim: int, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim))
    y = x @ rng.normal(size=dim) + 0.5 * rng.normal(size=batch)
    model = torch.nn.Linear(dim, 1).to(dtype)
    w, c = rng.normal(size=dim), float(rng.normal())
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w).view(1, dim))
        model.bias.fill_(c)
    xt, yt = torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=dtype).view(batch, 1)
    return model, xt, yt, closed_form_gradients(x, y, w, c)


def assert_statistics_match(stats, oracle, rtol):
    assert float(stats.mean_sq_norm) == pytest.approx(oracle["s"], rel=rtol)
    assert float(stats.variance_trace) == pytest.approx(oracle["trace"], rel=rtol)
    assert float(stats.inner_product_variance) == pytest.approx(oracle["inner"], rel=rtol)
    assert float(stats.orthogonal_variance) == pytest.approx(oracle["orthogonal"], rel=rtol)
    mean = torch.cat([m.reshape(-1) for m in stats.mean_gradient]).double().numpy()
    np.testing.assert_allclose(mean, oracle["mean"], rtol=rtol, atol=1e-12)
    if stats.coordinate_variance is not None:
        np.testing.assert_allclose(stats.coordinate_variance.numpy(), oracle["coordinates"], rtol=rtol)


# ---------------------------------------------------------------------------- vmap path


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(2, 24), dim=st.integers(1, 5))
def test_per_sample_statistics_equal_closed_form(seed, batch, dim):
    model, x, y, closed_form = regression_problem(seed, batch, dim)
    grads = per_sample_gradients(model, half_squared_error, x, y)
    flat = torch.cat([grads["weight"].reshape(batch, -1), grads["bias"].reshape(batch, -1)], dim=1)
    np.testing.assert_allclose(flat.numpy(), closed_form, rtol=1e-12, atol=1e-12)

    stats = gradient_statistics(grads.values(), coordinatewise=True)
    assert float(stats.num_units) == batch and float(stats.num_samples) == batch
    assert_statistics_match(stats, oracle_statistics(closed_form, np.ones(batch)), rtol=1e-9)


def test_float32_statistics_close_to_float64_oracle():
    model, x, y, closed_form = regression_problem(seed=3, batch=64, dim=8, dtype=torch.float32)
    stats = gradient_statistics(per_sample_gradients(model, half_squared_error, x, y).values(), coordinatewise=True)
    # float32 per-sample gradients, float64 sums: ~1e-6 relative rounding, 1e-4 leaves a wide margin.
    assert_statistics_match(stats, oracle_statistics(closed_form, np.ones(64)), rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=10),
    dim=st.integers(1, 4),
)
def test_weighted_units_equal_weighted_formula(seed, sizes, dim):
    rng = np.random.default_rng(seed)
    units = rng.normal(size=(len(sizes), dim)) + rng.normal(size=dim)
    stats = gradient_statistics([torch.as_tensor(units)], sizes, coordinatewise=True)
    assert float(stats.num_samples) == sum(sizes)
    assert_statistics_match(stats, oracle_statistics(units, np.array(sizes, dtype=float)), rtol=1e-9)


def test_given_mean_gradient_is_used_as_the_centre():
    units = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    stats = gradient_statistics([units], mean_gradient=[units.mean(0)])
    reference = gradient_statistics([units])
    assert float(stats.variance_trace) == pytest.approx(float(reference.variance_trace), rel=1e-12)
    # A different centre changes the sums: the argument is not ignored.
    shifted = gradient_statistics([units], mean_gradient=[units.mean(0) + 1.0])
    assert float(shifted.variance_trace) > float(reference.variance_trace)


def test_zero_mean_gradient_takes_no_projection():
    units = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    stats = gradient_statistics([units])
    assert float(stats.mean_sq_norm) == 0.0
    assert float(stats.orthogonal_variance) == pytest.approx(float(stats.variance_trace))
    assert math.isfinite(float(stats.orthogonal_variance))


# ---------------------------------------------------------------------------- micro-batch path


def micro_batch_statistics(model, x, y, micro_batch_size, coordinatewise=False):
    model.zero_grad(set_to_none=True)
    recorder = MicroBatchGradients(model.parameters())
    for xb, yb in zip(x.split(micro_batch_size), y.split(micro_batch_size)):
        (half_squared_error(model(xb), yb) / len(xb)).backward()  # the micro-batch mean loss
        recorder.record(len(xb))
    return recorder, recorder.statistics(coordinatewise=coordinatewise)


def test_micro_batches_of_one_equal_per_sample_statistics():
    model, x, y, closed_form = regression_problem(seed=7, batch=10, dim=3)
    _, stats = micro_batch_statistics(model, x, y, micro_batch_size=1, coordinatewise=True)
    assert_statistics_match(stats, oracle_statistics(closed_form, np.ones(10)), rtol=1e-9)


def test_uneven_micro_batches_equal_weighted_formula():
    model, x, y, closed_form = regression_problem(seed=8, batch=11, dim=3)
    _, stats = micro_batch_statistics(model, x, y, micro_batch_size=4)  # sizes 4, 4, 3
    units = np.array([closed_form[i : i + 4].mean(0) for i in (0, 4, 8)])
    assert_statistics_match(stats, oracle_statistics(units, np.array([4.0, 4.0, 3.0])), rtol=1e-9)


# The micro-batch estimator of a variance uses K = 4096/8 = 512 units: its relative standard
# error is about √(2/511) ≈ 6%. 25% is four standard errors; the data are seeded.
MICRO_BATCH_AGREEMENT_RTOL = 0.25


def test_micro_batch_estimator_agrees_with_vmap_estimator():
    model, x, y, _ = regression_problem(seed=11, batch=4096, dim=4, dtype=torch.float32)
    per_sample = gradient_statistics(per_sample_gradients(model, half_squared_error, x, y).values())
    _, micro = micro_batch_statistics(model, x, y, micro_batch_size=8)
    assert float(micro.mean_sq_norm) == pytest.approx(float(per_sample.mean_sq_norm), rel=1e-4)  # same ḡ
    for name in ("variance_trace", "inner_product_variance", "orthogonal_variance"):
        expected = pytest.approx(float(getattr(per_sample, name)), rel=MICRO_BATCH_AGREEMENT_RTOL)
        assert float(getattr(micro, name)) == expected, name


def test_micro_batch_recorder_with_loss_scale_and_write_mean_gradient():
    model, x, y, closed_form = regression_problem(seed=5, batch=12, dim=2)
    model.zero_grad(set_to_none=True)
    recorder = MicroBatchGradients(model.parameters())
    for xb, yb in zip(x.split(3), y.split(3)):
        (half_squared_error(model(xb), yb) / len(xb) / 4).backward()  # scaled by 1/K for accumulation
        recorder.record(len(xb), loss_scale=0.25)
    stats = recorder.statistics()
    units = np.array([closed_form[i : i + 3].mean(0) for i in range(0, 12, 3)])
    assert_statistics_match(stats, oracle_statistics(units, np.full(4, 3.0)), rtol=1e-9)
    recorder.write_mean_gradient(stats)
    np.testing.assert_allclose(model.weight.grad.reshape(-1).numpy(), closed_form.mean(0)[:2], rtol=1e-12)
    np.testing.assert_allclose(model.bias.grad.numpy(), closed_form.mean(0)[2:], rtol=1e-12)


def test_micro_batch_path_runs_with_batchnorm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    recorder = MicroBatchGradients(model.parameters())
    for xb, yb in zip(x.split(8), y.split(8)):
        torch.nn.functional.mse_loss(model(xb), yb).backward()
        recorder.record(len(xb))
    stats = recorder.statistics()
    assert float(stats.num_units) == 4 and float(stats.num_samples) == 32
    assert math.isfinite(float(stats.variance_trace)) and float(stats.variance_trace) > 0


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_errors_naming_them():
    units = torch.randn(4, 3)
    with pytest.raises(ValueError, match="unit_gradients is empty"):
        gradient_statistics([])
    with pytest.raises(ValueError, match="leading"):
        gradient_statistics([units, torch.randn(5, 2)])
    with pytest.raises(ValueError, match="at least two"):
        gradient_statistics([torch.randn(1, 3)])
    with pytest.raises(ValueError, match="unit_sizes must hold 4"):
        gradient_statistics([units], [1, 2])
    with pytest.raises(ValueError, match="unit_sizes must be > 0"):
        gradient_statistics([units], [1, 0, 1, 1])
    with pytest.raises(ValueError, match="mean_gradient"):
        gradient_statistics([units], mean_gradient=[torch.zeros(2)])
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="batch size"):
        per_sample_gradients(model, half_squared_error, torch.randn(4, 3), torch.randn(3, 1))
    recorder = MicroBatchGradients(model.parameters())
    with pytest.raises(ValueError, match="no micro-batch recorded"):
        recorder.statistics()
    with pytest.raises(ValueError, match="before backward"):
        recorder.record(2)
    with pytest.raises(ValueError, match="num_samples"):
        recorder.record(0)
    with pytest.raises(ValueError, match="loss_scale"):
        recorder.record(1, loss_scale=0.0)
