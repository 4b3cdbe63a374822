"""Deterministic fp32 L2 norms for the fused steps: per tensor, and of all gradients together.

Two stages, no atomics, so reruns are bit-identical:

1. a pass over the chunks writes each chunk's partial sums of squares (one row per chunk,
   one column per quantity: e.g. ‖x‖² and ‖u‖² for LAMB) — the optimizers' kernels do this
   as a by-product of their first pass, `_square_sums_kernel` does it for the gradients;
2. `segment_sums` adds up the rows of each tensor (the table's segment first_chunks[i] to
   first_chunks[i + 1]) in a fixed order, one program per tensor.

`clip_coefficients` turns the per-tensor sums of squares of the gradients into the global
clipping multiplier min(1, max_norm / (‖g‖ + 1e-6)) with one launch (`_clip_coefficient_kernel`),
not five small torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._engine import TRITON_DTYPES, chunk_of, launch, locate_chunk, scalar_on, tensor_pointer
from ._plan import StepPlan, planned_buckets

if TYPE_CHECKING:
    from ._plan import Bucket

__all__ = ["clip_coefficients", "fused_grad_norm", "grad_squares", "segment_sums"]

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


def segment_sums(partials: Tensor, table: StepPlan, name: str) -> Tensor:
    """Per-tensor sums (n_tensors, n_columns) of per-chunk partial sums (n_chunks, n_columns),
    into the plan's buffer `name`."""
    n_columns = partials.shape[1]
    sums = table.scratch(name, "tensor", n_columns)
    _segment_sums_kernel[(table.n_tensors,)](
        partials, table.first_chunks, sums, N_COLUMNS=n_columns, ROWS=SEGMENT_ROWS, num_warps=SEGMENT_WARPS
    )
    return sums


@triton.jit
def _square_sums_chunk(
    grad_ptrs, tensor, offsets, numel, inv_scale, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr
):
    grad = tensor_pointer(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    mask = offsets < numel if MASKED else None
    g = tl.load(grad + offsets, mask=mask, other=0.0 if MASKED else None).to(tl.float32) * inv_scale
    return tl.sum(g * g, axis=0)


@triton.jit
def _square_sums_kernel(
    n_chunks, chunk_tensors, numels, first_chunks, aligned, grad_ptrs,
    partials, grad_scale,
    GRAD_DTYPE: tl.constexpr, CHUNK_SIZE: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """partials[c] = Σ (g / grad_scale)² over chunk c."""
    inv_scale = 1.0
    if grad_scale is not None:
        # Unscale before squaring: the squares of scaled fp16 gradients could overflow fp32.
        inv_scale = 1.0 / tl.load(grad_scale)
    for index in range(CHUNKS_PER_PROGRAM):
        chunk, exists = chunk_of(n_chunks, index, CHUNKS_PER_PROGRAM)
        if exists:
            tensor, numel, offsets, full_chunk, vector_aligned = locate_chunk(
                chunk, chunk_tensors, numels, first_chunks, aligned, CHUNK_SIZE
            )
            if full_chunk:
                if vector_aligned:
                    total = _square_sums_chunk(grad_ptrs, tensor, offsets, numel, inv_scale, GRAD_DTYPE, True, False)
                else:
                    total = _square_sums_chunk(grad_ptrs, tensor, offsets, numel, inv_scale, GRAD_DTYPE, False, False)
            else:
                total = _square_sums_chunk(grad_ptrs, tensor, offsets, numel, inv_scale, GRAD_DTYPE, False, True)
            tl.store(partials + chunk, total)


def grad_squares(table: StepPlan, grad_pointers: Tensor, grad_dtype: torch.dtype, grad_scale: Tensor | None) -> Tensor:
    """Per-tensor Σ (g / grad_scale)², (n_tensors, 1) fp32 in a buffer of the plan's, of the
    gradients of one bucket: the pointer row `grad_pointers` of `table` (an optimizer's step
    plan, whose gradients are already checked, or a plan of the gradients alone). No host
    synchronisation."""
    partials = table.scratch("grad squares", "chunk", 1)
    launch(_square_sums_kernel, table, partials, scalar_on(grad_scale, table.device), pointers=(grad_pointers,),
           GRAD_DTYPE=TRITON_DTYPES[grad_dtype])  # fmt: skip
    return segment_sums(partials, table, "grad squares")


# Entries the clipping program adds per iteration (one program: a step has a few hundred to a
# few thousand tensors).
CLIP_BLOCK = 1024


@triton.jit
def _clip_coefficient_kernel(squares, n_squares, coefficient, max_norm, eps, BLOCK: tl.constexpr):
    """coefficient = min(1, max_norm / (sqrt(Σ squares[:n_squares]) + eps)), in a fixed order, IEEE
    square root and division (what torch's ops compute)."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < n_squares:
        entries = start + tl.arange(0, BLOCK)
        total += tl.load(squares + entries, mask=entries < n_squares, other=0.0)
        start += BLOCK
    norm = tl.sqrt_rn(tl.sum(total, axis=0))
    tl.store(coefficient, tl.minimum(tl.div_rn(max_norm, norm + eps), 1.0))


def clip_coefficients(
    buckets: Sequence[Sequence[Bucket] | None], max_norms: Sequence[float | None], grad_scale: Tensor | None, eps: float
) -> list[Tensor | None]:
    """Per group, min(1, max_norm / (‖g‖ + eps)) for the norm ‖g‖ of every gradient of every group
    (None where the group has no max_norm), from the groups' `buckets` (None where a group has
    no gradient): whole tensors on one device. The per-tensor squares of each bucket go through
    its step plan; each distinct max_norm is one launch into a buffer of a plan's (so that a
    captured step allocates nothing when there is one bucket in all: the usual case)."""
    every_bucket = [bucket for group in buckets if group is not None for bucket in group]
    device = every_bucket[0].device
    per_tensor = [grad_squares(b.plan, b.plan.pointers[1], b.dtypes[1], grad_scale).reshape(-1) for b in every_bucket]
    squares = per_tensor[0] if len(per_tensor) == 1 else torch.cat([v.to(device) for v in per_tensor])
    owner = every_bucket[0].plan
    coefficients: dict[float, Tensor] = {}
    for max_norm in dict.fromkeys(m for m in max_norms if m is not None):
        coefficient = owner.scratch(f"clip coefficient {max_norm!r}", "scalar", 0)
        _clip_coefficient_kernel[(1,)](squares, squares.numel(), coefficient, max_norm, eps, BLOCK=CLIP_BLOCK)
        coefficients[max_norm] = coefficient
    return [None if m is None else coefficients[m] for m in max_norms]


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
        grad_squares(table, table.pointers[0], dtype, grad_scale).sum().to(out_device)
        for _, (dtype,), _, table in planned_buckets("grad_norm", [grads], n_elementwise=1, n_table=1, plans=None)
    ]
    return torch.stack(squares).sum().sqrt()
