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
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from largebatch.batching.criteria import DEFAULT_TOLERANCE, batch_size_test
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


def _check_int(name: str, value: Any, minimum: int, what: str | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int >= {what or minimum})")


class AdaptiveBatchSize:
    """Adaptive batch-size controller of AdAdaGrad.

    Args:
        initial_batch_size: b_0 (>= 2: a variance needs two samples). The paper uses 2–8.
        max_batch_size: b_max >= b_0.
        test: "norm" (default), "inner_product", "orthogonality", "augmented_inner_product" or
            "coordinate" (this library's extension for coordinate-wise AdaGrad; needs statistics
            computed with `coordinatewise=True`, see `coordinatewise`).
        eta, theta, nu: the tests' tolerances (norm and coordinate-wise: eta; inner product:
            theta; orthogonality: nu). Smaller means larger batches. Default 0.1 each.
        interval: run the test every `interval` steps (the first step is tested).
        multiple: round every new batch size up to a multiple of this (then cap at b_max), e.g.
            the number of DDP ranks or a tensor-core friendly 8.
        lr_coupling: told `set_batch_size(b)` whenever the batch grows; None (default, right for
            AdaGrad and AdaGrad-Norm) leaves the learning rate alone.

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
    ) -> None:
        _check_int("initial_batch_size", initial_batch_size, 2)
        _check_int("max_batch_size", max_batch_size, initial_batch_size, f"initial_batch_size={initial_batch_size}")
        _check_int("interval", interval, 1)
        _check_int("multiple", multiple, 1)
        if lr_coupling is not None and not isinstance(lr_coupling, BatchSizeCoupling):
            raise ValueError(f"Invalid lr_coupling: {lr_coupling!r} (must have a set_batch_size(int) method)")
        self._test = batch_size_test(test, eta=eta, theta=theta, nu=nu)
        self.test = test
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
        """The test's b_req as a 0-dim tensor (no host sync)."""
        return self._test(statistics)

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
            required = float(self.required_batch_size(statistics))  # the one host sync of a test
            if math.isnan(required):
                raise ValueError(
                    f"the {self.test} test returned NaN at step {self._step_count}: the gradients hold NaN or inf"
                )
            new_batch_size = self._next_batch_size(required)
            self.history.append(BatchSizeRecord(self._step_count, required, new_batch_size))
            if new_batch_size > self._batch_size:
                self._batch_size = new_batch_size
                if self.lr_coupling is not None:
                    self.lr_coupling.set_batch_size(new_batch_size)
        self._step_count += 1
        return self._batch_size

    def state_dict(self) -> dict[str, Any]:
        """The batch size, step count and history, for checkpoints."""
        return {
            "batch_size": self._batch_size,
            "step_count": self._step_count,
            "history": [tuple(record) for record in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`. The learning-rate coupling restores its own state."""
        batch_size = state_dict["batch_size"]
        if not self.initial_batch_size <= batch_size <= self.max_batch_size:
            raise ValueError(
                f"Invalid state_dict: batch_size {batch_size} outside "
                f"[initial_batch_size={self.initial_batch_size}, max_batch_size={self.max_batch_size}]"
            )
        _check_int("state_dict['step_count']", state_dict["step_count"], 0)
        self._batch_size = batch_size
        self._step_count = state_dict["step_count"]
        self.history = [BatchSizeRecord(*record) for record in state_dict["history"]]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size={self._batch_size}, initial_batch_size={self.initial_batch_size}, "
            f"max_batch_size={self.max_batch_size}, test={self.test!r}, interval={self.interval}, "
            f"multiple={self.multiple})"
        )
