"""`AdaptiveBatchSize`: grow the batch when a gradient-variance test asks for it (AdAdaGrad).

Lau, Liu & Kolar (2024), "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods".
Every `interval` steps the chosen test (see `criteria`) turns the gradient statistics of the
current batch into a required size b_req, and

    b_{k+1} = min(b_max, max(b_k, ⌈b_req⌉))        (rounded up to a multiple of `multiple`)

so the batch never shrinks and never exceeds b_max.

Learning rate. The paper pairs the tests with AdaGrad and AdaGrad-Norm and changes no learning
rate when the batch grows: their step size adapts through the accumulated squared gradients,
which shrink by themselves as the batch — and so the gradient noise — grows. That is the default
here (`lr_coupling=None`). With Adam or SGD, pass a batch-size-coupled scheduler such as
`largebatch.schedules.BatchSizeCoupledLR` (anything with `set_batch_size(int)`): it is told every
new size, once, right when the batch grows.

Batch-size warmup from the gradient noise scale (`test="noise_scale"`). McCandlish et al. (2018)
estimate the critical batch size by B_simple = tr(Σ)/|G|², which grows as training converges;
"Critical Batch Size Revisited" (Merrill et al. 2025) warms the batch size up as the critical
batch size grows (they measure it directly, doubting the noise scale as its proxy). This policy
asks for

    b_req = k · B_simple,     so b = clamp(k · B_simple, b_0, b_max), monotone, rounded up to `multiple`

with B_simple from a `GradientNoiseScale` (EMA-smoothed, unbiased |G|²) fed with every test
step's statistics, and k = `noise_scale_factor`. The norm test asks for tr(Σ̂)/(η²‖ḡ‖²): the
same ratio with the biased ‖ḡ‖² = |G|² + tr(Σ)/b, unsmoothed, and k = 1/η². Couple the learning
rate with `lr_coupling=BatchSizeCoupledLR(optimizer, base_batch_size=b_0, rule=...)`: its rule
rescales every group's lr by (b_new/b_old)^e (e: the rule's exponent) at each growth.

B_simple is hard to measure from a batch much smaller than itself (the |G|² estimate drowns in
noise, and can come out <= 0, i.e. B_simple = +inf), so early decisions are noisy:
`noise_scale_min_updates` waits for several measurements, and `noise_scale_max_growth` caps each
decision's growth (2: at most double).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from largebatch.batching._checks import check_int, check_state_dict, is_int
from largebatch.batching.criteria import DEFAULT_TOLERANCE, TEST_NAMES, batch_size_test, check_tolerance
from largebatch.batching.noise_scale import GradientNoiseScale
from largebatch.batching.statistics import GradientStatistics

__all__ = ["AdaptiveBatchSize", "BatchSizeRecord", "BatchSizeCoupling"]


@runtime_checkable
class BatchSizeCoupling(Protocol):
    """What the controller needs of a learning-rate coupling: to be told the new batch size."""

    def set_batch_size(self, batch_size: int) -> None:
        """Take the new batch size (e.g. rescale the learning rate for it)."""


class BatchSizeRecord(NamedTuple):
    """One test: at controller step `step` the test asked for `required`; the batch became `batch_size`."""

    step: int
    required: float
    batch_size: int


NOISE_SCALE_TEST = "noise_scale"
STATE_KEYS = ("batch_size", "step_count", "history")


class AdaptiveBatchSize:
    """Adaptive batch-size controller of AdAdaGrad.

    Args:
        initial_batch_size: b_0 (>= 2: a variance needs two samples). The paper uses 2–8.
        max_batch_size: b_max >= b_0.
        test: "norm" (default), "inner_product", "orthogonality", "augmented_inner_product",
            "coordinate" (this library's extension for coordinate-wise AdaGrad; needs statistics
            computed with `coordinatewise=True`, see `coordinatewise`) or "noise_scale" (the
            batch-size warmup b_req = k·B_simple, see the module docstring).
        eta, theta, nu: the tests' tolerances (norm and coordinate-wise: eta; inner product:
            theta; orthogonality: nu). Smaller means larger batches. Default 0.1 each.
        interval: run the test every `interval` steps (the first step is tested).
        multiple: round every new batch size up to a multiple of this (then cap at b_max), e.g.
            the number of DDP ranks or a tensor-core friendly 8.
        lr_coupling: told `set_batch_size(b)` whenever the batch grows; None (default, right for
            AdaGrad and AdaGrad-Norm) leaves the learning rate alone.
        noise_scale: a `GradientNoiseScale` that every test step's statistics update, whatever
            the test (for logging B_simple; its state is part of this controller's). With
            test="noise_scale" it is the policy's source, and a fresh one is made if None.
        noise_scale_factor: k of the noise-scale policy (> 0): the batch follows k·B_simple.
        noise_scale_min_updates: the noise-scale policy holds the batch until the monitor has
            taken this many measurements (>= 1). At a small batch one estimate of |G|² is noisy
            and can be <= 0 (B_simple = +inf, which would jump straight to b_max).
        noise_scale_max_growth: optionally cap the noise-scale policy's growth per decision at
            this factor (> 1; e.g. 2: at most double, as a doubling warmup does). B_simple cannot
            be measured well from a batch much smaller than itself, so early estimates are
            noisy; the cap bounds the jump one of them can cause. None (default): no cap.

    Usage::

        controller = AdaptiveBatchSize(8, 1024)
        loader = DataLoader(data, batch_sampler=GrowingBatchSampler(data, controller))
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            stats = None
            if controller.needs_statistics:  # before optimizer.step(): same parameters as .grad
                grads = per_sample_gradients(model, loss_fn, x, y)
                stats = gradient_statistics(grads.values(), mean_gradient=[p.grad for p in model.parameters()])
            optimizer.step()
            controller.step(stats)  # the sampler's next batch has the new size
    """

    def __init__(
        self,
        initial_batch_size: int,
        max_batch_size: int,
        *,
        test: str = "norm",
        eta: float = DEFAULT_TOLERANCE,
        theta: float = DEFAULT_TOLERANCE,
        nu: float = DEFAULT_TOLERANCE,
        interval: int = 1,
        multiple: int = 1,
        lr_coupling: BatchSizeCoupling | None = None,
        noise_scale: GradientNoiseScale | None = None,
        noise_scale_factor: float = 1.0,
        noise_scale_min_updates: int = 1,
        noise_scale_max_growth: float | None = None,
    ) -> None:
        check_int("initial_batch_size", initial_batch_size, 2)
        check_int("max_batch_size", max_batch_size, initial_batch_size, f"initial_batch_size={initial_batch_size}")
        check_int("interval", interval, 1)
        check_int("multiple", multiple, 1)
        check_int("noise_scale_min_updates", noise_scale_min_updates, 1)
        if lr_coupling is not None and not isinstance(lr_coupling, BatchSizeCoupling):
            raise ValueError(f"Invalid lr_coupling: {lr_coupling!r} (must have a set_batch_size(int) method)")
        if noise_scale is not None and not isinstance(noise_scale, GradientNoiseScale):
            raise ValueError(f"Invalid noise_scale: {noise_scale!r} (must be a GradientNoiseScale)")
        if (
            isinstance(noise_scale_factor, bool)
            or not isinstance(noise_scale_factor, (int, float))
            or not 0.0 < noise_scale_factor < math.inf
        ):
            raise ValueError(f"Invalid noise_scale_factor: {noise_scale_factor!r} (must be a finite number > 0)")
        if noise_scale_max_growth is not None and (
            isinstance(noise_scale_max_growth, bool)
            or not isinstance(noise_scale_max_growth, (int, float))
            or not 1.0 < noise_scale_max_growth < math.inf
        ):
            raise ValueError(
                f"Invalid noise_scale_max_growth: {noise_scale_max_growth!r} (must be None or a finite number > 1)"
            )
        if test == NOISE_SCALE_TEST:
            for tolerance_name, value in (("eta", eta), ("theta", theta), ("nu", nu)):
                check_tolerance(tolerance_name, value)  # unused here, but a typo must not pass silently
            self._test = None
            noise_scale = GradientNoiseScale() if noise_scale is None else noise_scale
        elif test in TEST_NAMES:
            self._test = batch_size_test(test, eta=eta, theta=theta, nu=nu)
        else:
            raise ValueError(f"Invalid test: {test!r} (must be one of {(*TEST_NAMES, NOISE_SCALE_TEST)})")
        self.test = test
        self.noise_scale = noise_scale
        self.noise_scale_factor = float(noise_scale_factor)
        self.noise_scale_min_updates = noise_scale_min_updates
        self.noise_scale_max_growth = noise_scale_max_growth
        self.initial_batch_size = initial_batch_size
        self.max_batch_size = max_batch_size
        self.interval = interval
        self.multiple = multiple
        self.lr_coupling = lr_coupling
        self._batch_size = initial_batch_size
        self._step_count = 0
        self.history: list[BatchSizeRecord] = []

    @property
    def batch_size(self) -> int:
        """The batch size to train the next step with."""
        return self._batch_size

    @property
    def step_count(self) -> int:
        """How many times `step()` has been called."""
        return self._step_count

    @property
    def needs_statistics(self) -> bool:
        """Whether the next `step()` runs the test (and so needs gradient statistics)."""
        return self._step_count % self.interval == 0

    @property
    def coordinatewise(self) -> bool:
        """Whether the test needs `gradient_statistics(..., coordinatewise=True)`."""
        return self.test == "coordinate"

    def required_batch_size(self, statistics: GradientStatistics) -> Tensor:
        """The test's b_req as a 0-dim tensor (no host sync).

        Not for test="noise_scale", whose b_req depends on the smoothed history: `step()` takes
        the statistics into the monitor and reads k·B_simple from it.
        """
        if self._test is None:
            raise ValueError(
                "required_batch_size is not defined for test='noise_scale' (its b_req is "
                "noise_scale_factor * noise_scale.b_simple after step() takes the statistics in)"
            )
        return self._test(statistics)

    def _required(self, statistics: GradientStatistics) -> float:
        if self._test is None:
            b_simple = self.noise_scale.update_from_statistics(statistics)
            if self.noise_scale.updates < self.noise_scale_min_updates:
                return 0.0  # too few measurements yet: no growth
            required = self.noise_scale_factor * b_simple
            if self.noise_scale_max_growth is not None:
                required = min(required, self.noise_scale_max_growth * self._batch_size)
            return required
        required = float(self._test(statistics))  # a test step syncs with the host (here and below)
        if math.isnan(required) or not bool(
            torch.stack([statistics.variance_trace, statistics.mean_sq_norm]).isfinite().all()
        ):
            raise ValueError(
                f"the {self.test} test returned NaN or got non-finite statistics at step {self._step_count}: "
                "the gradients hold NaN or inf (skip the steps GradScaler skips), or the statistics lack this "
                "test's variances (DDPGradientStatistics records the inner-product ones only with inner_products=True)"
            )
        if self.noise_scale is not None:  # after the test: a failed step changes nothing
            self.noise_scale.update_from_statistics(statistics)
        return required

    def _next_batch_size(self, required: float) -> int:
        if required >= self.max_batch_size:  # also +inf
            return self.max_batch_size
        grown = max(self._batch_size, math.ceil(required))
        grown = math.ceil(grown / self.multiple) * self.multiple
        return min(self.max_batch_size, grown)

    def step(self, statistics: GradientStatistics | None = None) -> int:
        """Count one training step; on test steps, grow the batch as the test asks.

        `statistics` must be given when `needs_statistics` was true before the call; on other
        steps it is not used. Returns the batch size for the next step.
        """
        if self.needs_statistics:
            if statistics is None:
                raise ValueError(
                    f"statistics is None at step {self._step_count}, a test step (interval={self.interval}); "
                    "check needs_statistics before the step"
                )
            if not isinstance(statistics, GradientStatistics):
                raise ValueError(f"Invalid statistics: {statistics!r} (must be a GradientStatistics)")
            required = self._required(statistics)
            new_batch_size = self._next_batch_size(required)
            self.history.append(BatchSizeRecord(self._step_count, required, new_batch_size))
            if new_batch_size > self._batch_size:
                self._batch_size = new_batch_size
                if self.lr_coupling is not None:
                    self.lr_coupling.set_batch_size(new_batch_size)
        self._step_count += 1
        return self._batch_size

    def state_dict(self) -> dict[str, Any]:
        """The batch size, step count and history (and the noise-scale monitor's), for checkpoints."""
        state = {
            "batch_size": self._batch_size,
            "step_count": self._step_count,
            "history": [tuple(record) for record in self.history],
        }
        if self.noise_scale is not None:
            state["noise_scale"] = self.noise_scale.state_dict()
        return state

    def _checked_history(self, history: Any) -> list[BatchSizeRecord]:
        if not isinstance(history, (list, tuple)):
            raise ValueError(f"Invalid state_dict: history {history!r} (must be a list of (step, required, batch_size))")
        records = []
        for record in history:
            if not isinstance(record, (list, tuple)) or len(record) != 3:
                raise ValueError(f"Invalid state_dict: history entry {record!r} (must be (step, required, batch_size))")
            step, required, batch_size = record
            if not (is_int(step) and step >= 0 and is_int(batch_size) and batch_size >= self.initial_batch_size):
                raise ValueError(f"Invalid state_dict: history entry {record!r} (step and batch_size must be ints)")
            if isinstance(required, bool) or not isinstance(required, (int, float)) or math.isnan(required):
                raise ValueError(f"Invalid state_dict: history entry {record!r} (required must be a number)")
            records.append(BatchSizeRecord(step, float(required), batch_size))
        return records

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`. The learning-rate coupling restores its own state.

        The whole state is checked first; on a ValueError the controller is unchanged.
        """
        check_state_dict(state_dict, STATE_KEYS, "AdaptiveBatchSize")
        batch_size, step_count = state_dict["batch_size"], state_dict["step_count"]
        if not is_int(batch_size) or not self.initial_batch_size <= batch_size <= self.max_batch_size:
            raise ValueError(
                f"Invalid state_dict: batch_size {batch_size!r} (must be an int in "
                f"[initial_batch_size={self.initial_batch_size}, max_batch_size={self.max_batch_size}])"
            )
        check_int("state_dict['step_count']", step_count, 0)
        history = self._checked_history(state_dict["history"])
        if ("noise_scale" in state_dict) != (self.noise_scale is not None):
            raise ValueError(
                "Invalid state_dict: it "
                + ("holds" if "noise_scale" in state_dict else "lacks")
                + " a noise_scale state but this controller "
                + ("has no" if self.noise_scale is None else "has a")
                + " GradientNoiseScale"
            )
        if self.noise_scale is not None:
            self.noise_scale.load_state_dict(state_dict["noise_scale"])  # checks first; the last step that can fail
        self._batch_size = batch_size
        self._step_count = step_count
        self.history = history

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size={self._batch_size}, initial_batch_size={self.initial_batch_size}, "
            f"max_batch_size={self.max_batch_size}, test={self.test!r}, interval={self.interval}, "
            f"multiple={self.multiple}, noise_scale={self.noise_scale!r})"
        )
