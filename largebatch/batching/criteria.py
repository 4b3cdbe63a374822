"""The AdAdaGrad batch-size tests: the batch size each one asks for.

Lau, Liu & Kolar (2024), "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods",
after Byrd et al. (2012, norm test) and Bollapragada, Byrd & Nocedal (2018, inner-product and
orthogonality tests). A test passes at batch size b when the estimated variance of the batch
mean gradient is small against the gradient itself; solving each condition for b gives the
batch size it requires. With s = ‖ḡ‖² and the estimators of `statistics.GradientStatistics`:

    norm test                 b_req = tr(Σ̂) / (η² · s)
    inner-product test        b_req = Var_ip / (θ² · s²)
    orthogonality test        b_req = Var_orth / (ν² · s)
    augmented inner-product   b_req = max(inner-product, orthogonality)
    coordinate-wise test      b_req = max_j Var_j / (η² · ḡ_j²)

The coordinate-wise test is this library's extension for coordinate-wise AdaGrad, not a test of
the paper: it asks every coordinate to pass the norm test on its own (Var_j ≤ η²·ḡ_j²·b). It is
strict — one noisy coordinate whose mean gradient is near zero pushes the batch to its maximum —
so it suits small or well-conditioned problems; the norm test is the default elsewhere.

Each function returns a 0-dim float64 tensor and never copies to the host. A variance of zero
asks for nothing (0, even when ḡ = 0); a positive variance with ḡ = 0 asks for +inf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from largebatch.batching.statistics import GradientStatistics

__all__ = [
    "DEFAULT_TOLERANCE",
    "norm_test",
    "inner_product_test",
    "orthogonality_test",
    "augmented_inner_product_test",
    "coordinate_test",
    "batch_size_test",
    "TEST_NAMES",
    "check_tolerance",
]

# η = θ = ν = 0.1: the paper's default for all tests (some of its CIFAR runs use 0.5).
DEFAULT_TOLERANCE = 0.1


def check_tolerance(name: str, value: float) -> None:
    """ValueError naming `name` unless `value` is a number > 0 (a test's η, θ or ν)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a number > 0)")


def _required(variance: Tensor, scale: Tensor) -> Tensor:
    """variance / scale, with 0 where the variance is 0 (no noise asks for no larger batch)."""
    return torch.where(variance == 0, torch.zeros_like(variance), variance / scale)


def norm_test(statistics: GradientStatistics, eta: float = DEFAULT_TOLERANCE) -> Tensor:
    """b_req = tr(Σ̂) / (η²·‖ḡ‖²)."""
    check_tolerance("eta", eta)
    return _required(statistics.variance_trace, eta**2 * statistics.mean_sq_norm)


def inner_product_test(statistics: GradientStatistics, theta: float = DEFAULT_TOLERANCE) -> Tensor:
    """b_req = Var_i(⟨g_i, ḡ⟩) / (θ²·‖ḡ‖⁴)."""
    check_tolerance("theta", theta)
    return _required(statistics.inner_product_variance, theta**2 * statistics.mean_sq_norm.square())


def orthogonality_test(statistics: GradientStatistics, nu: float = DEFAULT_TOLERANCE) -> Tensor:
    """b_req = (Σ_i ‖g_i − (⟨g_i,ḡ⟩/‖ḡ‖²)·ḡ‖² / (b−1)) / (ν²·‖ḡ‖²)."""
    check_tolerance("nu", nu)
    return _required(statistics.orthogonal_variance, nu**2 * statistics.mean_sq_norm)


def augmented_inner_product_test(
    statistics: GradientStatistics, theta: float = DEFAULT_TOLERANCE, nu: float = DEFAULT_TOLERANCE
) -> Tensor:
    """The larger of the inner-product and orthogonality tests."""
    return torch.maximum(inner_product_test(statistics, theta), orthogonality_test(statistics, nu))


def coordinate_test(statistics: GradientStatistics, eta: float = DEFAULT_TOLERANCE) -> Tensor:
    """b_req = max_j Var_j / (η²·ḡ_j²) (this library's extension, see the module docstring)."""
    check_tolerance("eta", eta)
    if statistics.coordinate_variance is None:
        raise ValueError("coordinate_test needs statistics computed with coordinatewise=True")
    dtype = statistics.coordinate_variance.dtype
    mean_sq = torch.cat([m.reshape(-1).to(dtype) for m in statistics.mean_gradient]).square()
    return _required(statistics.coordinate_variance, eta**2 * mean_sq).max()


TEST_NAMES = ("norm", "inner_product", "orthogonality", "augmented_inner_product", "coordinate")


def batch_size_test(
    name: str, *, eta: float = DEFAULT_TOLERANCE, theta: float = DEFAULT_TOLERANCE, nu: float = DEFAULT_TOLERANCE
) -> Callable[[GradientStatistics], Tensor]:
    """The test called `name` (one of `TEST_NAMES`) with its tolerances bound.

    Every tolerance is validated, used or not, so a typo'd value never passes silently.
    """
    for tolerance_name, value in (("eta", eta), ("theta", theta), ("nu", nu)):
        check_tolerance(tolerance_name, value)
    if name == "norm":
        return lambda statistics: norm_test(statistics, eta)
    if name == "inner_product":
        return lambda statistics: inner_product_test(statistics, theta)
    if name == "orthogonality":
        return lambda statistics: orthogonality_test(statistics, nu)
    if name == "augmented_inner_product":
        return lambda statistics: augmented_inner_product_test(statistics, theta, nu)
    if name == "coordinate":
        return lambda statistics: coordinate_test(statistics, eta)
    raise ValueError(f"Invalid test: {name!r} (must be one of {TEST_NAMES})")
