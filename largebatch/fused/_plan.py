"""Step plans: what a fused step prepares once and re-checks on every step.

A fused step over one bucket of tensors (one param group's tensors on one device, with one dtype
per list) launches kernels that find their chunk and their tensors through a device-side int64
table (see `_engine`). A `StepPlan` holds that table and everything else that depends only on
the tensors' sizes:

    chunk_tensors[c]   which tensor chunk c belongs to
    numels[i]          the number of elements of tensor i
    first_chunks[i]    the first chunk of tensor i (n_chunks at index n_tensors); every tensor
                       has one, an empty tensor one chunk of no elements
    aligned[i]         1 when every pointer of tensor i is 16-byte aligned (its full chunks use
                       vector loads), else 0
    pointers[l][i]     data_ptr() of tensor i of list l (param, grad, each state, the step)

plus the per-chunk partial sums and per-tensor tables (sums, bias corrections), allocated at
the first step and reused, so that a later step whose tensors have not moved allocates nothing
and uploads nothing.

Plans belong to their owner: an optimizer keeps one `PlanCache` per param group (dropped on
`load_state_dict`); a functional call without a cache builds a throw-away plan. Nothing is global,
so a captured CUDA graph can never read a table that an unrelated step evicted, and an optimizer
with any number of groups rebuilds nothing in steady state.

Every step, reused plan or new, checks every tensor of every list against what the plan assumes
before anything is launched or mutated; a mismatch raises the same RuntimeError that building
the plan would (`validate_lists`). Only pointer rows that moved are uploaded (a gradient list
freshly allocated by backward is one row: a few KB). How each list is checked:

* parameters and gradients, every step: data_ptr(), shape, layout (one is_contiguous() flag
  per tensor when all are contiguous, else the strides) and dtype of every tensor, the device
  of those that moved (C-level maps over the list; the full validation only when something
  differs);
* the optimizer's own states and step counters (lists from `owned_from` on): when each tensor is
  the very object the plan last checked and its version counter has not moved since, nothing
  about it can have changed (torch bumps `_version` for every in-place op, resize_, set_ and
  in-place views included), so the list is not re-read; otherwise it is checked like a gradient.
  The one change that leaves `_version` alone is assigning `.data` of a state tensor, which no
  optimizer state should see. The kernels bump no version (`_engine.mark_written` bumps the
  parameters' for autograd; parameters are always re-checked; the step counters are counted
  in-kernel). A fused optimizer keeps each state of a group as views of one buffer per key
  (`largebatch.optimizers._pooling`): views share their buffer's version counter, so such a
  list costs one version read, not one per tensor.

Device identity needs no per-tensor check while pointers stay put: CUDA's unified virtual
addressing gives every allocation, host or any device, its own address, so an unchanged
data_ptr() is an unchanged device.
"""

from __future__ import annotations

import array
import functools
import operator
from collections.abc import Sequence
from itertools import chain
from operator import attrgetter, is_
from typing import Any, NamedTuple

import torch
from torch import Tensor

from largebatch.optimizers._quantised import BLOCK_SIZE, num_blocks

from ._engine import VECTOR_ALIGNMENT, check_device, check_dtype, current_chunking

__all__ = ["Bucket", "PlanCache", "StepPlan", "bucket_tensor_lists", "planned_buckets", "validate_lists"]

_shape = attrgetter("shape")
_device = attrgetter("device")
_dtype = attrgetter("dtype")
_version = attrgetter("_version")


def _aligned(pointers: Sequence[int]) -> bool:
    """Every pointer a multiple of VECTOR_ALIGNMENT (a power of two): no low bit set in any."""
    return functools.reduce(operator.or_, pointers, 0) % VECTOR_ALIGNMENT == 0


def _aligned_tensors(rows: Sequence[Sequence[int]], rows_aligned: Sequence[bool]) -> list[int]:
    """Per tensor, 1 when its pointer in every row is aligned: all ones when every row is, else
    decided tensor by tensor (a view at an odd offset costs only its own tensor the vectors)."""
    if all(rows_aligned):
        return [1] * len(rows[0])
    return [int(_aligned(column)) for column in zip(*rows)]


