r"""Ghost Batch Normalization (Hoffer, Hubara, Soudry 2017, "Train longer, generalize better").

In training, the batch of :math:`N` samples is split into :math:`G = \lceil N/g \rceil` ghost
batches of ``ghost_batch_size`` :math:`g` samples (the last one has :math:`N - (G-1)g`), and each
is normalised with its own statistics: for ghost batch :math:`k` and channel :math:`c`,

.. math::
    y = \frac{x - \mu_{k,c}}{\sqrt{\sigma^2_{k,c} + \epsilon}}\,\gamma_c + \beta_c,

with :math:`\mu_{k,c}, \sigma^2_{k,c}` the mean and biased variance over the ghost batch's
samples and spatial positions. A large batch then keeps the regularising noise of a small one.

A last ghost batch of a single value per channel (one sample, no spatial extent, as for an
:math:`(N, C)` input with :math:`N \equiv 1 \pmod g`) has no variance: that sample joins the ghost
batch before it, which then has :math:`g + 1` samples (and :math:`G = \lfloor N/g \rfloor`).

The running statistics are updated as if the ghost batches had gone through BatchNorm one after
the other, in closed form. With momentum :math:`m`, the EMA applied :math:`G` times gives

.. math::
    r \leftarrow (1 - m)^{G}\, r + \sum_{k=0}^{G-1} m (1 - m)^{G-1-k}\, s_k,

with :math:`s_k` the ghost batch's mean, or its unbiased variance (as BatchNorm keeps). With
``momentum=None`` (BatchNorm's cumulative average, factor :math:`1/n` at the :math:`n`-th batch)
it gives the average over all batches, :math:`r \leftarrow (n_0 r + \sum_k s_k)/(n_0 + G)`, with
:math:`n_0` the batches tracked so far. ``num_batches_tracked`` grows by :math:`G`.

The full ghost batches are normalised by one ``F.batch_norm`` over :math:`G \cdot C` channels (the
batch moved into the channel dimension), and the last, uneven one, if any, by one more call.
A ``channels_last`` (``channels_last_3d``) input gives an output in the same memory format, as
BatchNorm's does, with no more copies than a contiguous input. In eval mode, and whenever the
batch fits in one ghost batch, the module is exactly the torch BatchNorm it subclasses.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "convert_to_ghost_batchnorm",
]


def _channels_last_format(input: Tensor) -> torch.memory_format | None:
    """``channels_last`` (4D) or ``channels_last_3d`` (5D) if ``input`` is laid out so and not also
    contiguous (BatchNorm's output then is in that format too), else None."""
    memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if memory_format is None or input.is_contiguous() or not input.is_contiguous(memory_format=memory_format):
        return None
    return memory_format


def _check_ghost_batch_size(ghost_batch_size: object) -> int:
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, Integral) or ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be a positive integer, got {ghost_batch_size!r}")
    return int(ghost_batch_size)


