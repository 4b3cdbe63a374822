"""Buckets of a fused step whose parameters may carry Kahan compensation buffers.

A compensated parameter's bucket has one more elementwise list, its buffers, placed after the
other elementwise lists (so the plan walks them in chunks like the states); the kernels take
them as a `comp_ptrs` row after the step counters' and any 8-bit states' scales' (None for a
bucket without buffers; see `kernel_pointers`) and a
KAHAN constexpr that compiles the compensation in or out. A group that mixes compensated (bf16,
fp16) and plain (fp32) parameters gets buckets of each kind; the plans of both live in the
same PlanCache, under different names.
"""

from __future__ import annotations

from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from ._engine import tensor_pointer
from ._plan import Bucket, PlanCache, StepPlan, planned_buckets

__all__ = ["compensated_buckets", "kernel_pointers", "load_compensation", "store_compensated"]


def compensated_buckets(
    name: str,
    lists: Sequence[Sequence[Tensor]],
    comps: Sequence[Tensor | None] | None,
    *,
    n_elementwise: int,
    n_table: int,
    plans: PlanCache | None,
    n_blockwise: int = 0,
) -> list[Bucket]:
    """`planned_buckets` of `lists` (layout `n_elementwise`, `n_table`, `n_blockwise`), with
    `comps[i]` added to row i where it is not None (see the module docstring). Every bucket is
    checked before this returns."""
    layout = dict(n_elementwise=n_elementwise, n_table=n_table, n_blockwise=n_blockwise, plans=plans)
    if comps is None:
        return planned_buckets(name, lists, **layout)
    rows = [i for i, comp in enumerate(comps) if comp is not None]
    plain = [i for i, comp in enumerate(comps) if comp is None]
    if not plain:
        with_comps = [*lists[:n_elementwise], list(comps), *lists[n_elementwise:]]
        return planned_buckets(
            f"{name}+kahan", with_comps, **{**layout, "n_elementwise": n_elementwise + 1, "n_table": n_table + 1}
        )
    buckets = []
    if rows:
        buckets += compensated_buckets(name, [[lst[i] for i in rows] for lst in lists], [comps[i] for i in rows], **layout)
    buckets += planned_buckets(name, [[lst[i] for i in plain] for lst in lists], **layout)
    return buckets


def kernel_pointers(table: StepPlan, n_elementwise: int, n_scales: int = 0) -> tuple[Tensor | None, ...]:
    """The pointer rows of `table` in the kernels' order: the layout's `n_elementwise` lists',
    the step counters', the `n_scales` scale lists' of 8-bit states (None each for a bucket
    without them), then the compensation buffers' (None for a bucket without buffers)."""
    rows = table.pointers
    assert table.n_blockwise in (0, n_scales), "the kernel takes another number of scale lists"
    comp = rows[n_elementwise] if table.n_elementwise > n_elementwise else None
    scales_from = len(rows) - table.n_blockwise
    scales = rows[scales_from:] if table.n_blockwise else (None,) * n_scales
    return (*rows[:n_elementwise], *rows[table.n_elementwise : scales_from], *scales, comp)


@triton.jit
def load_compensation(comp_ptrs, tensor, offsets, mask, other, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A chunk of a tensor's compensation buffer c, in float32."""
    comp = tensor_pointer(comp_ptrs, tensor, DTYPE, ALIGNED)
    return tl.load(comp + offsets, mask=mask, other=other).to(tl.float32)


@triton.jit
def store_compensated(
    param_ptrs, comp_ptrs, tensor, offsets, mask, param_value, comp_value, update,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Kahan-add `update` to a chunk of a parameter p (`param_value`, as loaded, in float32) with
    its buffer c (`comp_value`): y = u + c, t = round(p + y), c ← round(y − (t − p)), p ← t."""
    param = tensor_pointer(param_ptrs, tensor, DTYPE, ALIGNED)
    comp = tensor_pointer(comp_ptrs, tensor, DTYPE, ALIGNED)
    y = update + comp_value
    stored = (param_value + y).to(DTYPE)
    tl.store(param + offsets, stored, mask=mask)
    tl.store(comp + offsets, (y - (stored.to(tl.float32) - param_value)).to(DTYPE), mask=mask)
