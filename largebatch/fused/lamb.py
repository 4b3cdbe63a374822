"""Fused LAMB (You et al. 2019, Algorithm 2) on the multi-tensor engine.

For each tensor x with gradient g at step t (see largebatch.optimizers.LAMB):

    g' = clip · (±g / grad_scale)
    m ← β1·m + (1 − β1 if grad_averaging else 1)·g'        v ← β2·v + (1 − β2)·g'²
    u = (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps) + λ·x
    r = ‖x‖ / ‖u‖ (1 when either is 0; ≤ trust_clip)        x ← x − lr·r·u

Passes per (device, dtypes) group, each one launch:

1. moments: update m, v; write each chunk's Σx², Σu² (without adaptation, r = 1 and this pass
   also applies x ← x − lr·u: one pass, like Adam);
2. `segment_sums`: per-tensor ‖x‖², ‖u‖²;
3. apply: recompute u from the stored m, v and x ← x − lr·r·u.

Bytes per fp32 parameter with adaptation: read x, g, m, v and write m, v; read x, m, v and write
x: 40, the minimum without keeping u in memory.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from largebatch.optimizers._sharding import ShardReduction, complete_squares

from ._engine import (
    current_lr,
    dtype_constexprs,
    gradient_multiplier,
    launch,
    mark_written,
    locate_chunk,
    log_beta,
    lr_arguments,
    scalar_on,
    tensor_pointer,
)
from ._norms import segment_sums
from ._plan import Bucket, planned_buckets

__all__ = ["LAMB_LAYOUT", "fused_lamb"]

# The lists of a LAMB bucket: param, grad, exp_avg, exp_avg_sq walked in chunks, all five (the
# step counters too) in the kernels' table.
LAMB_LAYOUT = {"n_elementwise": 4, "n_table": 5}


@triton.jit
def _moments_chunk(
    param, grad, exp_avg, exp_avg_sq, partial, offsets, numel,
    grad_multiplier, lr, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
    ADAPT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    mask = offsets < numel if MASKED else None
    other = 0.0 if MASKED else None
    x = tl.load(param + offsets, mask=mask, other=other).to(tl.float32)
    g = tl.load(grad + offsets, mask=mask, other=other).to(tl.float32) * grad_multiplier
    m = beta1 * tl.load(exp_avg + offsets, mask=mask, other=other).to(tl.float32) + grad_weight * g
    v = beta2 * tl.load(exp_avg_sq + offsets, mask=mask, other=other).to(tl.float32) + one_minus_beta2 * (g * g)
    m = m.to(exp_avg.dtype.element_ty)
    v = v.to(exp_avg_sq.dtype.element_ty)
    tl.store(exp_avg + offsets, m, mask=mask)
    tl.store(exp_avg_sq + offsets, v, mask=mask)
    # u from m and v as stored, so that the apply pass recomputes exactly this u.
    update = (m.to(tl.float32) / bc1) / (tl.sqrt(v.to(tl.float32) / bc2) + eps) + weight_decay * x
    if ADAPT:
        if MASKED:
            update = tl.where(mask, update, 0.0)  # 0/0 past the end when eps = 0
        tl.store(partial, tl.sum(x * x, axis=0))
        tl.store(partial + 1, tl.sum(update * update, axis=0))
    else:
        tl.store(param + offsets, (x - lr * update).to(param.dtype.element_ty), mask=mask)


@triton.jit
def _moments_kernel(
    chunk_tensors, numels, first_chunks, param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, step_ptrs,
    partials, lr_tensor, grad_scale, found_inf, clip_coef,
    lr, beta1, grad_weight, beta2, one_minus_beta2, log_beta1, log_beta2, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, ADAPT: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, ALIGNMENT: tl.constexpr,
):  # fmt: skip
    """Pass 1. With ADAPT, partials[c] = (Σx², Σu²) of chunk c; without, x is updated here."""
    if found_inf is not None:
        if tl.load(found_inf) != 0:
            return
    chunk, tensor, numel, offsets, full_chunk = locate_chunk(chunk_tensors, numels, first_chunks, CHUNK_SIZE)
    param = tensor_pointer(param_ptrs, tensor, PARAM_DTYPE, ALIGNMENT)
    grad = tensor_pointer(grad_ptrs, tensor, GRAD_DTYPE, ALIGNMENT)
    exp_avg = tensor_pointer(exp_avg_ptrs, tensor, EXP_AVG_DTYPE, ALIGNMENT)
    exp_avg_sq = tensor_pointer(exp_avg_sq_ptrs, tensor, EXP_AVG_SQ_DTYPE, ALIGNMENT)

    grad_multiplier = gradient_multiplier(grad_scale, clip_coef, MAXIMIZE)
    lr = current_lr(lr_tensor, lr)
    bc1 = 1.0
    bc2 = 1.0
    if BIAS_CORRECTION:
        step = tl.load(tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))).to(tl.float64)
        bc1 = (1.0 - tl.exp(step * log_beta1)).to(tl.float32)
        bc2 = (1.0 - tl.exp(step * log_beta2)).to(tl.float32)

    partial = partials + 2 * chunk
    if full_chunk:
        _moments_chunk(
            param, grad, exp_avg, exp_avg_sq, partial, offsets, numel,
            grad_multiplier, lr, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
            ADAPT, False,
        )  # fmt: skip
    else:
        _moments_chunk(
            param, grad, exp_avg, exp_avg_sq, partial, offsets, numel,
            grad_multiplier, lr, beta1, grad_weight, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay,
            ADAPT, True,
        )  # fmt: skip


@triton.jit
def _apply_chunk(
    param, exp_avg, exp_avg_sq, offsets, numel, step_size, bc1, bc2, eps, weight_decay, MASKED: tl.constexpr
):
    mask = offsets < numel if MASKED else None
    other = 0.0 if MASKED else None
    x = tl.load(param + offsets, mask=mask, other=other).to(tl.float32)
    m = tl.load(exp_avg + offsets, mask=mask, other=other).to(tl.float32)
    v = tl.load(exp_avg_sq + offsets, mask=mask, other=other).to(tl.float32)
    update = (m / bc1) / (tl.sqrt(v / bc2) + eps) + weight_decay * x
    tl.store(param + offsets, (x - step_size * update).to(param.dtype.element_ty), mask=mask)


@triton.jit
def _apply_kernel(
    chunk_tensors, numels, first_chunks, param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, step_ptrs,
    norms_sq, lr_tensor, found_inf,
    lr, log_beta1, log_beta2, eps, weight_decay, trust_clip,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, TRUST_CLIP: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, ALIGNMENT: tl.constexpr,
):  # fmt: skip
    """Pass 3: x ← x − lr·r·u with r from the per-tensor norms_sq[i] = (‖x‖², ‖u‖²)."""
    if found_inf is not None:
        if tl.load(found_inf) != 0:
            return
    chunk, tensor, numel, offsets, full_chunk = locate_chunk(chunk_tensors, numels, first_chunks, CHUNK_SIZE)
    param = tensor_pointer(param_ptrs, tensor, PARAM_DTYPE, ALIGNMENT)
    exp_avg = tensor_pointer(exp_avg_ptrs, tensor, EXP_AVG_DTYPE, ALIGNMENT)
    exp_avg_sq = tensor_pointer(exp_avg_sq_ptrs, tensor, EXP_AVG_SQ_DTYPE, ALIGNMENT)

    lr = current_lr(lr_tensor, lr)
    bc1 = 1.0
    bc2 = 1.0
    if BIAS_CORRECTION:
        step = tl.load(tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))).to(tl.float64)
        bc1 = (1.0 - tl.exp(step * log_beta1)).to(tl.float32)
        bc2 = (1.0 - tl.exp(step * log_beta2)).to(tl.float32)
    param_norm = tl.sqrt(tl.load(norms_sq + 2 * tensor))
    update_norm = tl.sqrt(tl.load(norms_sq + 2 * tensor + 1))
    adaptable = (param_norm > 0) & (update_norm > 0)
    ratio = tl.where(adaptable, param_norm / tl.where(adaptable, update_norm, 1.0), 1.0)
    if TRUST_CLIP:
        ratio = tl.minimum(ratio, trust_clip)
    step_size = lr * ratio

    if full_chunk:
        _apply_chunk(param, exp_avg, exp_avg_sq, offsets, numel, step_size, bc1, bc2, eps, weight_decay, False)
    else:
        _apply_chunk(param, exp_avg, exp_avg_sq, offsets, numel, step_size, bc1, bc2, eps, weight_decay, True)


def fused_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
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
    any); without them the plans are built for this call.
    Every tensor is checked before anything changes: a refused step raises and leaves tensors and
    counters as they were.
    """
    if buckets is None:
        buckets = planned_buckets("lamb", [params, grads, exp_avgs, exp_avg_sqs, state_steps], **LAMB_LAYOUT, plans=None)
    for device, dtypes, lists, table in buckets:
        d_steps = lists[-1]
        device_found_inf = scalar_on(found_inf, device)
        table.count_step(d_steps, device_found_inf)
        mark_written(lists[0])
        lr_tensor, lr_float = lr_arguments(lr, device)
        dtype_args = dtype_constexprs(("PARAM", "GRAD", "EXP_AVG", "EXP_AVG_SQ"), dtypes)
        partials = table.scratch("chunk", 2 if adapt else 0)
        launch(
            _moments_kernel,
            table,
            partials,
            lr_tensor,
            scalar_on(grad_scale, device),
            device_found_inf,
            scalar_on(grad_clip_coef, device),
            lr_float,
            beta1,
            1.0 - beta1 if grad_averaging else 1.0,
            beta2,
            1.0 - beta2,
            log_beta(beta1),
            log_beta(beta2),
            eps,
            weight_decay,
            MAXIMIZE=maximize,
            BIAS_CORRECTION=bias_correction,
            ADAPT=adapt,
            **dtype_args,
        )
        if not adapt:
            continue
        launch(
            _apply_kernel,
            table,
            complete_squares(segment_sums(partials, table), shard_reduction),
            lr_tensor,
            device_found_inf,
            lr_float,
            log_beta(beta1),
            log_beta(beta2),
            eps,
            weight_decay,
            0.0 if trust_clip is None else trust_clip,
            BIAS_CORRECTION=bias_correction,
            TRUST_CLIP=trust_clip is not None,
            **dtype_args,
        )
