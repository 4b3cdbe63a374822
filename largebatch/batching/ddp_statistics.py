"""Batch-size statistics from DDP's own all-reduce: no per-sample gradients, no extra backward.

Under ``DistributedDataParallel`` with W ranks of m samples each, the gradient g_r a rank holds
before the all-reduce is the mean gradient of a small batch, and the reduced G = (1/W) Σ_r g_r is
the gradient of the whole batch of b = W·m. These are W units of m samples for the estimators of
`statistics` (the law of total variance with K = W), and the two norms of the gradient noise scale
(McCandlish et al. 2018, Appendix A). `gradient_statistics_hook` is a DDP comm hook that does
DDP's usual mean all-reduce and, on the steps it is asked to, records per bucket:

* always: ‖G‖² and, before the reduction, ‖g_r‖² (no copy of the gradients);
* with ``inner_products=True``: ‖g_r − G‖² and ⟨g_r − G, G⟩, from a copy of the bucket held
  while its all-reduce runs (one bucket at a time, as DDP's own hooks do).

`DDPGradientStatistics.statistics()` then sums the buckets and all-reduces four float64 numbers
(six with ``inner_products=True``):

    tr(Σ̂)    = Σ_r ‖g_r − G‖² / D              with Σ_r ‖g_r − G‖² = Σ_r ‖g_r‖² − W‖G‖²
    Var_ip   = Σ_r ⟨g_r − G, G⟩² / D
    Var_orth = Σ_r (‖g_r − G‖² − ⟨g_r − G, G⟩²/‖G‖²) / D
    D        = (1 − 1/W) · Σ_r 1/m_r           (= (W − 1)/m for equal local batches)

Since Cov(g_r) = Σ/m_r and G is the unweighted mean DDP forms, E Σ_r ‖g_r − G‖² = (1 − 1/W)·
Σ_r tr(Σ)/m_r, so these are unbiased for unequal local batches too (an epoch's tail); for equal
ones they equal `gradient_statistics` of the W rank gradients with unit sizes m.

Which AdAdaGrad tests this serves:

* norm test and `GradientNoiseScale`: yes, from the two norms alone. The difference
  Σ‖g_r‖² − W‖G‖² cancels digits when the noise is tiny against the gradient (fp32 gradients,
  float64 sums); ``inner_products=True`` centres first and does not.
* inner-product, orthogonality and augmented tests: yes, with ``inner_products=True``.
* coordinate-wise test: no. It needs Σ_r (g_rj − G_j)² for every coordinate j, a second
  all-reduce the size of the model: use `MicroBatchGradients` or `per_sample_gradients` with
  `gradient_statistics(..., coordinatewise=True)`.

There are only W units, so each step's estimate has W − 1 degrees of freedom, against b − 1 for
per-sample gradients: with few ranks, smooth it (`GradientNoiseScale`, or the controller's
`test="noise_scale"`), or split each rank's batch into micro-batches with `MicroBatchGradients`
under ``no_sync()`` for K·W units. All estimators are ratios of squared norms in the tests, so a
common gradient scale (GradScaler's, the gradient-accumulation 1/K) cancels in every b_req. On a
step GradScaler skips (inf/NaN gradients) the statistics are not finite and the controller and
`GradientNoiseScale` refuse them with a ValueError: skip the controller step there too.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at registration.
import torch
import torch.distributed as dist
from torch import Tensor

from largebatch.batching._checks import check_int
from largebatch.batching.statistics import STATISTICS_DTYPE, GradientStatistics

__all__ = ["DDPGradientStatistics", "gradient_statistics_hook"]


def _sq_norm(tensor: Tensor) -> Tensor:
    return torch.linalg.vector_norm(tensor, dtype=STATISTICS_DTYPE).square()


class DDPGradientStatistics:
    """State of `gradient_statistics_hook`: what the hook recorded, and the final reduction.

    Construct it on every rank, register it with
    ``ddp_model.register_comm_hook(state, gradient_statistics_hook)``, and on the steps that need
    statistics call `record_next_backward` before the backward and `statistics()` after it::

        state = DDPGradientStatistics()
        ddp_model.register_comm_hook(state, gradient_statistics_hook)
        for x, y in loader:                                    # x: this rank's slice
            optimizer.zero_grad()
            if controller.needs_statistics:
                state.record_next_backward(len(x))
            loss_fn(ddp_model(x), y).backward()                # the usual all-reduce, plus norms
            stats = state.statistics() if controller.needs_statistics else None
            optimizer.step()
            controller.step(stats)                             # identical on every rank

    Args:
        process_group: the group DDP reduces over (default: the default group); at least 2 ranks.
        inner_products: also record what the inner-product, orthogonality and augmented tests
            need (holds a copy of each bucket during its all-reduce). Without it those fields of
            the statistics are NaN.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, inner_products: bool = False) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("DDPGradientStatistics needs torch.distributed to be initialised first")
        if not isinstance(inner_products, bool):
            raise ValueError(f"Invalid inner_products: {inner_products!r} (must be a bool)")
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        if self.world_size < 2:
            raise ValueError(
                f"Invalid process_group: world size {self.world_size}; a variance across ranks needs at least 2"
            )
        self.inner_products = inner_products
        self._local_batch_size: int | None = None
        self._parts: list[Tensor] = []  # per bucket: the float64 partial sums (see `statistics`)
        self._params: list[Tensor] = []

    @property
    def recording(self) -> bool:
        """Whether the hook records the coming (or running) backward."""
        return self._local_batch_size is not None

    def record_next_backward(self, local_batch_size: int) -> None:
        """Record the statistics of the next synchronised backward, of `local_batch_size` samples here.

        Under gradient accumulation (micro-batches in ``no_sync()``, then one synchronised
        backward) it is the number of samples accumulated on this rank.
        """
        check_int("local_batch_size", local_batch_size, 1)
        self._local_batch_size = local_batch_size
        self._parts, self._params = [], []

    def _add(self, params: list[Tensor], parts: list[Tensor]) -> None:
        self._params.extend(params)
        self._parts.append(torch.stack(parts))

    def statistics(self) -> GradientStatistics:
        """The recorded backward's statistics over all ranks: one all-reduce of 4 (or 6) float64 numbers.

        Every rank gets the same values. `mean_gradient` holds the parameters' ``.grad`` (the
        reduced gradient, not copied) in DDP's bucket order; `coordinate_variance` is None.
        Recording stops.
        """
        if self._local_batch_size is None:
            raise ValueError("statistics() called without record_next_backward() before the backward")
        if not self._parts:
            raise ValueError(
                "no gradient bucket was recorded: run the backward of the DDP model that "
                "gradient_statistics_hook is registered on, outside no_sync()"
            )
        sums = torch.stack(self._parts).sum(0)
        m = float(self._local_batch_size)
        one = torch.ones((), dtype=STATISTICS_DTYPE, device=sums.device)
        if self.inner_products:
            centered_sq, centered_inner, mean_sq_norm = sums
            along_mean = torch.where(mean_sq_norm > 0, centered_inner.square() / mean_sq_norm, 0.0)
            orthogonal_sq = (centered_sq - along_mean).clamp_min(0.0)  # rounding can dip below zero
            rank_sums = [centered_sq, centered_inner.square(), orthogonal_sq]
        else:
            local_sq, mean_sq_norm = sums
            rank_sums = [local_sq]
        packed = torch.stack([one, one * m, one / m, *rank_sums])
        dist.all_reduce(packed, group=self.process_group)
        num_units, num_samples, inverse_sizes = packed[0], packed[1], packed[2]
        dof = (1.0 - 1.0 / num_units) * inverse_sizes
        if self.inner_products:
            variance_trace, inner_variance, orthogonal_variance = packed[3] / dof, packed[4] / dof, packed[5] / dof
        else:
            # Σ_r ‖g_r − G‖² = Σ_r ‖g_r‖² − W‖G‖² because G is the plain mean of the g_r.
            variance_trace = (packed[3] - num_units * mean_sq_norm).clamp_min(0.0) / dof
            inner_variance = orthogonal_variance = torch.full_like(variance_trace, float("nan"))
        statistics = GradientStatistics(
            num_units=num_units,
            num_samples=num_samples,
            mean_sq_norm=mean_sq_norm,
            variance_trace=variance_trace,
            inner_product_variance=inner_variance,
            orthogonal_variance=orthogonal_variance,
            mean_gradient=tuple(p.grad for p in self._params),
        )
        self._local_batch_size = None
        self._parts, self._params = [], []
        return statistics


def gradient_statistics_hook(state: DDPGradientStatistics, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: the mean all-reduce of DDP's default hook, recording norms when asked.

    Register with ``ddp_model.register_comm_hook(state, gradient_statistics_hook)``.
    """
    buffer = bucket.buffer()
    if not state.recording:
        buffer.div_(state.world_size)
        reduced = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()
        return reduced.then(lambda fut: fut.value()[0])

    params = list(bucket.parameters())
    # Before the in-place reduction: this rank's gradient g_r (a copy only when inner products need it).
    local = buffer.clone() if state.inner_products else None
    local_sq = None if state.inner_products else _sq_norm(buffer)
    buffer.div_(state.world_size)
    reduced = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()

    def finish(fut: torch.futures.Future) -> Tensor:
        mean = fut.value()[0]
        if local is None:
            state._add(params, [local_sq, _sq_norm(mean)])
        else:
            centered = local.sub_(mean)
            state._add(params, [_sq_norm(centered), (centered * mean).sum(dtype=STATISTICS_DTYPE), _sq_norm(mean)])
        return mean

    return reduced.then(finish)
