"""Fused LAMB (You et al. 2019, Algorithm 2) on the multi-tensor engine.

For each tensor x with gradient g at step t (see largebatch.optimizers.LAMB):

    g' = clip · (±g / grad_scale)
    m ← β1·m + (1 − β1 if grad_averaging else 1)·g'        v ← β2·v + (1 − β2)·g'²
    u = (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps) + λ·x
    r = ‖x‖ / ‖u‖ (1 when either is 0; ≤ trust_clip)        x ← x − lr·r·u

Passes per (device, dtypes) group, each one launch:

0. count: step += 1 per tensor, and its bias corrections 1 − β1^t, 1 − β2^t into a per-tensor
   table (computed once per tensor, not in every program);
1. moments: update m, v; write each chunk's Σx², Σu² (without adaptation, r = 1 and this pass
   also applies x ← x − lr·u: one pass, like Adam);
2. `segment_sums`: per-tensor ‖x‖², ‖u‖²;
3. apply: recompute u from the stored m, v and x ← x − lr·r·u.

Bytes per fp32 parameter with adaptation: read x, g, m, v and write m, v; read x, m, v and write
x: 40, the minimum without keeping u in memory.

With Kahan compensation buffers c (bf16/fp16 parameters, `kahan_sum`), x is p + c in both
passes and the last one Kahan-adds −lr·r·u to p (see `_compensated.store_compensated`).

With 8-bit m and v (`state_dtype="8bit"`, `_blockwise`), u is taken from the exact float32
moments, as the per-tensor path takes it, which the codes cannot give back. So pass 1 writes no
state, and pass 3 is pass 1 again: it recomputes m, v and u from the old codes and g, applies
x ← x − lr·r·u and stores the new codes. Bytes per fp32 parameter: 4 + 4 + 1 + 1 read, then
the same read and 4 + 1 + 1 written: 26 (the scales add 1/64 of a byte per state).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from largebatch.optimizers._sharding import ShardReduction, complete_squares

from ._engine import (
    chunk_of,
    count_steps,
    current_lr,
    dtype_constexprs,
    gradient_multiplier,
    launch,
    launch_per_tensor,
    locate_chunk,
    log_beta,
    lr_arguments,
    mark_written,
    scalar_on,
    tensor_pointer,
)
from ._blockwise import load_state, quantised_lists, rounded_like_stored, store_state, tables_of
from ._compensated import compensated_buckets, kernel_pointers, load_compensation, store_compensated
from ._norms import segment_sums
from ._plan import Bucket

__all__ = ["LAMB_LAYOUT", "fused_lamb"]

# The lists of a LAMB bucket: param, grad, exp_avg, exp_avg_sq walked in chunks, all five (the
# step counters too) in the kernels' table.
LAMB_LAYOUT = {"n_elementwise": 4, "n_table": 5}


@triton.jit
def _count_kernel(
    n_tensors, step_ptrs, corrections, found_inf, log_beta1, log_beta2,
    BIAS_CORRECTION: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 0: count the step; corrections[i] = (1 − β1^t, 1 − β2^t) of tensor i, in float64."""
    tensors, exists, step = count_steps(step_ptrs, n_tensors, found_inf, BLOCK)
    if BIAS_CORRECTION:
        step = step.to(tl.float64)
        tl.store(corrections + 2 * tensors, (1.0 - tl.exp(step * log_beta1)).to(tl.float32), mask=exists)
        tl.store(corrections + 2 * tensors + 1, (1.0 - tl.exp(step * log_beta2)).to(tl.float32), mask=exists)


@triton.jit
def _bias_corrections(corrections, tensor, BIAS_CORRECTION: tl.constexpr):
    """(1 − β1^t, 1 − β2^t) of `tensor` from the count pass's table, or (1, 1)."""
    bc1 = 1.0
    bc2 = 1.0
    if BIAS_CORRECTION:
        bc1 = tl.load(corrections + 2 * tensor)
        bc2 = tl.load(corrections + 2 * tensor + 1)
    return bc1, bc2


