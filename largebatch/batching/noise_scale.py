"""`GradientNoiseScale`: the simple gradient noise scale B_simple = tr(Σ)/|G|² of McCandlish et al.

McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch Training". With G
the true gradient and Σ the per-sample gradient covariance, the mean gradient G_B of a batch of
B samples has E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes B_small < B_big then give unbiased
estimators of both terms (their Appendix A.1):

    |G|²   ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each is noisy on its own step, so — as in the paper — both are smoothed with exponential moving
averages, and B_simple is the ratio of the averages:

    B_simple = EMA[tr(Σ)] / EMA[|G|²]

(the EMAs start at zero; the same bias correction 1 − βᵗ divides both, so the ratio needs none).
B_simple estimates the critical batch size: below it, doubling the batch nearly halves the steps;
far above it, a larger batch buys few steps. Since |G|² falls as training converges, it grows.

Sources of the two norms:

* One process: the gradient of one micro-batch (or the mean of several micro-batch squared norms,
  all of B_small samples) and the accumulated gradient of the whole batch — `update()` — or the
  statistics of `MicroBatchGradients` / `per_sample_gradients` — `update_from_statistics()`.
* DDP: each rank's local gradient is the small batch and the all-reduced gradient the big one;
  `DDPGradientStatistics` records both norms inside DDP's all-reduce, at no extra backward.
* `torch.nn.utils.clip_grad_norm_` already computes the big batch's norm: pass its square as
  `large_sq_norm` rather than computing it again. (The optimizers' own `max_grad_norm` norm is
  not exposed.)

Both estimators are ratios of squared norms, so a common gradient scale (GradScaler's) cancels in
B_simple; |G|² and tr(Σ) themselves are in the units of the gradients given.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from torch import Tensor

from largebatch.batching._checks import check_int, check_state_dict, is_int
from largebatch.batching.statistics import GradientStatistics

__all__ = ["GradientNoiseScale", "NoiseScaleRecord"]

STATE_KEYS = ("beta", "updates", "ema_gradient_sq_norm", "ema_trace", "history")


class NoiseScaleRecord(NamedTuple):
    """One update: this step's unbiased estimates, and B_simple from the smoothed ones after it."""

    update: int
    gradient_sq_norm: float
    trace: float
    b_simple: float


def _as_float(name: str, value: float | Tensor, minimum: float | None = 0.0) -> float:
    number = float(value) if isinstance(value, Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number or a one-element tensor)")
    if minimum is not None and number < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= {minimum})")
    return float(number)


def _ratio(trace: float, gradient_sq_norm: float) -> float:
    """tr(Σ)/|G|²; no measured noise is 0, noise with no measurable gradient is +inf."""
    if trace <= 0.0:
        return 0.0
    return math.inf if gradient_sq_norm <= 0.0 else trace / gradient_sq_norm


