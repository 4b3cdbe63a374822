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
def _moments_chunk(
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, comp_ptrs, tensor, partial, offsets, numel,
    grad_multiplier, lr, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    ADAPT: tl.constexpr, KAHAN: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    param = tensor_pointer(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    grad = tensor_pointer(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    exp_avg = tensor_pointer(exp_avg_ptrs, tensor, EXP_AVG_DTYPE, ALIGNED)
    exp_avg_sq = tensor_pointer(exp_avg_sq_ptrs, tensor, EXP_AVG_SQ_DTYPE, ALIGNED)
    mask = offsets < numel if MASKED else None
    other = 0.0 if MASKED else None
    stored = tl.load(param + offsets, mask=mask, other=other).to(tl.float32)
    x = stored
    if KAHAN:
        comp = load_compensation(comp_ptrs, tensor, offsets, mask, other, PARAM_DTYPE, ALIGNED)
        x = stored + comp
    g = tl.load(grad + offsets, mask=mask, other=other).to(tl.float32) * grad_multiplier
    m = beta1 * tl.load(exp_avg + offsets, mask=mask, other=other).to(tl.float32) + grad_weight * g
    v = beta2 * tl.load(exp_avg_sq + offsets, mask=mask, other=other).to(tl.float32) + one_minus_beta2 * (g * g)
    m = m.to(EXP_AVG_DTYPE)
    v = v.to(EXP_AVG_SQ_DTYPE)
    tl.store(exp_avg + offsets, m, mask=mask)
    tl.store(exp_avg_sq + offsets, v, mask=mask)
    # u from m and v as stored, so that the apply pass recomputes exactly this u.
    update = (m.to(tl.float32) / bc1) / (tl.sqrt(v.to(tl.float32) / bc2) + eps) + weight_decay * x
    if ADAPT:
        if MASKED:
            update = tl.where(mask, update, 0.0)  # 0/0 past the end when eps = 0
        tl.store(partial, tl.sum(x * x, axis=0))
        tl.store(partial + 1, tl.sum(update * update, axis=0))
    elif KAHAN:
        store_compensated(param_ptrs, comp_ptrs, tensor, offsets, mask, stored, comp, -lr * update, PARAM_DTYPE, ALIGNED)
    else:
        tl.store(param + offsets, (x - lr * update).to(PARAM_DTYPE), mask=mask)


@triton.jit
def _moments_kernel(
    n_chunks, chunk_tensors, numels, first_chunks, aligned,
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, step_ptrs, comp_ptrs,
    partials, corrections, lr_tensor, grad_scale, found_inf, clip_coef,
    lr, beta1, grad_weight, beta2, one_minus_beta2, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, ADAPT: tl.constexpr, KAHAN: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Pass 1. With ADAPT, partials[c] = (Σx², Σu²) of chunk c; without, x is updated here."""
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
            if full_chunk:
                if vector_aligned:
                    _moments_chunk(
                        param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, comp_ptrs, tensor, partial, offsets, numel,
                        grad_multiplier, lr, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
                        PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, ADAPT, KAHAN, True, False,
                    )  # fmt: skip
                else:
                    _moments_chunk(
                        param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, comp_ptrs, tensor, partial, offsets, numel,
                        grad_multiplier, lr, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
                        PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, ADAPT, KAHAN, False, False,
                    )  # fmt: skip
            else:
                _moments_chunk(
                    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, comp_ptrs, tensor, partial, offsets, numel,
                    grad_multiplier, lr, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
                    PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_SQ_DTYPE, ADAPT, KAHAN, False, True,
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
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, step_ptrs, comp_ptrs,
    norms_sq, corrections, lr_tensor, found_inf,
    lr, eps, weight_decay, trust_clip,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, TRUST_CLIP: tl.constexpr, KAHAN: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Pass 3: x ← x − lr·r·u with r from the per-tensor norms_sq[i] = (‖x‖², ‖u‖²)."""
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
            param_norm = tl.sqrt(tl.load(norms_sq + 2 * tensor))
            update_norm = tl.sqrt(tl.load(norms_sq + 2 * tensor + 1))
            adaptable = (param_norm > 0) & (update_norm > 0)
            ratio = tl.where(adaptable, param_norm / tl.where(adaptable, update_norm, 1.0), 1.0)
            if TRUST_CLIP:
                ratio = tl.minimum(ratio, trust_clip)
            step_size = lr * ratio
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
    compensation buffer or None (see `_compensated`); with `buckets`, the buckets carry them.
    Every tensor is checked before anything changes: a refused step raises and leaves tensors and
    counters as they were.
    """
    if buckets is None:
        lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
        buckets = compensated_buckets("lamb", lists, kahan_comps, **LAMB_LAYOUT, plans=None)
    for device, dtypes, lists, table in buckets:
        pointers = kernel_pointers(table, **LAMB_LAYOUT)
        device_found_inf = scalar_on(found_inf, device)
        corrections = table.scratch("lamb bias corrections", "tensor", 2)
        launch_per_tensor(_count_kernel, table, pointers[4], corrections, device_found_inf,
                          log_beta(beta1), log_beta(beta2), BIAS_CORRECTION=bias_correction)  # fmt: skip
        mark_written(lists[0])
        lr_tensor, lr_float = lr_arguments(lr, device)
        dtype_args = dtype_constexprs(("PARAM", "GRAD", "EXP_AVG", "EXP_AVG_SQ"), dtypes)
        partials = table.scratch("lamb norms", "chunk", 2 if adapt else 0)
        launch(
            _moments_kernel,
            table,
            partials,
            corrections,
            lr_tensor,
            scalar_on(grad_scale, device),
            device_found_inf,
            scalar_on(grad_clip_coef, device),
            lr_float,
            beta1,
            1.0 - beta1 if grad_averaging else 1.0,
            beta2,
            1.0 - beta2,
            eps,
            weight_decay,
            pointers=pointers,
            MAXIMIZE=maximize,
            BIAS_CORRECTION=bias_correction,
            ADAPT=adapt,
            KAHAN=pointers[-1] is not None,
            **dtype_args,
        )
        if not adapt:
            continue
        launch(
            _apply_kernel,
            table,
            complete_squares(segment_sums(partials, table, "lamb norms"), shard_reduction),
            corrections,
            lr_tensor,
            device_found_inf,
            lr_float,
            eps,
            weight_decay,
            0.0 if trust_clip is None else trust_clip,
            pointers=pointers,
            BIAS_CORRECTION=bias_correction,
            TRUST_CLIP=trust_clip is not None,
            KAHAN=pointers[-1] is not None,
            **dtype_args,
        )
