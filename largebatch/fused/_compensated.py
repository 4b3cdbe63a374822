"""Buckets of a fused step whose parameters may carry Kahan compensation buffers.

A compensated parameter's bucket has one more elementwise list, its buffers, placed after the
other elementwise lists (so the plan walks them in chunks like the states); the kernels take
them as a `comp_ptrs` row after the step counters' (None for a bucket without buffers) and a
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
) -> list[Bucket]:
    """`planned_buckets` of `lists` (layout `n_elementwise`, `n_table`), with `comps[i]` added
    to row i where it is not None (see the module docstring). Every bucket is checked before
    this returns."""
    if comps is None:
        return planned_buckets(name, lists, n_elementwise=n_elementwise, n_table=n_table, plans=plans)
    rows = [i for i, comp in enumerate(comps) if comp is not None]
    plain = [i for i, comp in enumerate(comps) if comp is None]
    if not plain:
        with_comps = [*lists[:n_elementwise], list(comps), *lists[n_elementwise:]]
        return planned_buckets(
            f"{name}+kahan", with_comps, n_elementwise=n_elementwise + 1, n_table=n_table + 1, plans=plans
        )
    buckets = []
    if rows:
        buckets += compensated_buckets(
            name, [[lst[i] for i in rows] for lst in lists], [comps[i] for i in rows],
            n_elementwise=n_elementwise, n_table=n_table, plans=plans,
        )  # fmt: skip
    buckets += planned_buckets(
        name, [[lst[i] for i in plain] for lst in lists], n_elementwise=n_elementwise, n_table=n_table, plans=plans
    )
    return buckets


def kernel_pointers(table: StepPlan, n_elementwise: int, n_table: int) -> tuple[Tensor | None, ...]:
    """The pointer rows of `table` in the kernels' order: those of the layout, then the
    compensation buffers' row, or None for a bucket without buffers."""
    rows = table.pointers
    if len(rows) == n_table:
        return (*rows, None)
    return (*rows[:n_elementwise], *rows[n_elementwise + 1 :], rows[n_elementwise])


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
