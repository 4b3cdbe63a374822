"""Fused Adan (Xie et al. 2022, as the official sail-sg/Adan code computes it) on the engine.

For each tensor x with gradient g at step t (see largebatch.optimizers.Adan):

    g' = clip · (±g / grad_scale)          Δ = g' − g_prev (0 at t = 1)
    m ← β1·m + (1 − β1)·g'                 d ← β2·d + (1 − β2)·Δ
    n ← β3·n + (1 − β3)·(g' + β2·Δ)²       g_prev ← g'
    η = (m / (1 − β1^t) + β2·d / (1 − β2^t)) / (sqrt(n / (1 − β3^t)) + eps)
    x ← (x − lr·η) / (1 + lr·λ)            (no_prox: x ← x·(1 − lr·λ) − lr·η)

Per (device, dtypes) group, a per-tensor pass counts the step and writes each tensor's
1 − β1^t, β2 / (1 − β2^t), 1 − β3^t and [t > 1] to a table (once per tensor, not in every
program); then one pass over the chunks reads x, g, g_prev, m, d, n and writes x, g_prev, m, d,
n: 44 bytes per fp32 parameter.

With Kahan compensation buffers c (bf16/fp16 parameters, `kahan_sum`), x is p + c and the
step u = x_new − x (prox: −lr·(η + λ·x) / (1 + lr·λ); no_prox: −lr·(η + λ·x)) is Kahan-added to
p (see `_compensated.store_compensated`). With 8-bit m, d, n (`state_dtype="8bit"`, g_prev
then bf16), the pass dequantises them, steps with the exact float32 moments and stores their
new codes (`_blockwise`): 4 + 4 + 2 + 3 read and 4 + 2 + 3 written per fp32 parameter, 22 bytes.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

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
from ._plan import Bucket

__all__ = ["ADAN_LAYOUT", "fused_adan"]

# The lists of an Adan bucket: param, grad and the four states walked in chunks, all seven (the
# step counters too) in the kernels' table.
ADAN_LAYOUT = {"n_elementwise": 6, "n_table": 7}


# Columns of the per-tensor table the count pass writes (a constexpr: the kernels index with it).
_CORRECTIONS = tl.constexpr(4)


@triton.jit
def _count_kernel(n_tensors, step_ptrs, corrections, found_inf, beta2, log_beta1, log_beta2, log_beta3, BLOCK: tl.constexpr):
    """Count the step; corrections[i] = (1 − β1^t, β2 / (1 − β2^t), 1 − β3^t, 1 if t > 1 else 0)."""
    tensors, exists, step = count_steps(step_ptrs, n_tensors, found_inf, BLOCK)
    row = corrections + _CORRECTIONS * tensors
    has_previous = tl.where(step > 1, 1.0, 0.0)  # g_prev starts at 0: no difference at t = 1
    step = step.to(tl.float64)
    tl.store(row, (1.0 - tl.exp(step * log_beta1)).to(tl.float32), mask=exists)
    tl.store(row + 1, (beta2 / (1.0 - tl.exp(step * log_beta2))).to(tl.float32), mask=exists)
    tl.store(row + 2, (1.0 - tl.exp(step * log_beta3)).to(tl.float32), mask=exists)
    tl.store(row + 3, has_previous, mask=exists)


@triton.jit
def _adan_chunk(
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_diff_ptrs, exp_avg_sq_ptrs, prev_grad_ptrs,
    exp_avg_scale_ptrs, exp_avg_diff_scale_ptrs, exp_avg_sq_scale_ptrs, comp_ptrs, code_maps, midpoints, tensor, offsets, numel,
    grad_multiplier, has_previous, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3,
    bc1, diff_scale, bc3, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr,
    EXP_AVG_DIFF_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr, PREV_GRAD_DTYPE: tl.constexpr,
    NO_PROX: tl.constexpr, KAHAN: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):  # fmt: skip
    param = tensor_pointer(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    grad = tensor_pointer(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    prev_grad = tensor_pointer(prev_grad_ptrs, tensor, PREV_GRAD_DTYPE, ALIGNED)
    mask = offsets < numel if MASKED else None
    other = 0.0 if MASKED else None
    x = tl.load(param + offsets, mask=mask, other=other).to(tl.float32)
    if KAHAN:
        stored = x
        comp = load_compensation(comp_ptrs, tensor, offsets, mask, other, PARAM_DTYPE, ALIGNED)
        x = stored + comp
    g = tl.load(grad + offsets, mask=mask, other=other).to(tl.float32) * grad_multiplier
    diff = (g - tl.load(prev_grad + offsets, mask=mask, other=other).to(tl.float32)) * has_previous
    m = beta1 * load_state(exp_avg_ptrs, exp_avg_scale_ptrs, code_maps, tensor, offsets, mask, other, EXP_AVG_DTYPE, ALIGNED)
    m = rounded_like_stored(m + one_minus_beta1 * g, exp_avg_scale_ptrs, EXP_AVG_DTYPE)
    d = beta2 * load_state(exp_avg_diff_ptrs, exp_avg_diff_scale_ptrs, code_maps, tensor, offsets, mask, other,
                           EXP_AVG_DIFF_DTYPE, ALIGNED)  # fmt: skip
    d = rounded_like_stored(d + one_minus_beta2 * diff, exp_avg_diff_scale_ptrs, EXP_AVG_DIFF_DTYPE)
    nesterov_grad = g + beta2 * diff
    n = beta3 * load_state(exp_avg_sq_ptrs, exp_avg_sq_scale_ptrs, code_maps, tensor, offsets, mask, other,
                           EXP_AVG_SQ_DTYPE, ALIGNED)  # fmt: skip
    n = rounded_like_stored(n + one_minus_beta3 * (nesterov_grad * nesterov_grad), exp_avg_sq_scale_ptrs, EXP_AVG_SQ_DTYPE)
    store_state(exp_avg_ptrs, exp_avg_scale_ptrs, midpoints, tensor, offsets, mask, numel, m, EXP_AVG_DTYPE, ALIGNED,
                MASKED, CHUNK_SIZE)  # fmt: skip
    store_state(exp_avg_diff_ptrs, exp_avg_diff_scale_ptrs, midpoints, tensor, offsets, mask, numel, d,
                EXP_AVG_DIFF_DTYPE, ALIGNED, MASKED, CHUNK_SIZE)  # fmt: skip
    store_state(exp_avg_sq_ptrs, exp_avg_sq_scale_ptrs, midpoints, tensor, offsets, mask, numel, n, EXP_AVG_SQ_DTYPE,
                ALIGNED, MASKED, CHUNK_SIZE)  # fmt: skip
    tl.store(prev_grad + offsets, g.to(PREV_GRAD_DTYPE), mask=mask)

    update = (m / bc1 + d * diff_scale) / (tl.sqrt(n / bc3) + eps)
    if KAHAN:
        step = -lr * update - (lr * weight_decay) * x
        if not NO_PROX:
            step = step / (1.0 + lr * weight_decay)
        store_compensated(param_ptrs, comp_ptrs, tensor, offsets, mask, stored, comp, step, PARAM_DTYPE, ALIGNED)
    else:
        if NO_PROX:
            x = x * (1.0 - lr * weight_decay) - lr * update
        else:
            x = (x - lr * update) / (1.0 + lr * weight_decay)
        tl.store(param + offsets, x.to(PARAM_DTYPE), mask=mask)


@triton.jit
def _adan_kernel(
    n_chunks, chunk_tensors, numels, first_chunks, aligned,
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_diff_ptrs, exp_avg_sq_ptrs, prev_grad_ptrs, step_ptrs,
    exp_avg_scale_ptrs, exp_avg_diff_scale_ptrs, exp_avg_sq_scale_ptrs, comp_ptrs,
    corrections, lr_tensor, grad_scale, found_inf, clip_coef, code_maps, midpoints,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EXP_AVG_DTYPE: tl.constexpr,
    EXP_AVG_DIFF_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr, PREV_GRAD_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, NO_PROX: tl.constexpr, KAHAN: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
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
            row = corrections + _CORRECTIONS * tensor
            bc1 = tl.load(row)
            diff_scale = tl.load(row + 1)
            bc3 = tl.load(row + 2)
            has_previous = tl.load(row + 3)
            if full_chunk:
                if vector_aligned:
                    _adan_chunk(
                        param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_diff_ptrs, exp_avg_sq_ptrs, prev_grad_ptrs, exp_avg_scale_ptrs,
                        exp_avg_diff_scale_ptrs, exp_avg_sq_scale_ptrs, comp_ptrs, code_maps, midpoints, tensor,
                        offsets, numel, grad_multiplier, has_previous, lr, beta1, one_minus_beta1, beta2,
                        one_minus_beta2, beta3, one_minus_beta3, bc1, diff_scale, bc3, eps, weight_decay,
                        PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_DIFF_DTYPE, EXP_AVG_SQ_DTYPE, PREV_GRAD_DTYPE,
                        NO_PROX, KAHAN, True, False, CHUNK_SIZE,
                    )  # fmt: skip
                else:
                    _adan_chunk(
                        param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_diff_ptrs, exp_avg_sq_ptrs, prev_grad_ptrs, exp_avg_scale_ptrs,
                        exp_avg_diff_scale_ptrs, exp_avg_sq_scale_ptrs, comp_ptrs, code_maps, midpoints, tensor,
                        offsets, numel, grad_multiplier, has_previous, lr, beta1, one_minus_beta1, beta2,
                        one_minus_beta2, beta3, one_minus_beta3, bc1, diff_scale, bc3, eps, weight_decay,
                        PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_DIFF_DTYPE, EXP_AVG_SQ_DTYPE, PREV_GRAD_DTYPE,
                        NO_PROX, KAHAN, False, False, CHUNK_SIZE,
                    )  # fmt: skip
            else:
                _adan_chunk(
                    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_diff_ptrs, exp_avg_sq_ptrs, prev_grad_ptrs, exp_avg_scale_ptrs,
                        exp_avg_diff_scale_ptrs, exp_avg_sq_scale_ptrs, comp_ptrs, code_maps, midpoints, tensor,
                    offsets, numel, grad_multiplier, has_previous, lr, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, beta3, one_minus_beta3, bc1, diff_scale, bc3, eps, weight_decay,
                    PARAM_DTYPE, GRAD_DTYPE, EXP_AVG_DTYPE, EXP_AVG_DIFF_DTYPE, EXP_AVG_SQ_DTYPE, PREV_GRAD_DTYPE,
                    NO_PROX, KAHAN, False, True, CHUNK_SIZE,
                )  # fmt: skip


def fused_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None = None,
    exp_avg_scales: list[Tensor] | None = None,
    exp_avg_diff_scales: list[Tensor] | None = None,
    exp_avg_sq_scales: list[Tensor] | None = None,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
    grad_clip_coef: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    buckets: list[Bucket] | None = None,
) -> None:
    """One Adan step over the given tensors, in place (see the module docstring).

    The caller's gradients are read, never written. With `found_inf` nonzero nothing changes,
    step counters included; nothing here synchronises with the host. `buckets`, `kahan_comps`
    and the scales of 8-bit m, d, n (g_prev is never 8-bit): see `fused_lamb`.
    """
    if buckets is None:
        lists, layout = quantised_lists(
            [params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, state_steps], ADAN_LAYOUT,
            [exp_avg_scales, exp_avg_diff_scales, exp_avg_sq_scales],
        )  # fmt: skip
        buckets = compensated_buckets("adan", lists, kahan_comps, **layout, plans=None)
    for device, dtypes, lists, table in buckets:
        pointers = kernel_pointers(table, ADAN_LAYOUT["n_elementwise"], 3)
        device_found_inf = scalar_on(found_inf, device)
        corrections = table.scratch("adan bias corrections", "tensor", _CORRECTIONS.value)
        launch_per_tensor(_count_kernel, table, pointers[6], corrections, device_found_inf, beta2,
                          log_beta(beta1), log_beta(beta2), log_beta(beta3))  # fmt: skip
        mark_written(lists[0])
        lr_tensor, lr_float = lr_arguments(lr, device)
        launch(
            _adan_kernel,
            table,
            corrections,
            lr_tensor,
            scalar_on(grad_scale, device),
            device_found_inf,
            scalar_on(grad_clip_coef, device),
            *tables_of(table.n_blockwise > 0, device),
            lr_float,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            beta3,
            1.0 - beta3,
            eps,
            weight_decay,
            pointers=pointers,
            MAXIMIZE=maximize,
            NO_PROX=no_prox,
            KAHAN=pointers[-1] is not None,
            **dtype_constexprs(("PARAM", "GRAD", "EXP_AVG", "EXP_AVG_DIFF", "EXP_AVG_SQ", "PREV_GRAD"), dtypes),
        )