@triton.jit
def _trust_step_size(norms_sq, tensor, lr, trust_clip, TRUST_CLIP: tl.constexpr):
    """lr·r of `tensor`, r = ‖x‖ / ‖u‖ from norms_sq[i] = (‖x‖², ‖u‖²) (1 when either is 0;
    ≤ trust_clip with TRUST_CLIP)."""
    param_norm = tl.sqrt(tl.load(norms_sq + 2 * tensor))
    update_norm = tl.sqrt(tl.load(norms_sq + 2 * tensor + 1))
    adaptable = (param_norm > 0) & (update_norm > 0)
    ratio = tl.where(adaptable, param_norm / tl.where(adaptable, update_norm, 1.0), 1.0)
    if TRUST_CLIP:
        ratio = tl.minimum(ratio, trust_clip)
    return lr * ratio


@triton.jit
def _moments_chunk(
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, exp_avg_scale_ptrs, exp_avg_sq_scale_ptrs, comp_ptrs,
    code_maps, midpoints, tensor, partial, offsets, numel,
    grad_multiplier, step_size, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    ADAPT: tl.constexpr, KAHAN: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, CHUNK_SIZE: tl.constexpr,
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
    m = load_state(exp_avg_ptrs, exp_avg_scale_ptrs, code_maps, tensor, offsets, mask, other, EXP_AVG_DTYPE, ALIGNED)
    v = load_state(exp_avg_sq_ptrs, exp_avg_sq_scale_ptrs, code_maps, tensor, offsets, mask, other, EXP_AVG_SQ_DTYPE, ALIGNED)
    # u from m and v as stored (float states, so that the apply pass recomputes exactly this u;
    # 8-bit states: exact, as the apply pass recomputes them from the old codes too).
    m = rounded_like_stored(beta1 * m + grad_weight * g, exp_avg_scale_ptrs, EXP_AVG_DTYPE)
    v = rounded_like_stored(beta2 * v + one_minus_beta2 * (g * g), exp_avg_sq_scale_ptrs, EXP_AVG_SQ_DTYPE)
    # 8-bit states are stored by the pass that applies the step (pass 1 only without adaptation).
    if not ADAPT or exp_avg_scale_ptrs is None:
        store_state(exp_avg_ptrs, exp_avg_scale_ptrs, midpoints, tensor, offsets, mask, numel, m,
                    EXP_AVG_DTYPE, ALIGNED, MASKED, CHUNK_SIZE)  # fmt: skip
        store_state(exp_avg_sq_ptrs, exp_avg_sq_scale_ptrs, midpoints, tensor, offsets, mask, numel, v,
                    EXP_AVG_SQ_DTYPE, ALIGNED, MASKED, CHUNK_SIZE)  # fmt: skip
    update = (m / bc1) / (tl.sqrt(v / bc2) + eps) + weight_decay * x
    if ADAPT:
        if MASKED:
            update = tl.where(mask, update, 0.0)  # 0/0 past the end when eps = 0
        tl.store(partial, tl.sum(x * x, axis=0))
        tl.store(partial + 1, tl.sum(update * update, axis=0))
    elif KAHAN:
        store_compensated(
            param_ptrs, comp_ptrs, tensor, offsets, mask, stored, comp, -step_size * update, PARAM_DTYPE, ALIGNED
        )
    else:
        tl.store(param + offsets, (x - step_size * update).to(PARAM_DTYPE), mask=mask)


@triton.jit
def _moments_kernel(
    n_chunks, chunk_tensors, numels, first_chunks, aligned,
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, step_ptrs, exp_avg_scale_ptrs, exp_avg_sq_scale_ptrs, comp_ptrs,
    partials, norms_sq, corrections, lr_tensor, grad_scale, found_inf, clip_coef, code_maps, midpoints,
    lr, beta1, grad_weight, beta2, one_minus_beta2, eps, weight_decay, trust_clip,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr,
    KAHAN: tl.constexpr, CHUNK_SIZE: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Pass 1. With ADAPT, partials[c] = (Σx², Σu²) of chunk c; without, x ← x − lr·u here, or,
    given `norms_sq` (pass 3 of 8-bit states, which recomputes u), x ← x − lr·r·u."""
    if found_inf is not None:
        if tl.load(found_inf) != 0:
            return
    grad_multiplier = gradient_multiplier(grad_scale, clip_coef, MAXIMIZE)
    lr = current_lr(lr_tensor, lr)
    for index in range(CHUNKS_PER_PROGRAM):
        chunk, exists = chunk_of(n_chunks, index, CHUNKS_PER_PROGRAM)
        if exists:
            tensor, numel, offsets, full_chunk, vector_aligned = locate_chunk(
                chunk, chunk_tensors, numels, first_chunks, aligned, CHUNK_SIZE
            )
            bc1, bc2 = _bias_corrections(corrections, tensor, BIAS_CORRECTION)
            partial = partials + 2 * chunk
            step_size = lr
            if norms_sq is not None:
                step_size = _trust_step_size(norms_sq, tensor, lr, trust_clip, TRUST_CLIP)
            if full_chunk:
                if vector_aligned:
                    _moments_chunk(
                        param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, exp_avg_scale_ptrs, exp_avg_sq_scale_ptrs,
                        comp_ptrs, code_maps, midpoints, tensor, partial, offsets, numel,
                        grad_multiplier, step_size, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
                        PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, ADAPT, KAHAN, True, False, CHUNK_SIZE,
                    )  # fmt: skip
                else:
                    _moments_chunk(
                        param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, exp_avg_scale_ptrs, exp_avg_sq_scale_ptrs,
                        comp_ptrs, code_maps, midpoints, tensor, partial, offsets, numel,
                        grad_multiplier, step_size, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
                        PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, ADAPT, KAHAN, False, False, CHUNK_SIZE,
                    )  # fmt: skip
            else:
                _moments_chunk(
                    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, exp_avg_scale_ptrs, exp_avg_sq_scale_ptrs,
                    comp_ptrs, code_maps, midpoints, tensor, partial, offsets, numel,
                    grad_multiplier, step_size, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
                    PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, ADAPT, KAHAN, False, True, CHUNK_SIZE,
                )  # fmt: skip


@triton.jit
def _apply_chunk(
    param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, comp_ptrs, tensor, offsets, numel, step_size, bc1, bc2, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    KAHAN: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    param = tensor_pointer(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    exp_avg = tensor_pointer(exp_avg_ptrs, tensor, EXP_AVG_DTYPE, ALIGNED)
    exp_avg_sq = tensor_pointer(exp_avg_sq_ptrs, tensor, EXP_AVG_SQ_DTYPE, ALIGNED)
    mask = offsets < numel if MASKED else None
    other = 0.0 if MASKED else None
    stored = tl.load(param + offsets, mask=mask, other=other).to(tl.float32)
    x = stored
    if KAHAN:
        comp = load_compensation(comp_ptrs, tensor, offsets, mask, other, PARAM_DTYPE, ALIGNED)
        x = stored + comp
    m = tl.load(exp_avg + offsets, mask=mask, other=other).to(tl.float32)
    v = tl.load(exp_avg_sq + offsets, mask=mask, other=other).to(tl.float32)
    update = (m / bc1) / (tl.sqrt(v / bc2) + eps) + weight_decay * x
    if KAHAN:
        store_compensated(
            param_ptrs, comp_ptrs, tensor, offsets, mask, stored, comp, -step_size * update, PARAM_DTYPE, ALIGNED
        )
    else:
        tl.store(param + offsets, (x - step_size * update).to(PARAM_DTYPE), mask=mask)


@triton.jit
def _apply_kernel(
    n_chunks, chunk_tensors, numels, first_chunks, aligned,
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, step_ptrs, exp_avg_scale_ptrs, exp_avg_sq_scale_ptrs, comp_ptrs,
    norms_sq, corrections, lr_tensor, found_inf,
    lr, eps, weight_decay, trust_clip,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, TRUST_CLIP: tl.constexpr, KAHAN: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Pass 3 of float states: x ← x − lr·r·u, u from the stored m, v."""
    if found_inf is not None:
        if tl.load(found_inf) != 0:
            return
    lr = current_lr(lr_tensor, lr)
    for index in range(CHUNKS_PER_PROGRAM):
        chunk, exists = chunk_of(n_chunks, index, CHUNKS_PER_PROGRAM)
        if exists:
            tensor, numel, offsets, full_chunk, vector_aligned = locate_chunk(
                chunk, chunk_tensors, numels, first_chunks, aligned, CHUNK_SIZE
            )
            bc1, bc2 = _bias_corrections(corrections, tensor, BIAS_CORRECTION)
            step_size = _trust_step_size(norms_sq, tensor, lr, trust_clip, TRUST_CLIP)
            if full_chunk:
                if vector_aligned:
                    _apply_chunk(
                        param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, comp_ptrs, tensor, offsets, numel, step_size, bc1, bc2, eps,
                        weight_decay, PARAM_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, KAHAN, True, False,
                    )  # fmt: skip
                else:
                    _apply_chunk(
                        param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, comp_ptrs, tensor, offsets, numel, step_size, bc1, bc2, eps,
                        weight_decay, PARAM_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, KAHAN, False, False,
                    )  # fmt: skip
            else:
                _apply_chunk(
                    param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, comp_ptrs, tensor, offsets, numel, step_size, bc1, bc2, eps,
                    weight_decay, PARAM_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, KAHAN, False, True,
                )  # fmt: skip


def fused_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None = None,
    exp_avg_scales: list[Tensor] | None = None,
    exp_avg_sq_scales: list[Tensor] | None = None,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    grad_averaging: bool,
    trust_clip: float | None,
    adapt: bool,
    maximize: bool,
    grad_clip_coef: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    shard_reduction: ShardReduction | None = None,
    buckets: list[Bucket] | None = None,
) -> None:
    """One LAMB step over the given tensors, in place (see the module docstring).

    The caller's gradients are read, never written. `shard_reduction` sums the per-tensor squares
    over the shard ranks (one all-reduce per (device, dtype) group) when the tensors are local
    shards. With `found_inf` nonzero nothing changes, step counters included; nothing here
    synchronises with the host. `buckets` are the lists' buckets with their step plans already
    made current (an optimizer prepares every group, with the plans it keeps, before stepping
    any); without them the plans are built for this call. `kahan_comps`: per tensor its
    compensation buffer or None (see `_compensated`); `exp_avg_scales`, `exp_avg_sq_scales`:
    given, m and v are 8-bit codes with these scales (see `_blockwise`); with `buckets`, the
    buckets carry both. Every tensor is checked before anything changes: a refused step raises
    and leaves tensors and counters as they were.
    """
    if buckets is None:
        lists, layout = quantised_lists(
            [params, grads, exp_avgs, exp_avg_sqs, state_steps], LAMB_LAYOUT, [exp_avg_scales, exp_avg_sq_scales]
        )
        buckets = compensated_buckets("lamb", lists, kahan_comps, **layout, plans=None)
    for device, dtypes, lists, table in buckets:
        pointers = kernel_pointers(table, LAMB_LAYOUT["n_elementwise"], 2)
        quantised = table.n_blockwise > 0
        device_found_inf = scalar_on(found_inf, device)
        corrections = table.scratch("lamb bias corrections", "tensor", 2)
        launch_per_tensor(_count_kernel, table, pointers[4], corrections, device_found_inf,
                          log_beta(beta1), log_beta(beta2), BIAS_CORRECTION=bias_correction)  # fmt: skip
        mark_written(lists[0])
        lr_tensor, lr_float = lr_arguments(lr, device)
        dtype_args = dtype_constexprs(("PARAM", "GRAD", "EXP_AVG", "EXP_AVG_SQ"), dtypes)
        partials = table.scratch("lamb norms", "chunk", 2 if adapt else 0)
        trust_clip_value = 0.0 if trust_clip is None else trust_clip
        moments_args = (
            corrections,
            lr_tensor,
            scalar_on(grad_scale, device),
            device_found_inf,
            scalar_on(grad_clip_coef, device),
            *tables_of(quantised, device),
            lr_float,
            beta1,
            1.0 - beta1 if grad_averaging else 1.0,
            beta2,
            1.0 - beta2,
            eps,
            weight_decay,
            trust_clip_value,
        )
        # The constexprs both kernels take (the moments kernel also MAXIMIZE and ADAPT).
        shared = dict(
            BIAS_CORRECTION=bias_correction, TRUST_CLIP=trust_clip is not None, KAHAN=pointers[-1] is not None, **dtype_args
        )
        launch(_moments_kernel, table, partials, None, *moments_args, pointers=pointers, MAXIMIZE=maximize, ADAPT=adapt,
               **shared)  # fmt: skip
        if not adapt:
            continue
        norms_sq = complete_squares(segment_sums(partials, table, "lamb norms"), shard_reduction)
        if quantised:  # recompute m, v and u from the old codes, step, and store the new codes
            launch(_moments_kernel, table, partials, norms_sq, *moments_args, pointers=pointers, MAXIMIZE=maximize,
                   ADAPT=False, **shared)  # fmt: skip
            continue
        launch(
            _apply_kernel, table, norms_sq, corrections, lr_tensor, device_found_inf, lr_float, eps, weight_decay,
            trust_clip_value, pointers=pointers, **shared,
        )  # fmt: skip
