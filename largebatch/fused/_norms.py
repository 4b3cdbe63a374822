"""Deterministic fp32 L2 norms for the fused steps: per tensor, and of all gradients together.

Two stages, no atomics, so reruns are bit-identical:

1. a pass over the chunks writes each chunk's partial sums of squares (one row per chunk,
   one column per quantity: e.g. ‖x‖² and ‖u‖² for LAMB) — the optimizers' kernels do this
   as a by-product of their first pass, `_square_sums_kernel` does it for the gradients;
2. `segment_sums` adds up the rows of each tensor (the table's segment first_chunks[i] to
   first_chunks[i + 1]) in a fixed order, one program per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._engine import TRITON_DTYPES, launch, locate_chunk, scalar_on, tensor_pointer
from ._plan import StepPlan, planned_buckets

__all__ = ["fused_grad_norm", "grad_squares", "segment_sums"]

# Rows of partial sums one segment-sum program adds per iteration, and its warps. Segments are
# short (the largest BERT-large tensor has ~15 k chunks: 60 iterations) and this pass moves
# kilobytes, so these matter little.
SEGMENT_ROWS = 256
SEGMENT_WARPS = 4


@triton.jit
def _segment_sums_kernel(partials, first_chunks, sums, N_COLUMNS: tl.constexpr, ROWS: tl.constexpr):
    """sums[i, :] = Σ over rows r in [first_chunks[i], first_chunks[i + 1]) of partials[r, :]."""
    segment = tl.program_id(0)
    row = tl.load(first_chunks + segment)
    end = tl.load(first_chunks + segment + 1)
    columns = tl.arange(0, N_COLUMNS)
    total = tl.full([ROWS, N_COLUMNS], 0.0, tl.float32)
    while row < end:
        rows = row + tl.arange(0, ROWS)
        in_segment = (rows < end)[:, None]
        total += tl.load(partials + rows[:, None] * N_COLUMNS + columns[None, :], mask=in_segment, other=0.0)
        row += ROWS
    tl.store(sums + segment * N_COLUMNS + columns, tl.sum(total, axis=0))


def segment_sums(partials: Tensor, table: StepPlan) -> Tensor:
    """Per-tensor sums (n_tensors, n_columns) of per-chunk partial sums (n_chunks, n_columns),
    into a buffer of the plan's."""
    n_columns = partials.shape[1]
    sums = table.scratch("tensor", n_columns)
    if table.n_tensors:
        _segment_sums_kernel[(table.n_tensors,)](
            partials, table.first_chunks, sums, N_COLUMNS=n_columns, ROWS=SEGMENT_ROWS, num_warps=SEGMENT_WARPS
        )
    return sums


@triton.jit
def _square_sums_chunk(grad, offsets, numel, inv_scale, MASKED: tl.constexpr):
    mask = offsets < numel if MASKED else None
    g = tl.load(grad + offsets, mask=mask, other=0.0 if MASKED else None).to(tl.float32) * inv_scale
    return tl.sum(g * g, axis=0)


@triton.jit
def _square_sums_kernel(
    chunk_tensors,
    numels,
    first_chunks,
    grad_ptrs,
    partials,
    grad_scale,
    GRAD_DTYPE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    ALIGNMENT: tl.constexpr,
):
    """partials[c] = Σ (g / grad_scale)² over chunk c."""
    chunk, tensor, numel, offsets, full_chunk = locate_chunk(chunk_tensors, numels, first_chunks, CHUNK_SIZE)
    grad = tensor_pointer(grad_ptrs, tensor, GRAD_DTYPE, ALIGNMENT)
    inv_scale = 1.0
    if grad_scale is not None:
        # Unscale before squaring: the squares of scaled fp16 gradients could overflow fp32.
        inv_scale = 1.0 / tl.load(grad_scale)
    if full_chunk:
        total = _square_sums_chunk(grad, offsets, numel, inv_scale, MASKED=False)
    else:
        total = _square_sums_chunk(grad, offsets, numel, inv_scale, MASKED=True)
    tl.store(partials + chunk, total)


def grad_squares(table: StepPlan, grad_pointers: Tensor, grad_dtype: torch.dtype, grad_scale: Tensor | None) -> Tensor:
    """Σ (g / grad_scale)² over the gradients of one bucket, 0-dim fp32 on its device: the
    gradients are the pointer row `grad_pointers` of `table` (an optimizer's step plan, whose
    gradients are already checked, or a plan of the gradients alone). No host synchronisation."""
    partials = table.scratch("chunk", 1)
    launch(_square_sums_kernel, table, partials, scalar_on(grad_scale, table.device), pointers=(grad_pointers,),
           GRAD_DTYPE=TRITON_DTYPES[grad_dtype])  # fmt: skip
    return segment_sums(partials, table).sum()


def fused_grad_norm(
    grads: Sequence[Tensor], grad_scale: Tensor | None = None
) -> Tensor:
    """fp32 L2 norm of all `grads` together (of grads / grad_scale when given), 0-dim on
    grads[0].device. Deterministic: per-chunk partials, per-tensor sums, then fixed-order sums.
    An optimizer's clipping norm goes through its step plans instead (`grad_squares`)."""
    if not grads:
        raise ValueError("fused_grad_norm needs at least one gradient")
    out_device = grads[0].device
    squares = [
        grad_squares(table, table.pointers[0], dtype, grad_scale).to(out_device)
        for _, (dtype,), _, table in planned_buckets("grad_norm", [grads], n_elementwise=1, n_table=1, plans=None)
    ]
    return torch.stack(squares).sum().sqrt()
