"""The multi-tensor launcher shared by every fused optimizer.

A fused step walks many tensors (a BERT-large has 391) with ONE kernel launch per pass. The
tensors of one (device, dtypes) group are cut into fixed-size chunks, and one Triton program
handles one chunk. What a program needs to find its chunk lives in a device-side int64 table:

    chunk_tensors[c]   which tensor chunk c belongs to
    numels[i]          the number of elements of tensor i
    first_chunks[i]    the first chunk of tensor i (n_chunks at index n_tensors); chunk c thus
                       starts at element (c - first_chunks[i]) * CHUNK_SIZE of its tensor, and
                       first_chunks delimits the segments over which per-chunk partial sums are
                       added up (see _norms.py)
    pointers[l][i]     data_ptr() of tensor i of list l (param, grad, each state, the step)

A kernel casts a pointer entry to `tl.pointer_type(dtype)` to load through it. The table depends
only on the tensors' addresses and sizes, so it is built once and cached, keyed on those;
a step whose tensors have not moved uploads nothing. The upload (on a cache miss) goes from
pinned memory without blocking the host.

Kernel layout, shared by every pass: the program reads its chunk's row of the table, then
calls the pass's `*_chunk` function twice over, once for full chunks and once (MASKED) for
the last chunk of each tensor. A full chunk's loads and stores carry no data-dependent mask, so
Triton can vectorise them (with the pointers' 16-byte alignment, ALIGNMENT, when it holds).

Under TRITON_INTERPRET=1 (how the tests run on CPU) the kernels execute on the host and
dereference these pointers directly, so only CPU tensors work there; compiled kernels need
CUDA tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "Chunking",
    "PRODUCTION_CHUNKING",
    "ChunkTable",
    "INTERPRETED",
    "TRITON_DTYPES",
    "advance_steps",
    "check_device",
    "check_dtype",
    "dtype_constexprs",
    "chunk_table",
    "chunking",
    "current_chunking",
    "group_by_device_and_dtypes",
    "launch",
    "log_beta",
    "lr_arguments",
    "scalar_on",
    "current_lr",
    "gradient_multiplier",
    "locate_chunk",
    "tensor_pointer",
]

# Whether this process's kernels are Triton-interpreted (decided when triton.jit wraps them, i.e.
# when largebatch.fused's kernel modules are imported: TRITON_INTERPRET=1 must be set before).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

TRITON_DTYPES: dict[torch.dtype, tl.dtype] = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


@triton.jit
def locate_chunk(chunk_tensors, numels, first_chunks, CHUNK_SIZE: tl.constexpr):
    """This program's chunk, from the table: (chunk index, tensor index, the tensor's numel,
    element offsets of the chunk, whether the chunk is full — a full chunk needs no mask)."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensors + chunk)
    numel = tl.load(numels + tensor)
    start = (chunk - tl.load(first_chunks + tensor)) * CHUNK_SIZE
    return chunk, tensor, numel, start + tl.arange(0, CHUNK_SIZE), start + CHUNK_SIZE <= numel


@triton.jit
def tensor_pointer(ptrs, tensor, DTYPE: tl.constexpr, ALIGNMENT: tl.constexpr):
    """A tensor's data pointer, from its int64 table entry, with the alignment hint for vector loads."""
    return tl.multiple_of(tl.load(ptrs + tensor).to(tl.pointer_type(DTYPE)), ALIGNMENT)


@triton.jit
def gradient_multiplier(grad_scale, clip_coef, MAXIMIZE: tl.constexpr):
    """What every gradient element is multiplied by: −1 to maximize, 1/grad_scale to undo
    GradScaler's scaling, the global clipping coefficient (each only when given)."""
    multiplier = -1.0 if MAXIMIZE else 1.0
    if grad_scale is not None:
        multiplier = multiplier / tl.load(grad_scale)
    if clip_coef is not None:
        multiplier = multiplier * tl.load(clip_coef)
    return multiplier


@triton.jit
def current_lr(lr_tensor, lr):
    """The step's lr: read from the device when it is a tensor (no host sync), else the float."""
    if lr_tensor is not None:
        lr = tl.load(lr_tensor)
    return lr


