"""Fused LARS (You, Gitman, Ginsburg 2017) on the multi-tensor engine.

For each tensor x with gradient g (see largebatch.optimizers.LARS):

    g' = ±g / grad_scale
    local = η·‖x‖ / (‖g'‖ + λ·‖x‖ + eps)   (1 where ‖x‖ or ‖g'‖ is 0; min(local / lr, 1) with
                                            trust_clip; 1 without adaptation)
    d = local·(g' + λ·x)                   (·lr with lr_in_momentum)
    buf ← μ·buf + (1 − dampening)·d        step = d + μ·buf (nesterov) or buf (or d when μ = 0)
    x ← x − lr·step                        (x ← x − step with lr_in_momentum)

Passes per (device, dtypes) group, each one launch: with adaptation, per-chunk Σx², Σg'², then
`segment_sums`, then the update; without, the update alone. Bytes per fp32 parameter with
momentum and adaptation: read x, g; then read x, g, buf and write buf, x: 28.

The update never reads the step counter, but it still counts it (the program of each tensor's
first chunk adds 1, found_inf permitting), in the update pass rather than a launch of its own:
the per-tensor path counts it too, so fused and non-fused optimizers keep identical state_dicts
(a checkpoint moves between them), and `step` is the count torch.optim's states carry.

With Kahan compensation buffers c (bf16/fp16 parameters, `kahan_sum`), x is p + c in both
passes and the update Kahan-adds −lr·step to p (see `_compensated.store_compensated`). With an
8-bit buffer (`state_dtype="8bit"`), the update pass dequantises it, steps with the exact
float32 buffer and stores its new codes (`_blockwise`).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from largebatch.optimizers._sharding import ShardReduction, complete_squares

from ._engine import (
    chunk_of,
    current_lr,
    dtype_constexprs,
    gradient_multiplier,
    launch,
    locate_chunk,
    lr_arguments,
    mark_written,
    scalar_on,
    tensor_pointer,
)
from ._blockwise import load_state, quantised_lists, rounded_like_stored, store_state, tables_of
from ._compensated import compensated_buckets, kernel_pointers, load_compensation, store_compensated
from ._norms import segment_sums
from ._plan import Bucket

__all__ = ["fused_lars", "lars_layout"]


def lars_layout(has_momentum: bool) -> dict[str, int]:
    """The lists of a LARS bucket: param, grad (and momentum buffer) walked in chunks, then the
    step counters, which the update pass counts: all in the kernels' table."""
    n_elementwise = 3 if has_momentum else 2
    return {"n_elementwise": n_elementwise, "n_table": n_elementwise + 1}