def _layout(tensor: Tensor) -> tuple[int, ...]:
    """The strides that matter: those of dimensions longer than 1 (none for 0 or 1 element)."""
    if tensor.numel() <= 1:
        return ()
    return tuple(stride for size, stride in zip(tensor.shape, tensor.stride()) if size > 1)


def _is_dense(tensor: Tensor) -> bool:
    """Non-overlapping and without gaps: in increasing stride order, each stride is the number
    of elements spanned by the dimensions before it (any permutation of a contiguous layout)."""
    if tensor.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def validate_lists(
    elementwise: Sequence[Sequence[Tensor]],
    scalars: Sequence[Sequence[Tensor]],
    blockwise: Sequence[Sequence[Tensor]] = (),
) -> None:
    """Raise RuntimeError, naming the tensor, unless the kernels can walk these lists: CUDA (or,
    interpreted, CPU) tensors of a supported dtype, one dtype per list, dense parameters, every
    companion laid out like its parameter on its device, one-element float32 step counters, and
    (8-bit states: `blockwise` lists given) contiguous float32 scales, one per BLOCK_SIZE
    elements of their parameter; only then may state lists hold integer codes."""
    params = elementwise[0]
    device = params[0].device
    check_device(device)
    for index, lst in enumerate(elementwise):
        check_dtype(lst[0].dtype, codes=bool(blockwise) and index >= 2)
        if len(lst) != len(params):
            raise RuntimeError(f"fused=True needs parallel tensor lists; list {index} has {len(lst)} tensors, not {len(params)}")
        if any(t.dtype != lst[0].dtype for t in lst):
            raise RuntimeError(f"fused=True needs one dtype per tensor list of a bucket; list {index} mixes dtypes")
    for i, param in enumerate(params):
        # The kernels walk each tensor's storage as a flat array, which is right when every
        # tensor of the row is dense and laid out like the parameter (channels_last included).
        if param.device != device:
            raise RuntimeError(f"fused=True needs one device per bucket; tensor {i} is on {param.device}, not {device}")
        if not _is_dense(param):
            raise RuntimeError(f"fused=True needs dense parameters; tensor {i} has strides {param.stride()}")
        for lst in elementwise[1:]:
            other = lst[i]
            if other.device != device or other.shape != param.shape or _layout(other) != _layout(param):
                raise RuntimeError(
                    f"fused=True needs each gradient and state laid out like its parameter: tensor {i} is "
                    f"{tuple(param.shape)}/{param.stride()} on {device}, one of its companions "
                    f"{tuple(other.shape)}/{other.stride()} on {other.device}"
                )
    for lst in scalars:
        if len(lst) != len(params):
            raise RuntimeError(f"fused=True needs one step counter per tensor; got {len(lst)} for {len(params)} tensors")
        for i, scalar in enumerate(lst):
            if scalar.numel() != 1 or scalar.dtype != torch.float32 or scalar.device != device:
                raise RuntimeError(
                    "fused=True needs each step counter to be a one-element float32 tensor on its parameter's "
                    f"device; counter {i} is {tuple(scalar.shape)} {scalar.dtype} on {scalar.device}"
                )
    for lst in blockwise:
        if len(lst) != len(params):
            raise RuntimeError(f"fused=True needs one scale list per tensor; got {len(lst)} for {len(params)} tensors")
        for i, (scales, param) in enumerate(zip(lst, params)):
            blocks = num_blocks(param.numel())
            if scales.dtype != torch.float32 or scales.device != device or scales.numel() != blocks or not scales.is_contiguous():
                raise RuntimeError(
                    f"fused=True needs the scales of 8-bit states to be {blocks} contiguous float32 values (one per "
                    f"{BLOCK_SIZE} elements) on the parameter's device; those of tensor {i} are "
                    f"{tuple(scales.shape)} {scales.dtype} on {scales.device}"
                )


