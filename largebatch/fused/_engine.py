"""The multi-tensor launcher shared by every fused optimizer.

A fused step walks many tensors (a BERT-large has 391) with ONE kernel launch per pass. The
tensors of one bucket (one param group's tensors on one device, one dtype per list) are cut into
fixed-size chunks (an empty tensor has one chunk of no elements, so that every tensor has a
first chunk). What a program needs to find its chunks lives in a device-side int64 table that a
`StepPlan` (`_plan.py`) owns: which tensor each chunk belongs to, each tensor's numel, first
chunk and vector alignment, and each list's data pointers. A kernel casts a pointer entry to
`tl.pointer_type(dtype)` to load through it.

Kernel layout, shared by every pass: a program walks CHUNKS_PER_PROGRAM consecutive chunks
(`chunk_of`), so that its prologue (the step's scalars: lr, grad scale, found_inf, clipping)
is paid once for several chunks. For each chunk it reads the chunk's row of the table, then
calls the pass's `*_chunk` function in one of three variants: a full chunk of a tensor whose
pointers are all 16-byte aligned (ALIGNED: vector loads and stores), a full chunk of another
tensor, and (MASKED) the last chunk of each tensor. A full chunk's loads and stores carry no
data-dependent mask, so Triton can vectorise them. Alignment is decided per tensor: one view at
an odd offset costs its own chunks their vectors, not the whole bucket's.

Per-tensor scalars that depend on the step count (bias corrections) are computed once per
tensor by a small per-tensor pass (`count_steps`, which also increments the counters) into a
table of the plan's, not in every program.

Under TRITON_INTERPRET=1 (how the tests run on CPU) the kernels execute on the host and
dereference these pointers directly, so only CPU tensors work there; compiled kernels need
CUDA tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

if TYPE_CHECKING:
    from ._plan import StepPlan

__all__ = [
    "Chunking",
    "PRODUCTION_CHUNKING",
    "INTERPRETED",
    "TRITON_DTYPES",
    "CODE_DTYPES",
    "check_device",
    "check_dtype",
    "dtype_constexprs",
    "chunking",
    "current_chunking",
    "launch",
    "mark_written",
    "log_beta",
    "lr_arguments",
    "scalar_on",
    "current_lr",
    "gradient_multiplier",
    "chunk_of",
    "count_steps",
    "launch_per_tensor",
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
#: The dtypes of 8-bit state codes (``state_dtype="8bit"``, `_blockwise`): state lists only.
CODE_DTYPES: dict[torch.dtype, tl.dtype] = {torch.int8: tl.int8, torch.uint8: tl.uint8}


@triton.jit
def chunk_of(n_chunks, index, CHUNKS_PER_PROGRAM: tl.constexpr):
    """The index-th chunk this program walks, and whether it exists (the last program's range may
    run past the table)."""
    chunk = tl.program_id(0) * CHUNKS_PER_PROGRAM + index
    return chunk, chunk < n_chunks


@triton.jit
def locate_chunk(chunk, chunk_tensors, numels, first_chunks, aligned, CHUNK_SIZE: tl.constexpr):
    """Chunk `chunk`, from the table: (tensor index, the tensor's numel, element offsets of the
    chunk, whether the chunk is full — a full chunk needs no mask —, whether every pointer of the
    tensor is 16-byte aligned — its full chunks may use vector loads)."""
    tensor = tl.load(chunk_tensors + chunk)
    numel = tl.load(numels + tensor)
    start = (chunk - tl.load(first_chunks + tensor)) * CHUNK_SIZE
    vector_aligned = tl.load(aligned + tensor) != 0
    return tensor, numel, start + tl.arange(0, CHUNK_SIZE), start + CHUNK_SIZE <= numel, vector_aligned


@triton.jit
def tensor_pointer(ptrs, tensor, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A tensor's data pointer, from its int64 table entry, with the 16-byte alignment hint for
    vector loads when ALIGNED. (The hint holds only where the pointer is made: Triton drops it
    on a pointer passed into, or returned from, another function. So each `*_chunk` function
    makes its own pointers from the table rows.)"""
    pointer = tl.load(ptrs + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def count_steps(step_ptrs, n_tensors, found_inf, BLOCK: tl.constexpr):
    """step += 1 for this program's BLOCK tensors, or += 0 when found_inf is nonzero (GradScaler
    sums one flag per device: any nonzero value skips the step, and counters never go down).
    Returns (tensor indices, which exist, their counts after this step)."""
    tensors = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    exists = tensors < n_tensors
    counters = tl.load(step_ptrs + tensors, mask=exists, other=0).to(tl.pointer_type(tl.float32))
    increment = 1.0
    if found_inf is not None:
        increment = tl.where(tl.load(found_inf) != 0, 0.0, 1.0)
    step = tl.load(counters, mask=exists, other=0.0) + increment
    tl.store(counters, step, mask=exists)
    return tensors, exists, step


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

    chunk_size: elements of one chunk, all loaded at once (a power of two).
    num_warps: warps per program on the GPU (a power of two).
    chunks_per_program: consecutive chunks one program walks (a power of two), to amortise
        the program's prologue over several chunks.
    """

    chunk_size: int
    num_warps: int
    chunks_per_program: int = 1

    def __post_init__(self) -> None:
        for name in ("chunk_size", "num_warps", "chunks_per_program"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
                raise ValueError(f"Invalid {name}: {value!r} (must be a power of two)")


# 2048 elements and 8 warps: each thread streams 8 consecutive elements of every tensor (two
# 16-byte vectors in fp32). Compiled for sm_90, Adan's kernel then needs 80 registers and LAMB's
# moments 57, so 3-4 programs share an SM: ~150 KB in flight per SM, far above what the memory
# latency needs, and one program's table lookups overlap the others' streaming (4096 elements
# take Adan to 245 registers, one program per SM). BERT-large makes ~164 k programs, a table of
# ~1.3 MB against the 13 GB a LAMB step moves. Four chunks per program: ~41 k programs, each
# paying its prologue (the step's scalars) once for 8 k elements, still hundreds of programs per
# SM. Chosen from register counts, not yet timed on a GPU.
PRODUCTION_CHUNKING = Chunking(chunk_size=2048, num_warps=8, chunks_per_program=4)

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


# Bytes: the widest vector load, and what torch's allocator guarantees for whole tensors.
VECTOR_ALIGNMENT = 16


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


def check_dtype(dtype: torch.dtype, codes: bool = False) -> None:
    """A tensor dtype the kernels take (`codes`: a state list of 8-bit codes is allowed too)."""
    if dtype not in TRITON_DTYPES and not (codes and dtype in CODE_DTYPES):
        supported = ", ".join(str(d) for d in TRITON_DTYPES)
        raise RuntimeError(f"fused=True supports tensors of dtype {supported}; got {dtype}")


def launch(
    kernel: triton.JITFunction,
    table: StepPlan,
    *args: object,
    pointers: Sequence[Tensor | None] | None = None,
    **constexprs: object,
) -> None:
    """One launch of `kernel`, CHUNKS_PER_PROGRAM chunks of the plan's table per program.

    The kernel's parameters start with the table's (n_chunks, chunk_tensors, numels,
    first_chunks, aligned, *pointers: every pointer row of the plan, or the given rows), then
    `args`; CHUNK_SIZE and CHUNKS_PER_PROGRAM are passed for it.
    """
    config = current_chunking()
    kernel[(-(-table.n_chunks // config.chunks_per_program),)](
        table.n_chunks,
        table.chunk_tensors,
        table.numels,
        table.first_chunks,
        table.aligned,
        *(table.pointers if pointers is None else pointers),
        *args,
        CHUNK_SIZE=config.chunk_size,
        CHUNKS_PER_PROGRAM=config.chunks_per_program,
        num_warps=config.num_warps,
        **constexprs,
    )


# Tensors one program of a per-tensor pass (`count_steps`) handles, and its warps: the pass
# moves a few bytes per tensor, so one or two programs for a BERT-large.
TENSOR_BLOCK = 256
TENSOR_BLOCK_WARPS = 4


def launch_per_tensor(kernel: triton.JITFunction, table: StepPlan, *args: object, **constexprs: object) -> None:
    """One launch of a per-tensor pass over the plan's tensors: TENSOR_BLOCK tensors per program.
    The kernel's parameters start with (n_tensors, *args); BLOCK is passed for it."""
    kernel[(-(-table.n_tensors // TENSOR_BLOCK),)](
        table.n_tensors, *args, BLOCK=TENSOR_BLOCK, num_warps=TENSOR_BLOCK_WARPS, **constexprs
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
    return {f"{name}_DTYPE": {**TRITON_DTYPES, **CODE_DTYPES}[dtype] for name, dtype in zip(names, dtypes)}


def log_beta(beta: float) -> float:
    """ln β, computed in float64 on the host.

    Kernels form the bias correction 1 − β^t as 1 − exp(t · ln β) in float64, once per tensor
    and step (in the per-tensor pass that counts the step): β rounded to fp32
    and 1 − β^t formed in fp32 would be off by ~1e-5 relative at β = 0.999, t = 1. β = 0 gives
    ln β = -inf, so β^t = 0 and the correction is 1, as it should be.
    """
    return math.log(beta) if beta > 0 else -math.inf


def mark_written(params: Sequence[Tensor]) -> None:
    """Tell autograd that a fused step's kernels wrote `params`.

    The kernels write through raw pointers, which bump no version counter; torch's in-place ops
    (its fused optimizers' included) do, so that a graph that saved a parameter refuses to
    backward through the updated value. Parameters are what autograd graphs save, so theirs are
    bumped; the states' are left alone (nothing differentiates through them, and their unchanged
    versions are what a step plan's check of the optimizer's own lists reads).
    """
    torch.autograd.graph.increment_version(params)
