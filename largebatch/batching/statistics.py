"""Gradient-noise statistics for the AdAdaGrad batch-size tests.

The tests of Lau, Liu & Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
Methods" (2024) — after Byrd et al. (2012) and Bollapragada, Byrd & Nocedal (2018) — compare
the sample variance of per-sample gradients g_1, …, g_b with their mean ḡ. With s = ‖ḡ‖²:

    tr(Σ̂)   = Σ_i ‖g_i − ḡ‖² / (b − 1)                                (norm test)
    Var_ip  = Σ_i (⟨g_i, ḡ⟩ − s)² / (b − 1)                           (inner-product test)
    Var_orth = Σ_i ‖g_i − (⟨g_i, ḡ⟩ / s)·ḡ‖² / (b − 1)                (orthogonality test)
    Var_j   = Σ_i (g_ij − ḡ_j)² / (b − 1)   for every coordinate j    (coordinate-wise test)

The same formulas hold for *units* that are not single samples: K micro-batch mean gradients
G_k of m_k samples each, ḡ = Σ_k m_k G_k / Σ_k m_k. Since Cov(G_k) = Σ / m_k, the weighted sum
Σ_k m_k ‖G_k − ḡ‖² has expectation (K − 1)·tr(Σ), so every estimator above becomes
Σ_k m_k (…)² / (K − 1): the variance of micro-batch gradients rescaled by the micro-batch size.
Per-sample gradients are the case m_k = 1.

Two ways to get the units:

* `per_sample_gradients`: `torch.func.functional_call` + `vmap(grad)`. Exact per-sample gradients
  for models whose forward treats samples independently (no BatchNorm in training mode, no
  in-place buffer updates).
* `MicroBatchGradients`: records the gradient of each micro-batch of a gradient-accumulation
  loop. Works with any model; with BatchNorm the units are the gradients the model really
  trains on (each micro-batch normalised by its own statistics).

Under DDP every rank centres its units at the same global mean ḡ, so the per-rank sums add up to
the global sums exactly — the law of total variance with the between-rank term folded in — and
one all-reduce of a handful of float64 sums finishes the job. ḡ itself is the gradient DDP
averages anyway: pass it as `mean_gradient` (e.g. the `.grad` of the parameters after a
synchronised backward); without it, `gradient_statistics` all-reduces the weighted unit sums
first to form it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["GradientStatistics", "gradient_statistics", "per_sample_gradients", "MicroBatchGradients"]

# Sums over units and parameters are accumulated in float64: the tests divide small variances by
# small squared norms late in training, where float32 sums over millions of coordinates lose the
# digits that matter.
STATISTICS_DTYPE = torch.float64


@dataclass(frozen=True)
class GradientStatistics:
    """Sufficient statistics of one batch for every AdAdaGrad test (0-dim float64 tensors).

    Attributes:
        num_units: K, the number of per-sample or micro-batch gradients (over all ranks).
        num_samples: b = Σ_k m_k, the batch size they cover (over all ranks).
        mean_sq_norm: s = ‖ḡ‖².
        variance_trace: tr(Σ̂) = Σ_k m_k ‖G_k − ḡ‖² / (K − 1).
        inner_product_variance: Σ_k m_k (⟨G_k, ḡ⟩ − s)² / (K − 1).
        orthogonal_variance: Σ_k m_k ‖G_k − (⟨G_k, ḡ⟩/s)·ḡ‖² / (K − 1); the projection is taken
            as zero when s = 0.
        mean_gradient: ḡ, one tensor per parameter, in the parameters' shapes.
        coordinate_variance: Σ_k m_k (G_k − ḡ)² / (K − 1) per coordinate, flattened over the
            parameters in order; None unless computed with `coordinatewise=True`.
    """

    num_units: Tensor
    num_samples: Tensor
    mean_sq_norm: Tensor
    variance_trace: Tensor
    inner_product_variance: Tensor
    orthogonal_variance: Tensor
    mean_gradient: tuple[Tensor, ...]
    coordinate_variance: Tensor | None = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 per-sample gradients are upcast one parameter at a time, never the whole stack.
    return torch.promote_types(dtype, torch.float32)


def _world_size(process_group: dist.ProcessGroup | None) -> int:
    return 1 if process_group is None else dist.get_world_size(process_group)


def _weighted_mean(
    units: Sequence[Tensor], weights: Tensor, process_group: dist.ProcessGroup | None
) -> list[Tensor]:
    """ḡ = Σ_k m_k G_k / Σ_k m_k, over all ranks when `process_group` is given."""
    dtypes = [_compute_dtype(g.dtype) for g in units]
    sums = [torch.einsum("k,k...->...", weights.to(dtype), g.detach().to(dtype)) for g, dtype in zip(units, dtypes)]
    if process_group is None:
        total = weights.sum()
        return [s / total for s in sums]
    # One all-reduce of the flattened sums with the total weight appended, in the gradients' own
    # precision: this is the d-sized message DDP would send anyway (sample counts are exact in fp32).
    wire_dtype = functools.reduce(torch.promote_types, dtypes)
    packed = torch.cat([s.flatten().to(wire_dtype) for s in sums] + [weights.sum().reshape(1).to(wire_dtype)])
    dist.all_reduce(packed, group=process_group)
    total = packed[-1]
    means, offset = [], 0
    for s in sums:
        means.append((packed[offset : offset + s.numel()] / total).view_as(s).to(s.dtype))
        offset += s.numel()
    return means


def gradient_statistics(
    unit_gradients: Iterable[Tensor],
    unit_sizes: Tensor | Sequence[int] | None = None,
    *,
    mean_gradient: Iterable[Tensor] | None = None,
    process_group: dist.ProcessGroup | None = None,
    coordinatewise: bool = False,
) -> GradientStatistics:
    """Reduce stacked unit gradients to the statistics of every batch-size test.

    Args:
        unit_gradients: one tensor per parameter, shape (K, *param.shape): row k is the gradient
            of unit k (a sample, or the mean gradient of a micro-batch).
        unit_sizes: m_k, the number of samples behind each unit (K numbers > 0). None means one
            sample per unit (per-sample gradients).
        mean_gradient: ḡ, one tensor per parameter. Must be the m-weighted mean of all units (on
            all ranks); pass the DDP-averaged `.grad` to skip the all-reduce that forms it.
        process_group: reduce over this group (e.g. `torch.distributed.group.WORLD`); None
            computes the statistics of the local units only.
        coordinatewise: also compute the per-coordinate variances for `coordinate_test`
            (all-reduces a vector the size of the model).

    Returns:
        GradientStatistics; nothing in it has been copied to the host.
    """
    units = list(unit_gradients)
    if not units:
        raise ValueError("unit_gradients is empty: pass one (K, *param.shape) tensor per parameter")
    num_units = units[0].shape[0] if units[0].dim() > 0 else 0
    for g in units:
        if g.dim() == 0 or g.shape[0] != num_units:
            raise ValueError(
                f"unit_gradients must share the leading (unit) dimension; got shapes {[tuple(u.shape) for u in units]}"
            )
    world_size = _world_size(process_group)
    if num_units < 1 or num_units * world_size < 2:
        raise ValueError(
            f"unit_gradients holds {num_units} unit(s) on {world_size} rank(s); a variance needs at least two in all"
        )
    device = units[0].device
    if unit_sizes is None:
        weights = torch.ones(num_units, dtype=STATISTICS_DTYPE, device=device)
    else:
        weights = torch.as_tensor(unit_sizes, dtype=STATISTICS_DTYPE, device=device)
        if weights.shape != (num_units,):
            raise ValueError(f"unit_sizes must hold {num_units} numbers, got shape {tuple(weights.shape)}")
        if not bool((weights > 0).all()):
            raise ValueError(f"unit_sizes must be > 0, got {weights.tolist()}")

    if mean_gradient is None:
        means = _weighted_mean(units, weights, process_group)
    else:
        means = [m.detach() for m in mean_gradient]
        if [tuple(m.shape) for m in means] != [tuple(g.shape[1:]) for g in units]:
            raise ValueError(
                "mean_gradient must match the parameter shapes of unit_gradients: "
                f"{[tuple(m.shape) for m in means]} vs {[tuple(g.shape[1:]) for g in units]}"
            )

    mean_sq_norm = torch.zeros((), dtype=STATISTICS_DTYPE, device=device)
    centered_sq = torch.zeros(num_units, dtype=STATISTICS_DTYPE, device=device)  # ‖G_k − ḡ‖²
    centered_inner = torch.zeros(num_units, dtype=STATISTICS_DTYPE, device=device)  # ⟨G_k − ḡ, ḡ⟩ = ⟨G_k,ḡ⟩ − s
    coordinate_parts = []
    for g, m in zip(units, means):
        dtype = _compute_dtype(g.dtype)
        flat_mean = m.reshape(-1).to(dtype)
        # Centre first: the differences keep the noise digits that ‖G_k‖² − ‖ḡ‖² would cancel.
        centered = g.detach().reshape(num_units, -1).to(dtype) - flat_mean
        mean_sq_norm += flat_mean.square().sum(dtype=STATISTICS_DTYPE)
        centered_sq += centered.square().sum(dim=1, dtype=STATISTICS_DTYPE)
        centered_inner += (centered @ flat_mean).to(STATISTICS_DTYPE)
        if coordinatewise:
            coordinate_parts.append(torch.einsum("k,kd->d", weights.to(dtype), centered.square()).to(STATISTICS_DTYPE))

    # ‖G_k − (⟨G_k,ḡ⟩/s)ḡ‖² = ‖G_k − ḡ‖² − (⟨G_k,ḡ⟩ − s)²/s: remove the component along ḡ.
    along_mean = torch.where(mean_sq_norm > 0, centered_inner.square() / mean_sq_norm, 0.0)
    orthogonal_sq = (centered_sq - along_mean).clamp_min(0.0)  # rounding can dip below zero

    sums = torch.stack(
        [
            torch.tensor(float(num_units), dtype=STATISTICS_DTYPE, device=device),
            weights.sum(),
            (weights * centered_sq).sum(),
            (weights * centered_inner.square()).sum(),
            (weights * orthogonal_sq).sum(),
        ]
    )
    coordinate_sums = torch.cat(coordinate_parts) if coordinatewise else None
    if process_group is not None:
        packed = sums if coordinate_sums is None else torch.cat([sums, coordinate_sums])
        dist.all_reduce(packed, group=process_group)
        sums, coordinate_sums = packed[: sums.numel()], (None if coordinate_sums is None else packed[sums.numel() :])

    dof = sums[0] - 1.0
    return GradientStatistics(
        num_units=sums[0],
        num_samples=sums[1],
        mean_sq_norm=mean_sq_norm,
        variance_trace=sums[2] / dof,
        inner_product_variance=sums[3] / dof,
        orthogonal_variance=sums[4] / dof,
        mean_gradient=tuple(means),
        coordinate_variance=None if coordinate_sums is None else coordinate_sums / dof,
    )


def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> dict[str, Tensor]:
    """Per-sample gradients of `loss_fn(model(x_i), y_i)` with `torch.func.vmap(grad)`.

    Each sample is run as a batch of one, so `loss_fn`'s reduction does not matter. The model
    must treat samples independently (use `MicroBatchGradients` for BatchNorm in training mode).
    The model's parameters and `.grad` are left untouched.

    Returns:
        {name: tensor of shape (b, *param.shape)} for every parameter that requires grad, in
        `model.named_parameters()` order.
    """
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets differ in batch size: {inputs.shape[0]} vs {targets.shape[0]}")
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no parameter that requires grad")
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    frozen.update({name: b for name, b in model.named_buffers()})

    def sample_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        output = functional_call(model, (params, frozen), (x.unsqueeze(0),))
        return loss_fn(output, y.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(trainable, inputs, targets)


class MicroBatchGradients:
    """Record the gradient of each micro-batch of a gradient-accumulation loop.

    Call `record(n)` after the backward of every micro-batch of n samples; the micro-batch's
    gradient is the change of `.grad` since the previous record. Each micro-batch loss must be
    the mean over its samples; if it is scaled (e.g. by 1/K for accumulation), pass that factor
    as `loss_scale`. Memory: one copy of the gradients per micro-batch.

    Under DDP run every micro-batch backward inside `model.no_sync()`, so that `.grad` stays
    local, then call `statistics(process_group=...)`: its `mean_gradient` is the averaged
    gradient to step with (`write_mean_gradient()` puts it in `.grad`).

    Example::

        recorder = MicroBatchGradients(model.parameters())
        for x, y in micro_batches:
            loss_fn(model(x), y).backward()
            recorder.record(len(x))
        stats = recorder.statistics()
        recorder.write_mean_gradient(stats)
        optimizer.step()
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        self._params = [p for p in params if p.requires_grad]
        if not self._params:
            raise ValueError("params holds no tensor that requires grad")
        self.clear()

    def clear(self) -> None:
        """Forget the recorded micro-batches; the current `.grad` becomes the new baseline."""
        self._baseline = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self._params]
        self._units: list[list[Tensor]] = [[] for _ in self._params]
        self._sizes: list[int] = []

    def record(self, num_samples: int, loss_scale: float = 1.0) -> None:
        """Record the gradient now in `.grad` as one micro-batch of `num_samples` samples.

        `loss_scale` is the factor the micro-batch loss was multiplied by (undone here).
        """
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"Invalid num_samples: {num_samples!r} (must be an int >= 1)")
        if not loss_scale > 0.0:
            raise ValueError(f"Invalid loss_scale: {loss_scale!r} (must be > 0)")
        for p, units, baseline in zip(self._params, self._units, self._baseline):
            if p.grad is None:
                raise ValueError("record() called before backward(): a parameter has no .grad")
            current = p.grad.detach()
            units.append((current - baseline) / loss_scale)
            baseline.copy_(current)
        self._sizes.append(num_samples)

    @property
    def num_samples(self) -> int:
        """Samples recorded so far, over all micro-batches."""
        return sum(self._sizes)

    def statistics(
        self,
        *,
        mean_gradient: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
        coordinatewise: bool = False,
    ) -> GradientStatistics:
        """`gradient_statistics` of the recorded micro-batches (see there for the arguments)."""
        if not self._sizes:
            raise ValueError("no micro-batch recorded: call record() after each micro-batch backward")
        return gradient_statistics(
            [torch.stack(units) for units in self._units],
            self._sizes,
            mean_gradient=mean_gradient,
            process_group=process_group,
            coordinatewise=coordinatewise,
        )

    def write_mean_gradient(self, statistics: GradientStatistics) -> None:
        """Set `.grad` of the parameters to ḡ, the gradient of the whole batch."""
        for p, mean in zip(self._params, statistics.mean_gradient):
            p.grad = mean.to(p.dtype).clone()