@triton.jit
def _norms_chunk(
    param_ptrs, grad_ptrs, comp_ptrs, tensor, partial, offsets, numel, inv_scale,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, KAHAN: tl.constexpr, ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    param = tensor_pointer(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    grad = tensor_pointer(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    mask = offsets < numel if MASKED else None
    other = 0.0 if MASKED else None
    x = tl.load(param + offsets, mask=mask, other=other).to(tl.float32)
    if KAHAN:
        x = x + load_compensation(comp_ptrs, tensor, offsets, mask, other, PARAM_DTYPE, ALIGNED)
    g = tl.load(grad + offsets, mask=mask, other=other).to(tl.float32) * inv_scale
    tl.store(partial, tl.sum(x * x, axis=0))
    tl.store(partial + 1, tl.sum(g * g, axis=0))


@triton.jit
def _norms_kernel(
    n_chunks, chunk_tensors, numels, first_chunks, aligned, param_ptrs, grad_ptrs, buf_ptrs, step_ptrs, buf_scale_ptrs,
    comp_ptrs, partials, grad_scale, found_inf,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, KAHAN: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Pass 1: partials[c] = (Σx², Σ(g / grad_scale)²) of chunk c."""
    if found_inf is not None:
        if tl.load(found_inf) != 0:
            return
    inv_scale = 1.0
    if grad_scale is not None:
        inv_scale = 1.0 / tl.load(grad_scale)
    for index in range(CHUNKS_PER_PROGRAM):
        chunk, exists = chunk_of(n_chunks, index, CHUNKS_PER_PROGRAM)
        if exists:
            tensor, numel, offsets, full_chunk, vector_aligned = locate_chunk(
                chunk, chunk_tensors, numels, first_chunks, aligned, CHUNK_SIZE
            )
            partial = partials + 2 * chunk
            if full_chunk:
                if vector_aligned:
                    _norms_chunk(param_ptrs, grad_ptrs, comp_ptrs, tensor, partial, offsets, numel, inv_scale,
                                 PARAM_DTYPE, GRAD_DTYPE, KAHAN, True, False)  # fmt: skip
                else:
                    _norms_chunk(param_ptrs, grad_ptrs, comp_ptrs, tensor, partial, offsets, numel, inv_scale,
                                 PARAM_DTYPE, GRAD_DTYPE, KAHAN, False, False)  # fmt: skip
            else:
                _norms_chunk(param_ptrs, grad_ptrs, comp_ptrs, tensor, partial, offsets, numel, inv_scale,
                             PARAM_DTYPE, GRAD_DTYPE, KAHAN, False, True)  # fmt: skip


@triton.jit
def _update_chunk(
    param_ptrs, grad_ptrs, buf_ptrs, buf_scale_ptrs, comp_ptrs, code_maps, midpoints, tensor, offsets, numel,
    grad_multiplier, direction_scale, lr, momentum, dampening_complement, weight_decay,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, BUF_DTYPE: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, LR_IN_MOMENTUM: tl.constexpr, KAHAN: tl.constexpr,
    ALIGNED: tl.constexpr, MASKED: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):  # fmt: skip
    param = tensor_pointer(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    grad = tensor_pointer(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    mask = offsets < numel if MASKED else None
    other = 0.0 if MASKED else None
    stored = tl.load(param + offsets, mask=mask, other=other).to(tl.float32)
    x = stored
    if KAHAN:
        comp = load_compensation(comp_ptrs, tensor, offsets, mask, other, PARAM_DTYPE, ALIGNED)
        x = stored + comp
    g = tl.load(grad + offsets, mask=mask, other=other).to(tl.float32) * grad_multiplier
    direction = (g + weight_decay * x) * direction_scale
    if MOMENTUM:
        b = momentum * load_state(buf_ptrs, buf_scale_ptrs, code_maps, tensor, offsets, mask, other, BUF_DTYPE, ALIGNED)
        b = rounded_like_stored(b + dampening_complement * direction, buf_scale_ptrs, BUF_DTYPE)
        store_state(buf_ptrs, buf_scale_ptrs, midpoints, tensor, offsets, mask, numel, b, BUF_DTYPE, ALIGNED, MASKED,
                    CHUNK_SIZE)  # fmt: skip
        if NESTEROV:
            step = direction + momentum * b
        else:
            step = b
    else:
        step = direction
    if not LR_IN_MOMENTUM:
        step = lr * step
    if KAHAN:
        store_compensated(param_ptrs, comp_ptrs, tensor, offsets, mask, stored, comp, -step, PARAM_DTYPE, ALIGNED)
    else:
        tl.store(param + offsets, (x - step).to(PARAM_DTYPE), mask=mask)


@triton.jit
def _update_kernel(
    n_chunks, chunk_tensors, numels, first_chunks, aligned, param_ptrs, grad_ptrs, buf_ptrs, step_ptrs, buf_scale_ptrs,
    comp_ptrs, norms_sq, lr_tensor, grad_scale, found_inf, code_maps, midpoints,
    lr, momentum, dampening_complement, weight_decay, trust_coefficient, eps,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, BUF_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, LR_IN_MOMENTUM: tl.constexpr, KAHAN: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """The update, with the local rate from norms_sq[i] = (‖x‖², ‖g'‖²) when ADAPT; counts the
    step of each tensor at its first chunk."""
    if found_inf is not None:
        if tl.load(found_inf) != 0:
            return
    grad_multiplier = gradient_multiplier(grad_scale, None, MAXIMIZE)
    lr = current_lr(lr_tensor, lr)
    for index in range(CHUNKS_PER_PROGRAM):
        chunk, exists = chunk_of(n_chunks, index, CHUNKS_PER_PROGRAM)
        if exists:
            tensor, numel, offsets, full_chunk, vector_aligned = locate_chunk(
                chunk, chunk_tensors, numels, first_chunks, aligned, CHUNK_SIZE
            )
            if chunk == tl.load(first_chunks + tensor):
                counter = tensor_pointer(step_ptrs, tensor, tl.float32, False)
                tl.store(counter, tl.load(counter) + 1.0)
            direction_scale = 1.0
            if ADAPT:
                param_norm = tl.sqrt(tl.load(norms_sq + 2 * tensor))
                grad_norm = tl.sqrt(tl.load(norms_sq + 2 * tensor + 1))
                adaptable = (param_norm > 0) & (grad_norm > 0)
                denominator = tl.where(adaptable, grad_norm + weight_decay * param_norm + eps, 1.0)
                direction_scale = tl.where(adaptable, trust_coefficient * param_norm / denominator, 1.0)
                if TRUST_CLIP:
                    direction_scale = tl.minimum(direction_scale / lr, 1.0)
            if LR_IN_MOMENTUM:
                direction_scale = direction_scale * lr
            if full_chunk:
                if vector_aligned:
                    _update_chunk(
                        param_ptrs, grad_ptrs, buf_ptrs, buf_scale_ptrs, comp_ptrs, code_maps, midpoints, tensor, offsets, numel,
                        grad_multiplier, direction_scale, lr, momentum, dampening_complement, weight_decay,
                        PARAM_DTYPE, GRAD_DTYPE, BUF_DTYPE, MOMENTUM, NESTEROV, LR_IN_MOMENTUM, KAHAN, True, False, CHUNK_SIZE,
                    )  # fmt: skip
                else:
                    _update_chunk(
                        param_ptrs, grad_ptrs, buf_ptrs, buf_scale_ptrs, comp_ptrs, code_maps, midpoints, tensor, offsets, numel,
                        grad_multiplier, direction_scale, lr, momentum, dampening_complement, weight_decay,
                        PARAM_DTYPE, GRAD_DTYPE, BUF_DTYPE, MOMENTUM, NESTEROV, LR_IN_MOMENTUM, KAHAN, False, False, CHUNK_SIZE,
                    )  # fmt: skip
            else:
                _update_chunk(
                    param_ptrs, grad_ptrs, buf_ptrs, buf_scale_ptrs, comp_ptrs, code_maps, midpoints, tensor, offsets, numel,
                    grad_multiplier, direction_scale, lr, momentum, dampening_complement, weight_decay,
                    PARAM_DTYPE, GRAD_DTYPE, BUF_DTYPE, MOMENTUM, NESTEROV, LR_IN_MOMENTUM, KAHAN, False, True, CHUNK_SIZE,
                )  # fmt: skip


def fused_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None = None,
    momentum_buffer_scales: list[Tensor] | None = None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    adapt: bool,
    lr_in_momentum: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    shard_reduction: ShardReduction | None = None,
    buckets: list[Bucket] | None = None,
) -> None:
    """One LARS step over the given tensors, in place (see the module docstring).

    `momentum_buffers` is None exactly when momentum is 0. The caller's gradients are read,
    never written. `shard_reduction` sums the per-tensor squares over the shard ranks (one
    all-reduce per (device, dtype) group) when the tensors are local shards. With `found_inf`
    nonzero nothing changes, step counters included. `buckets`: see `fused_lamb`. The kernels
    never read the step counters; the update pass still counts them, so that the state matches
    the per-tensor implementation's (see the module docstring). `kahan_comps`,
    `momentum_buffer_scales` (8-bit buffers): see `fused_lamb`.
    """
    has_momentum = momentum_buffers is not None
    if has_momentum == (momentum == 0):
        raise ValueError("momentum_buffers must be given exactly when momentum != 0")
    layout = lars_layout(has_momentum)
    if buckets is None:
        lists, scaled_layout = quantised_lists(
            [params, grads, *([momentum_buffers] if has_momentum else []), state_steps], layout, [momentum_buffer_scales]
        )
        buckets = compensated_buckets("lars", lists, kahan_comps, **scaled_layout, plans=None)
    for device, dtypes, lists, table in buckets:
        device_found_inf = scalar_on(found_inf, device)
        device_grad_scale = scalar_on(grad_scale, device)
        mark_written(lists[0])
        # The kernels take a buffer row and a scales row in any case: without momentum they are
        # None, never read, and the buffer is typed like the params.
        pointers = kernel_pointers(table, layout["n_elementwise"], 1 if has_momentum else 0)
        if not has_momentum:
            pointers = (*pointers[:2], None, pointers[2], None, pointers[3])
        kahan = pointers[-1] is not None
        buffer_dtype = dtypes[2] if has_momentum else dtypes[0]
        dtype_args = dtype_constexprs(("PARAM", "GRAD", "BUF"), (dtypes[0], dtypes[1], buffer_dtype))
        norms_sq = None
        if adapt:
            partials = table.scratch("lars norms", "chunk", 2)
            launch(
                _norms_kernel,
                table,
                partials,
                device_grad_scale,
                device_found_inf,
                pointers=pointers,
                PARAM_DTYPE=dtype_args["PARAM_DTYPE"],
                GRAD_DTYPE=dtype_args["GRAD_DTYPE"],
                KAHAN=kahan,
            )
            norms_sq = complete_squares(segment_sums(partials, table, "lars norms"), shard_reduction)
        lr_tensor, lr_float = lr_arguments(lr, device)
        launch(
            _update_kernel,
            table,
            norms_sq,
            lr_tensor,
            device_grad_scale,
            device_found_inf,
            *tables_of(table.n_blockwise > 0, device),
            lr_float,
            momentum,
            1.0 - dampening,
            weight_decay,
            trust_coefficient,
            eps,
            pointers=pointers,
            **dtype_args,
            MAXIMIZE=maximize,
            ADAPT=adapt,
            TRUST_CLIP=trust_clip,
            MOMENTUM=has_momentum,
            NESTEROV=nesterov,
            LR_IN_MOMENTUM=lr_in_momentum,
            KAHAN=kahan,
        )