class _GhostBatchNorm(_BatchNorm):
    """The ghost-batch forward shared by the 1d, 2d and 3d classes."""

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.ghost_batch_size = ghost_batch_size

    @property
    def ghost_batch_size(self) -> int:
        """Samples per ghost batch, ≥ 1; assigning it checks the value."""
        return self._ghost_batch_size

    @ghost_batch_size.setter
    def ghost_batch_size(self, ghost_batch_size: int) -> None:
        self._ghost_batch_size = _check_ghost_batch_size(ghost_batch_size)

    def __setstate__(self, state: dict) -> None:
        # Modules pickled while ghost_batch_size was a plain attribute.
        if "ghost_batch_size" in state:
            state["_ghost_batch_size"] = _check_ghost_batch_size(state.pop("ghost_batch_size"))
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.shape[0] <= self.ghost_batch_size:
            return super().forward(input)
        self._check_input_dim(input)
        return self._ghost_forward(input)

    def _ghost_forward(self, input: Tensor) -> Tensor:
        batch, channels, *spatial = input.shape
        ghost = self.ghost_batch_size
        # As in BatchNorm: the running statistics are updated only while tracked.
        track = self.track_running_stats and self.running_mean is not None
        if channels != self.num_features and (self.weight is not None or track):
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input of {channels} channels "
                f"(shape {tuple(input.shape)}): its channel dimension must be num_features={self.num_features}"
            )
        values_per_channel = math.prod(spatial)
        if ghost * values_per_channel == 1:
            raise ValueError(
                f"ghost_batch_size 1 with spatial size {tuple(spatial)} leaves a single value per channel "
                "in every ghost batch: its variance is undefined; use ghost_batch_size >= 2"
            )
        full, rest = divmod(batch, ghost)
        if rest * values_per_channel == 1:  # no variance in a last ghost batch of one value
            full, rest = full - 1, rest + ghost
            if full == 0:  # batch = g + 1: one ghost batch, BatchNorm itself
                return super().forward(input)
        # One split, not two slices: its backward is one concatenation, not two zero-filled copies.
        head, tail = input.split([full * ghost, rest]) if rest else (input, None)

        # Full ghost batches: (full·g, C, *S) → (g, full·C, *S), so that each (ghost, channel)
        # pair is one channel of a single F.batch_norm. Momentum 1 makes it write each pair's
        # mean and unbiased variance into the scratch buffers, exactly, for the running update.
        # The reshapes work in memory order (channels last, or right after the batch), so that
        # a channels_last input stays channels_last with the copies of a contiguous one.
        memory_format = _channels_last_format(input)
        channels_last = memory_format is not None
        layout = head.movedim(1, -1) if channels_last else head  # a view in memory order
        channel_axis = layout.dim() - 1 if channels_last else 1  # of layout; full·C goes there
        stacked = layout.reshape(full, ghost, *layout.shape[1:]).movedim(0, channel_axis)
        stacked = stacked.flatten(channel_axis, channel_axis + 1)
        stacked = stacked.movedim(-1, 1) if channels_last else stacked
        means, variances = self._scratch_stats(full * channels) if track else (None, None)
        weight = None if self.weight is None else self.weight.repeat(full)
        bias = None if self.bias is None else self.bias.repeat(full)
        normalized = F.batch_norm(stacked, means, variances, weight, bias, True, 1.0, self.eps)

        normalized = normalized.movedim(1, -1) if channels_last else normalized
        output = normalized.unflatten(channel_axis, (full, channels)).movedim(channel_axis, 0)
        output = output.reshape(full * ghost, *layout.shape[1:])
        output = output.movedim(-1, 1) if channels_last else output
        ghost_means = [means.view(full, channels)] if track else []
        ghost_variances = [variances.view(full, channels)] if track else []
        if tail is not None:
            rest_means, rest_variances = self._scratch_stats(channels) if track else (None, None)
            rest_output = F.batch_norm(tail, rest_means, rest_variances, self.weight, self.bias, True, 1.0, self.eps)
            output = torch.cat([output, rest_output])
            if track:
                ghost_means.append(rest_means.view(1, channels))
                ghost_variances.append(rest_variances.view(1, channels))
        if track:
            self._update_running_stats(torch.cat(ghost_means), torch.cat(ghost_variances))
        if channels_last:  # a no-op but where a ghost batch of one sample left its format ambiguous
            output = output.contiguous(memory_format=memory_format)
        return output

    def _scratch_stats(self, size: int) -> tuple[Tensor, Tensor]:
        """Buffers for F.batch_norm to write per-channel batch statistics into (momentum 1)."""
        like = self.running_mean
        return like.new_zeros(size), like.new_ones(size)

    @torch.no_grad()
    def _update_running_stats(self, ghost_means: Tensor, ghost_variances: Tensor) -> None:
        """Apply BatchNorm's running update once per ghost batch, in order, in closed form.

        ``ghost_means`` and ``ghost_variances`` are (G, C): per ghost batch, the mean and the
        unbiased variance.
        """
        count = ghost_means.shape[0]
        tracked = self.num_batches_tracked
        if self.momentum is None:
            if tracked is None:
                return  # BatchNorm's averaging factor is then 0: the statistics stay as they are.
            # Cumulative average: r_n = r_{n−1} + (s_n − r_{n−1})/n  ⇒  r = (n0·r + Σ s)/(n0 + G).
            for running, stats in ((self.running_mean, ghost_means), (self.running_var, ghost_variances)):
                running.mul_(tracked).add_(stats.sum(0)).div_(tracked + count)
        else:
            keep = 1.0 - self.momentum
            # Weight of ghost batch k: m(1 − m)^(G−1−k), the later ones weigh more.
            powers = torch.arange(count - 1, -1, -1, device=ghost_means.device, dtype=ghost_means.dtype)
            weights = self.momentum * keep**powers
            for running, stats in ((self.running_mean, ghost_means), (self.running_var, ghost_variances)):
                running.mul_(keep**count).add_(weights @ stats)
        if tracked is not None:
            tracked.add_(count)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    r"""Ghost BatchNorm over a 2D or 3D input, :math:`(N, C)` or :math:`(N, C, L)`.

    A :class:`torch.nn.BatchNorm1d` whose training-mode forward normalises each ghost batch of
    ``ghost_batch_size`` samples separately (see :mod:`largebatch.nn.ghost_batchnorm`).

    Args:
        num_features: :math:`C`.
        ghost_batch_size: samples per ghost batch, ≥ 1; the paper's experiments use 128.
        eps, momentum, affine, track_running_stats, device, dtype: as in BatchNorm1d;
            ``momentum=None`` keeps the cumulative average, over ghost batches.
    """


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    r"""Ghost BatchNorm over a 4D input :math:`(N, C, H, W)`.

    A :class:`torch.nn.BatchNorm2d` whose training-mode forward normalises each ghost batch of
    ``ghost_batch_size`` samples separately (see :mod:`largebatch.nn.ghost_batchnorm`).

    Args:
        num_features: :math:`C`.
        ghost_batch_size: samples per ghost batch, ≥ 1; the paper's experiments use 128.
        eps, momentum, affine, track_running_stats, device, dtype: as in BatchNorm2d;
            ``momentum=None`` keeps the cumulative average, over ghost batches.
    """


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    r"""Ghost BatchNorm over a 5D input :math:`(N, C, D, H, W)`.

    A :class:`torch.nn.BatchNorm3d` whose training-mode forward normalises each ghost batch of
    ``ghost_batch_size`` samples separately (see :mod:`largebatch.nn.ghost_batchnorm`).

    Args:
        num_features: :math:`C`.
        ghost_batch_size: samples per ghost batch, ≥ 1; the paper's experiments use 128.
        eps, momentum, affine, track_running_stats, device, dtype: as in BatchNorm3d;
            ``momentum=None`` keeps the cumulative average, over ghost batches.
    """