def _pooled_bases(lists: Sequence[Sequence[Tensor]]) -> list[Tensor] | None:
    """Per list, the one tensor every tensor of it is a view of; None unless every list has one."""
    bases = []
    for lst in lists:
        base = lst[0]._base if lst else None
        if base is None or any(t._base is not base for t in lst):
            return None
        bases.append(base)
    return bases


class StepPlan:
    """The table, buffers and checks of one bucket (see the module docstring).

    lists: the bucket's parallel lists; the first `n_elementwise` are walked in chunks (all
        shaped like lists[0]), the last `n_blockwise` are the per-block scales of 8-bit states
        (`_blockwise`), the others one-element step counters.
    n_table: how many leading lists have a pointer row in the table (the kernels' arguments).
    owned_from: lists from this index on are the optimizer's own (states and counters).

    A plan with scales needs chunks of whole blocks (the kernels take a block's absmax within one
    chunk): a ValueError unless `chunk_size` is a multiple of BLOCK_SIZE.
    """

    def __init__(
        self,
        lists: Sequence[Sequence[Tensor]],
        *,
        n_elementwise: int,
        n_table: int,
        owned_from: int,
        chunk_size: int,
        n_blockwise: int = 0,
    ) -> None:
        if n_blockwise and chunk_size % BLOCK_SIZE:
            raise ValueError(
                f"Invalid chunk_size={chunk_size} for 8-bit states: fused kernels quantise blocks of {BLOCK_SIZE} "
                "elements within one chunk, so the chunk size must be a multiple of it"
            )
        self.n_elementwise, self.n_blockwise, self.n_lists = n_elementwise, n_blockwise, len(lists)
        self._validate(lists)
        params = lists[0]
        self.device = params[0].device
        self.chunk_size, self.owned_from = chunk_size, owned_from
        self.n_tensors = len(params)
        self.shapes = list(map(_shape, params))
        self.dtypes = [lst[0].dtype for lst in lists]
        self.strides = [list(map(Tensor.stride, lst)) for lst in lists[:n_elementwise]]
        self.pointer_rows = [list(map(Tensor.data_ptr, lst)) for lst in lists]
        self._owned: list[list[Tensor]] = [[] for _ in lists]
        # Per owned list, the sum of its tensors' version counters: counters only grow, so an
        # unchanged sum means no tensor of the list was modified in place.
        self._version_sums: list[int] = [0 for _ in lists]
        # The owned lists' tensors end to end, and their versions' total (`_all_untouched`).
        self._owned_flat: list[Tensor] = []
        self._owned_version_sum = 0
        # Per owned list, the buffer its tensors are all views of, when every list has one
        # (largebatch.optimizers pools a fused group's states), and those buffers' versions.
        self._pooled_bases: list[Tensor] | None = None
        self._pooled_version_sum: int | None = None
        self._remember(lists, range(owned_from, len(lists)))

        chunk_tensors: list[int] = []
        first_chunks: list[int] = []
        for i, tensor in enumerate(params):
            first_chunks.append(len(chunk_tensors))
            chunk_tensors.extend([i] * max(1, -(-tensor.numel() // chunk_size)))
        self.n_chunks = len(chunk_tensors)
        first_chunks.append(self.n_chunks)
        numels = [t.numel() for t in params]
        self.block_counts = list(map(num_blocks, numels)) if n_blockwise else []
        # Per elementwise list: every pointer on a 16-byte boundary (then every tensor's is).
        self._aligned_rows = [_aligned(row) for row in self.pointer_rows[:n_elementwise]]
        self.aligned_tensors = _aligned_tensors(self.pointer_rows[:n_elementwise], self._aligned_rows)
        table_pointers = [ptr for row in self.pointer_rows[:n_table] for ptr in row]
        self.storage = self._upload(
            torch.tensor(chunk_tensors + numels + first_chunks + self.aligned_tensors + table_pointers, dtype=torch.int64)
        )
        views = self.storage.split([self.n_chunks, self.n_tensors, self.n_tensors + 1] + [self.n_tensors] * (n_table + 1))
        self.chunk_tensors, self.numels, self.first_chunks, self.aligned = views[:4]
        self.pointers = tuple(views[4:])

        self._device_index = params[0].get_device()
        self._scratch: dict[tuple[str, str, int], Tensor] = {}
        self.uploads = 0

    def current(self, lists: Sequence[Sequence[Tensor]]) -> bool:
        """Make the plan current for this step's `lists`: True, or False when they are not this
        plan's bucket (other sizes, counts, dtypes or device: the caller then re-buckets or builds
        a new plan). Raises, changing nothing, what `validate_lists` raises for lists that are
        this bucket's but that the kernels cannot walk (a layout or a counter gone wrong)."""
        if len(lists) != self.n_lists or any(len(lst) != self.n_tensors for lst in lists):
            return False
        if list(map(_shape, lists[0])) != self.shapes:
            return False
        owned = range(self.owned_from, self.n_lists)
        if self._all_untouched(lists):
            checked = list(range(self.owned_from))
        else:
            checked = [*range(self.owned_from), *(i for i in owned if not self._untouched(i, lists[i]))]
        rows = {i: list(map(Tensor.data_ptr, lists[i])) for i in checked}
        moved = [i for i in checked if rows[i] != self.pointer_rows[i]]
        for i in checked:
            if set(map(_dtype, lists[i])) != {self.dtypes[i]}:
                return False
        # Device indices (-1 for the CPU): ints, cheaper to read than torch.device objects.
        if any(set(map(Tensor.get_device, lists[i])) != {self._device_index} for i in moved):
            return False
        if not self._layouts_hold(lists, checked):
            self._validate(lists)  # raises where the kernels cannot go
            self.strides = [list(map(Tensor.stride, lst)) for lst in lists[: self.n_elementwise]]
        if moved and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fused=True: tensors moved while a CUDA graph is being captured (a captured step must see the same "
                "parameters, gradients and states as the warm-up steps before it)"
            )
        for i in moved:
            self.pointer_rows[i] = rows[i]
            if i < len(self.pointers):
                self._upload_row(self.pointers[i], rows[i])
            if i < self.n_elementwise:
                self._aligned_rows[i] = _aligned(rows[i])
        if any(i < self.n_elementwise for i in moved):
            aligned_tensors = _aligned_tensors(self.pointer_rows[: self.n_elementwise], self._aligned_rows)
            if aligned_tensors != self.aligned_tensors:
                self.aligned_tensors = aligned_tensors
                self._upload_row(self.aligned, aligned_tensors)
        self._remember(lists, [i for i in checked if i >= self.owned_from])
        return True

    def _validate(self, lists: Sequence[Sequence[Tensor]]) -> None:
        """`validate_lists` of `lists`, split as this plan's layout says."""
        scalars_end = self.n_lists - self.n_blockwise
        validate_lists(lists[: self.n_elementwise], lists[self.n_elementwise : scalars_end], lists[scalars_end:])

    def scratch(self, name: str, per: str, columns: int) -> Tensor:
        """The float32 buffer `name` of `columns` per chunk (per="chunk") or per tensor
        (per="tensor"), or one 0-dim value (per="scalar"), made once and reused by every later step
        (a captured step allocates nothing)."""
        key = (name, per, columns)
        if key not in self._scratch:
            shape = () if per == "scalar" else ({"chunk": self.n_chunks, "tensor": self.n_tensors}[per], columns)
            self._scratch[key] = torch.empty(shape, dtype=torch.float32, device=self.device)
        return self._scratch[key]

    def _untouched(self, index: int, lst: Sequence[Tensor]) -> bool:
        """Every tensor is the object last checked, with no in-place op on it since."""
        return all(map(is_, lst, self._owned[index])) and sum(map(_version, lst)) == self._version_sums[index]

    def _all_untouched(self, lists: Sequence[Sequence[Tensor]]) -> bool:
        """`_untouched` of every owned list at once: one identity pass over them all, then one
        version read per list whose tensors are views of one pooled buffer (views share their
        base's version counter, which any in-place op on any of them bumps), else one per tensor."""
        owned = list(chain.from_iterable(lists[self.owned_from :]))
        if len(owned) != len(self._owned_flat) or not all(map(is_, owned, self._owned_flat)):
            return False
        if self._pooled_bases is not None:
            return sum(map(_version, self._pooled_bases)) == self._pooled_version_sum
        return sum(map(_version, owned)) == self._owned_version_sum

    def _remember(self, lists: Sequence[Sequence[Tensor]], indices: Sequence[int]) -> None:
        """Note the tensors of lists[i] and their versions as checked."""
        for i in indices:
            self._owned[i], self._version_sums[i] = list(lists[i]), sum(map(_version, lists[i]))
        if indices:
            self._owned_flat = list(chain.from_iterable(self._owned[self.owned_from :]))
            self._owned_version_sum = sum(self._version_sums)
            self._pooled_bases = _pooled_bases(self._owned[self.owned_from :])
            self._pooled_version_sum = None if self._pooled_bases is None else sum(map(_version, self._pooled_bases))

    def _layouts_hold(self, lists: Sequence[Sequence[Tensor]], checked: Sequence[int]) -> bool:
        """The fast layout check of the lists that need one: shapes (the parameters' were compared
        already) and layouts, counters of one element. When the parameters are all contiguous, a
        list that is all contiguous too is laid out like them (contiguous strides follow from
        the shape, but for dimensions of size 1, which no layout check counts): one flag per
        tensor. Otherwise the strides must be those the plan last accepted. True only for lists
        `validate_lists` accepts; anything else goes to it, for its error."""
        params_contiguous = all(map(Tensor.is_contiguous, lists[0]))
        for i in checked:
            if i < self.n_elementwise:
                if i and list(map(_shape, lists[i])) != self.shapes:
                    return False
                if not (params_contiguous and (i == 0 or all(map(Tensor.is_contiguous, lists[i])))):
                    if list(map(Tensor.stride, lists[i])) != self.strides[i]:
                        return False
            elif i >= self.n_lists - self.n_blockwise:
                if list(map(Tensor.numel, lists[i])) != self.block_counts or not all(map(Tensor.is_contiguous, lists[i])):
                    return False
            elif set(map(Tensor.numel, lists[i])) != {1}:
                return False
        return True

    def _upload_row(self, row: Tensor, values: list[int]) -> None:
        """Overwrite one row of the table with `values` (counted in `uploads`), without blocking
        the host: through an int64 array (half the cost of torch.tensor(list) for a few hundred
        pointers) and, on CUDA, pinned memory (whose caching allocator keeps the block until the
        copy has read it)."""
        host = torch.frombuffer(array.array("q", values), dtype=torch.int64)
        row.copy_(host.pin_memory() if self.device.type == "cuda" else host, non_blocking=True)
        self.uploads += 1

    def _upload(self, host: Tensor) -> Tensor:
        """`host` on the plan's device without blocking the host: from pinned memory, whose
        caching allocator keeps the block until the copy has read it."""
        if self.device.type != "cuda":
            return host.to(self.device)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fused=True: a step plan cannot be built while a CUDA graph is being captured; run one eager step "
                "(on a side stream, as torch.cuda.graph's warm-up) before capturing"
            )
        return host.pin_memory().to(self.device, non_blocking=True)


class Bucket(NamedTuple):
    """One bucket of a fused step: its device and dtypes, its lists, and its current plan."""

    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    lists: Sequence[Sequence[Tensor]]
    plan: StepPlan


class PlanCache:
    """The step plans of one owner (an optimizer's param group), one per bucket.

    `builds` counts plan builds and `uploads` pointer-row uploads, for tests and benchmarks.
    """

    def __init__(self) -> None:
        self._plans: dict[Any, StepPlan] = {}
        # name -> the one plan of a group that had one bucket last step: tried first, before any
        # bucketing (what almost every group is: one device, one dtype).
        self._sole: dict[Any, StepPlan] = {}
        self.builds = 0

    @property
    def uploads(self) -> int:
        return sum(plan.uploads for plan in self._plans.values())

    def buckets(self, name: str, lists: Sequence[Sequence[Tensor]], **layout: int) -> list[Bucket]:
        """The buckets of `lists`, each with its plan made current (see `planned_buckets`)."""
        sole_key = (name, *sorted(layout.items()))  # a plan serves one chunking and one list layout
        sole = self._sole.get(sole_key)
        if sole is not None and sole.current(lists):
            return [Bucket(sole.device, tuple(sole.dtypes), lists, sole)]
        buckets = []
        for (device, dtypes), bucket in bucket_tensor_lists(lists).items():
            key = (*sole_key, device, dtypes)
            plan = self._plans.get(key)
            if plan is None or not plan.current(bucket):
                plan = self._plans[key] = StepPlan(bucket, **layout)
                self.builds += 1
            buckets.append(Bucket(device, dtypes, bucket, plan))
        if len(buckets) == 1:
            self._sole[sole_key] = buckets[0].plan
        else:
            self._sole.pop(sole_key, None)
        return buckets


def planned_buckets(
    name: str,
    lists: Sequence[Sequence[Tensor]],
    *,
    n_elementwise: int,
    n_table: int,
    plans: PlanCache | None,
    n_blockwise: int = 0,
) -> list[Bucket]:
    """Bucket `lists` (params, grads, states, then step counters and the last `n_blockwise`
    lists of 8-bit states' scales: the first `n_elementwise` walked in chunks, the first
    `n_table` in the kernels' table) and make each bucket's plan current.

    Every bucket is checked before this returns, so a refused step raises before any bucket's
    tensors or counters change. Without `plans` (a functional call) each plan is built for this
    call only.
    """
    layout = dict(
        n_elementwise=n_elementwise,
        n_table=n_table,
        owned_from=min(2, n_elementwise),  # params and grads come first; the rest is optimizer state
        chunk_size=current_chunking().chunk_size,
        n_blockwise=n_blockwise,
    )
    if plans is not None:
        return plans.buckets(name, lists, **layout)
    return [
        Bucket(device, dtypes, bucket, StepPlan(bucket, **layout))
        for (device, dtypes), bucket in bucket_tensor_lists(lists).items()
    ]


def bucket_tensor_lists(
    lists: Sequence[Sequence[Tensor]],
) -> dict[tuple[torch.device, tuple[torch.dtype, ...]], list[Sequence[Tensor]]]:
    """Split parallel lists (params, grads, states, …) into buckets of one device and one dtype per list.

    A kernel is specialised on the dtype of every list, so a bucket is the set of indices i that
    share the device and (dtype of lists[0][i], dtype of lists[1][i], …). Order within a bucket
    follows the input order. The usual case, every list already uniform, is decided with one set
    per list and returns the lists as they are; only a mixed group takes the per-row split.
    """
    dtype_sets = [set(map(_dtype, lst)) for lst in lists]
    devices = set(map(_device, lists[0]))
    if len(devices) == 1 and all(len(dtypes) == 1 for dtypes in dtype_sets):
        key = (next(iter(devices)), tuple(next(iter(dtypes)) for dtypes in dtype_sets))
        return {key: list(lists)}
    buckets: dict[tuple[torch.device, tuple[torch.dtype, ...]], list[Sequence[Tensor]]] = {}
    for row in zip(*lists):
        key = (row[0].device, tuple(t.dtype for t in row))
        bucket = buckets.setdefault(key, [[] for _ in lists])
        for lst, tensor in zip(bucket, row):
            lst.append(tensor)  # type: ignore[attr-defined]
    return buckets