@dataclass(frozen=True)
class Chunking:
    """How tensors are cut for the kernels.

    chunk_size: elements handled by one program, all loaded at once (a power of two).
    num_warps: warps per program on the GPU (a power of two).
    """

    chunk_size: int
    num_warps: int

    def __post_init__(self) -> None:
        for name in ("chunk_size", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
                raise ValueError(f"Invalid {name}: {value!r} (must be a power of two)")


# 2048 elements and 8 warps: each thread streams 8 consecutive elements of every tensor (two
# 16-byte vectors in fp32). Compiled for sm_90, Adan's kernel then needs 80 registers and LAMB's
# moments 57, so 3-4 programs share an SM: ~150 KB in flight per SM, far above what the memory
# latency needs, and one program's table lookups overlap the others' streaming (4096 elements
# take Adan to 245 registers, one program per SM). BERT-large makes ~164 k programs, a table of
# ~1.3 MB against the 13 GB a LAMB step moves. Chosen from register counts, not yet timed on a GPU.
PRODUCTION_CHUNKING = Chunking(chunk_size=2048, num_warps=8)

_active_chunking: list[Chunking] = [PRODUCTION_CHUNKING]


def current_chunking() -> Chunking:
    return _active_chunking[-1]


@contextlib.contextmanager
def chunking(config: Chunking) -> Iterator[Chunking]:
    """Use `config` instead of PRODUCTION_CHUNKING for the fused steps run inside the block.

    For tuning, and for tests: under the interpreter a program costs milliseconds, so tests use
    small chunks, to cover multi-chunk tensors and tail chunks with few programs.
    """
    _active_chunking.append(config)
    try:
        yield config
    finally:
        _active_chunking.pop()


def check_device(device: torch.device) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter."""
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "fused=True on CPU tensors runs only under the Triton interpreter, which is for testing: set "
            "TRITON_INTERPRET=1 before largebatch.fused is imported, or use fused=False (foreach or "
            "per-tensor) on the CPU"
        )
    if device.type == "cuda" and INTERPRETED:
        raise RuntimeError(
            "fused=True under TRITON_INTERPRET=1 supports only CPU tensors (the interpreter runs the kernels "
            f"on the host, which cannot read {device} memory through the pointer table); unset "
            "TRITON_INTERPRET for CUDA tensors"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fused=True supports CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), got {device}")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        supported = ", ".join(str(d) for d in TRITON_DTYPES)
        raise RuntimeError(f"fused=True supports tensors of dtype {supported}; got {dtype}")


# --------------------------------------------------------------------------- grouping


GroupKey = tuple[torch.device, tuple[torch.dtype, ...]]


def group_by_device_and_dtypes(
    tensor_lists: Sequence[Sequence[Tensor]],
) -> dict[GroupKey, list[list[Tensor]]]:
    """Split parallel lists (params, grads, states, …) by the device and the dtypes of each row.

    A kernel is specialised on the dtype of every list, so a group is the set of indices i that
    share the device and (dtype of tensor_lists[0][i], dtype of tensor_lists[1][i], …).
    Order within a group follows the input order, so the grouping is deterministic.
    """
    groups: dict[GroupKey, list[list[Tensor]]] = {}
    for row in zip(*tensor_lists):
        key = (row[0].device, tuple(t.dtype for t in row))
        lists = groups.setdefault(key, [[] for _ in tensor_lists])
        for lst, tensor in zip(lists, row):
            lst.append(tensor)
    return groups


# --------------------------------------------------------------------------- chunk tables


@dataclass(frozen=True)
class ChunkTable:
    """The device-side table of one group (see the module docstring); views into one int64 tensor."""

    storage: Tensor
    chunk_tensors: Tensor
    numels: Tensor
    first_chunks: Tensor
    pointers: tuple[Tensor, ...]
    n_tensors: int
    n_chunks: int
    # 16 when every elementwise tensor starts on a 16-byte boundary (then the kernels may use
    # vector loads), else 1; a kernel constexpr.
    alignment: int
    # The pinned host copy, kept alive while its asynchronous upload may still be reading it.
    host_copy: Tensor


# Tables are few (one per group and list combination) and small; 64 covers an optimizer with
# many param groups and dtypes, plus the grad-norm tables, without rebuilding any per step.
TABLE_CACHE_ENTRIES = 64
_table_cache: OrderedDict[tuple, ChunkTable] = OrderedDict()


def chunk_table(
    elementwise: Sequence[Sequence[Tensor]],
    scalars: Sequence[Sequence[Tensor]] = (),
    chunk_size: int | None = None,
) -> ChunkTable:
    """The table for one group: `elementwise` lists are walked in chunks (all shaped like
    elementwise[0]); `scalars` lists (the step counters) contribute one pointer per tensor.

    Cached: the key is every pointer and size, so a moved or resized tensor rebuilds the table
    and the validation below runs only on a rebuild.
    """
    if chunk_size is None:
        chunk_size = current_chunking().chunk_size
    lists = [*elementwise, *scalars]
    device = elementwise[0][0].device
    key = (
        device,
        chunk_size,
        len(elementwise),
        tuple(t.numel() for t in elementwise[0]),
        tuple(t.data_ptr() for lst in lists for t in lst),
    )
    table = _table_cache.get(key)
    if table is not None:
        _table_cache.move_to_end(key)
        return table
    _validate(elementwise, scalars, device)
    table = _build_table(lists, len(elementwise), chunk_size, device)
    _table_cache[key] = table
    if len(_table_cache) > TABLE_CACHE_ENTRIES:
        _table_cache.popitem(last=False)
    return table


def _validate(elementwise: Sequence[Sequence[Tensor]], scalars: Sequence[Sequence[Tensor]], device: torch.device) -> None:
    check_device(device)
    for lst in elementwise:
        check_dtype(lst[0].dtype)
    for i, param in enumerate(elementwise[0]):
        # The kernels walk each tensor's storage as a flat array, which is right when every
        # tensor of the row is dense and laid out like the parameter (channels_last included).
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
        for i, scalar in enumerate(lst):
            if scalar.numel() != 1 or scalar.dtype != torch.float32 or scalar.device != device:
                raise RuntimeError(
                    "fused=True needs each step counter to be a one-element float32 tensor on its parameter's "
                    f"device; counter {i} is {tuple(scalar.shape)} {scalar.dtype} on {scalar.device}"
                )


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


# Bytes: the widest vector load, and what torch's allocator guarantees for whole tensors.
VECTOR_ALIGNMENT = 16


def _build_table(
    lists: Sequence[Sequence[Tensor]], n_elementwise: int, chunk_size: int, device: torch.device
) -> ChunkTable:
    shaped_like = lists[0]
    chunk_tensors: list[int] = []
    first_chunks: list[int] = []
    for i, tensor in enumerate(shaped_like):
        first_chunks.append(len(chunk_tensors))
        chunk_tensors.extend([i] * -(-tensor.numel() // chunk_size))
    n_chunks, n_tensors = len(chunk_tensors), len(shaped_like)
    first_chunks.append(n_chunks)
    numels = [t.numel() for t in shaped_like]
    pointers = [t.data_ptr() for lst in lists for t in lst]
    aligned = all(t.data_ptr() % VECTOR_ALIGNMENT == 0 for lst in lists[:n_elementwise] for t in lst)
    host = torch.tensor(chunk_tensors + numels + first_chunks + pointers, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    storage = host.to(device, non_blocking=True)
    views = storage.split([n_chunks, n_tensors, n_tensors + 1] + [n_tensors] * len(lists))
    return ChunkTable(
        storage=storage,
        chunk_tensors=views[0],
        numels=views[1],
        first_chunks=views[2],
        pointers=tuple(views[3:]),
        n_tensors=n_tensors,
        n_chunks=n_chunks,
        alignment=VECTOR_ALIGNMENT if aligned else 1,
        host_copy=host,
    )


def launch(kernel: triton.JITFunction, table: ChunkTable, *args: object, **constexprs: object) -> None:
    """One launch of `kernel`, one program per chunk of `table`.

    The kernel's parameters start with the table's (chunk_tensors, numels, first_chunks,
    *pointers), then `args`; CHUNK_SIZE and ALIGNMENT are passed for it.
    """
    if table.n_chunks == 0:
        return
    config = current_chunking()
    kernel[(table.n_chunks,)](
        table.chunk_tensors,
        table.numels,
        table.first_chunks,
        *table.pointers,
        *args,
        CHUNK_SIZE=config.chunk_size,
        ALIGNMENT=table.alignment,
        num_warps=config.num_warps,
        **constexprs,
    )


# --------------------------------------------------------------------------- small helpers


def scalar_on(value: Tensor | None, device: torch.device) -> Tensor | None:
    """A device-side scalar (lr, grad_scale, found_inf, clip coefficient) as a 0-dim fp32 tensor
    on `device`, for the kernels to load; None stays None. No host synchronisation."""
    if value is None:
        return None
    return value.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())


def lr_arguments(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float]:
    """The kernels' (lr_tensor, lr) arguments: a tensor lr is loaded in-kernel, so changing it
    (a scheduler, a captured CUDA graph) needs no host synchronisation; a float goes by value."""
    if isinstance(lr, Tensor):
        return scalar_on(lr, device), 0.0
    return None, float(lr)


def dtype_constexprs(names: Sequence[str], dtypes: Sequence[torch.dtype]) -> dict[str, tl.dtype]:
    """{NAME_DTYPE: triton dtype} for the kernel constexprs that type each pointer row."""
    return {f"{name}_DTYPE": TRITON_DTYPES[dtype] for name, dtype in zip(names, dtypes)}


def log_beta(beta: float) -> float:
    """ln β, computed in float64 on the host.

    Kernels form the bias correction 1 − β^t as 1 − exp(t · ln β) in float64: β rounded to fp32
    and 1 − β^t formed in fp32 would be off by ~1e-5 relative at β = 0.999, t = 1. β = 0 gives
    ln β = -inf, so β^t = 0 and the correction is 1, as it should be.
    """
    return math.log(beta) if beta > 0 else -math.inf


def advance_steps(steps: Sequence[Tensor], found_inf: Tensor | None) -> None:
    """step += 1, or += 0 when GradScaler found an inf/NaN (the step is then not counted).

    One foreach op, no host synchronisation; the kernels then read the new counts.
    """
    if found_inf is None:
        torch._foreach_add_(list(steps), 1.0)
    else:
        increment = 1.0 - found_inf
        torch._foreach_add_(list(steps), [increment] * len(steps))