class GradientNoiseScale:
    """EMA-smoothed B_simple = tr(Σ)/|G|² from a small-batch and a large-batch gradient norm.

    Args:
        beta: the EMAs' decay, in [0, 1); 0 keeps only the latest step. The paper smooths both
            estimators but gives no decay; the default 0.95 averages about 20 measurements.

    Example (gradient accumulation over K micro-batches of m samples, no extra backward and no
    gradient copy: the first micro-batch's norm is the small one, clipping gives the big one)::

        monitor = GradientNoiseScale()
        for k, (x, y) in enumerate(micro_batches):
            (loss_fn(model(x), y) / K).backward()
            if k == 0:
                small_sq = K**2 * sum(p.grad.square().sum() for p in params)  # undo the 1/K
        large_sq = torch.nn.utils.clip_grad_norm_(params, max_norm).square()
        monitor.update(small_sq, m, large_sq, K * m)
        log(monitor.b_simple)

    `MicroBatchGradients(...).statistics()` with `update_from_statistics` uses all K
    micro-batches (lower variance) at the cost of one gradient copy per micro-batch.
    """

    def __init__(self, beta: float = 0.95) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta!r} (must be a number in [0, 1))")
        self.beta = float(beta)
        self._updates = 0
        self._ema_gradient_sq_norm = 0.0
        self._ema_trace = 0.0
        self.history: list[NoiseScaleRecord] = []

    @property
    def updates(self) -> int:
        """How many measurements have been taken in."""
        return self._updates

    @property
    def gradient_sq_norm(self) -> float | None:
        """The smoothed, bias-corrected estimate of |G|² (None before the first update)."""
        return None if self._updates == 0 else self._ema_gradient_sq_norm / (1.0 - self.beta**self._updates)

    @property
    def trace(self) -> float | None:
        """The smoothed, bias-corrected estimate of tr(Σ) (None before the first update)."""
        return None if self._updates == 0 else self._ema_trace / (1.0 - self.beta**self._updates)

    @property
    def b_simple(self) -> float | None:
        """B_simple = EMA[tr(Σ)]/EMA[|G|²] (None before the first update; +inf if |G|² ≤ 0)."""
        return None if self._updates == 0 else _ratio(self._ema_trace, self._ema_gradient_sq_norm)

    def update(
        self,
        small_sq_norm: float | Tensor,
        small_batch_size: int,
        large_sq_norm: float | Tensor,
        large_batch_size: int,
    ) -> float:
        """Take in |G_small|² of a batch of `small_batch_size` and |G_big|² of `large_batch_size`.

        `small_sq_norm` may be the mean squared norm of several small batches of that size.
        Returns the new B_simple. One host sync per call (the history holds floats).
        """
        check_int("small_batch_size", small_batch_size, 1)
        if not is_int(large_batch_size) or large_batch_size <= small_batch_size:
            raise ValueError(
                f"Invalid large_batch_size: {large_batch_size!r} (must be an int > small_batch_size={small_batch_size})"
            )
        small = _as_float("small_sq_norm", small_sq_norm)
        large = _as_float("large_sq_norm", large_sq_norm)
        gradient_sq_norm = (large_batch_size * large - small_batch_size * small) / (large_batch_size - small_batch_size)
        trace = (small - large) / (1.0 / small_batch_size - 1.0 / large_batch_size)
        return self._take(gradient_sq_norm, trace)

    def update_from_statistics(self, statistics: GradientStatistics) -> float:
        """Take in `GradientStatistics` (per-sample, micro-batch or DDP): the same two estimators.

        With ḡ the mean of b samples, E‖ḡ‖² = |G|² + tr(Σ)/b, so |G|² ≈ ‖ḡ‖² − tr(Σ̂)/b, and
        tr(Σ̂) (`variance_trace`) is already unbiased. For K equal units of m samples this is
        exactly `update()` with B_small = m, B_big = K·m and |G_small|² their mean squared norm.
        Returns the new B_simple.
        """
        if not isinstance(statistics, GradientStatistics):
            raise ValueError(f"Invalid statistics: {statistics!r} (must be a GradientStatistics)")
        trace = _as_float("statistics.variance_trace", statistics.variance_trace, minimum=None)
        mean_sq_norm = _as_float("statistics.mean_sq_norm", statistics.mean_sq_norm)
        num_samples = _as_float("statistics.num_samples", statistics.num_samples, minimum=1.0)
        return self._take(mean_sq_norm - trace / num_samples, trace)

    def _take(self, gradient_sq_norm: float, trace: float) -> float:
        self._ema_gradient_sq_norm = self.beta * self._ema_gradient_sq_norm + (1.0 - self.beta) * gradient_sq_norm
        self._ema_trace = self.beta * self._ema_trace + (1.0 - self.beta) * trace
        b_simple = _ratio(self._ema_trace, self._ema_gradient_sq_norm)
        self.history.append(NoiseScaleRecord(self._updates, gradient_sq_norm, trace, b_simple))
        self._updates += 1
        return b_simple

    def state_dict(self) -> dict[str, Any]:
        """The EMAs, the update count and the history."""
        return {
            "beta": self.beta,
            "updates": self._updates,
            "ema_gradient_sq_norm": self._ema_gradient_sq_norm,
            "ema_trace": self._ema_trace,
            "history": [tuple(record) for record in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`; everything is checked first, and on a ValueError nothing changes."""
        check_state_dict(state_dict, STATE_KEYS, "GradientNoiseScale")
        if state_dict["beta"] != self.beta:
            raise ValueError(f"Invalid state_dict: saved beta={state_dict['beta']!r} but this monitor has {self.beta!r}")
        updates = state_dict["updates"]
        if not is_int(updates) or updates < 0:
            raise ValueError(f"Invalid state_dict: updates {updates!r} (must be an int >= 0)")
        ema_gradient_sq_norm = _as_float("state_dict['ema_gradient_sq_norm']", state_dict["ema_gradient_sq_norm"], None)
        ema_trace = _as_float("state_dict['ema_trace']", state_dict["ema_trace"], None)
        history = state_dict["history"]
        if not isinstance(history, (list, tuple)) or not all(
            isinstance(r, (list, tuple)) and len(r) == len(NoiseScaleRecord._fields) for r in history
        ):
            raise ValueError(f"Invalid state_dict: history must be a list of {NoiseScaleRecord._fields} tuples")
        self._updates = updates
        self._ema_gradient_sq_norm = ema_gradient_sq_norm
        self._ema_trace = ema_trace
        self.history = [NoiseScaleRecord(*record) for record in history]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta}, updates={self._updates}, b_simple={self.b_simple})"