_GHOST_CLASSES: dict[type[_BatchNorm], type[_GhostBatchNorm]] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
}


def _ghost_class(module: nn.Module) -> type[_GhostBatchNorm] | None:
    for batchnorm_class, ghost_class in _GHOST_CLASSES.items():
        if isinstance(module, batchnorm_class):
            return ghost_class
    return None


def convert_to_ghost_batchnorm(module: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` in ``module`` by the matching Ghost BatchNorm.

    Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the new modules share the old
    ones' weight and bias parameters (an optimizer built before the conversion keeps working) and
    running-statistics buffers, and keep their training mode. Ghost BatchNorm modules are
    converted too, to the new ``ghost_batch_size``. ``SyncBatchNorm`` and the lazy BatchNorm
    classes, which are not subclasses of ``BatchNorm1d/2d/3d``, are left alone.

    Args:
        module: the module (or model) to convert.
        ghost_batch_size: samples per ghost batch, ≥ 1.

    Returns:
        The converted module: a new one if ``module`` is itself a BatchNorm, else ``module``,
        converted in place.
    """
    size = _check_ghost_batch_size(ghost_batch_size)
    ghost_class = _ghost_class(module)
    converted = module
    if ghost_class is not None:
        converted = ghost_class(
            module.num_features,
            ghost_batch_size=size,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_to_ghost_batchnorm(child, size))
    return converted
