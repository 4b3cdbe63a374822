"""The multi-tensor launcher shared by every fused optimizer.

A fused step walks many tensors (a BERT-large has 391) with ONE kernel launch per pass. The
tensors of one bucket (one param group's tensors on one device, one dtype per list) are cut into
fixed-size chunks, and one Triton program handles one chunk. What a program needs to find its
chunk lives in a device-side int64 table that a `StepPlan` (`_plan.py`) owns: which tensor each
chunk belongs to, each tensor's numel and first chunk, and each list's data pointers. A kernel
casts a pointer entry to `tl.pointer_type(dtype)` to load through it.

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


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        supported = ", ".join(str(d) for d in TRITON_DTYPES)
        raise RuntimeError(f"fused=True supports tensors of dtype {supported}; got {dtype}")


def launch(
    kernel: triton.JITFunction,
    table: StepPlan,
    *args: object,
    pointers: Sequence[Tensor] | None = None,
    **constexprs: object,
) -> None:
    """One launch of `kernel`, one program per chunk of the plan's table.

    The kernel's parameters start with the table's (chunk_tensors, numels, first_chunks,
    *pointers: every pointer row of the plan, or the given rows), then `args`; CHUNK_SIZE and
    ALIGNMENT are passed for it.
    """
    if table.n_chunks == 0:
        return
    config = current_chunking()
    kernel[(table.n_chunks,)](
        table.chunk_tensors,
        table.numels,
        table.first_chunks,
        *(table.pointers if pointers is None else pointers),
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


def mark_written(params: Sequence[Tensor]) -> None:
    """Tell autograd that a fused step's kernels wrote `params`.

    The kernels write through raw pointers, which bump no version counter; torch's in-place ops
    (its fused optimizers' included) do, so that a graph that saved a parameter refuses to
    backward through the updated value. Parameters are what autograd graphs save, so theirs are
    bumped; the states' are left alone (nothing differentiates through them, and their unchanged
    versions are what a step plan's check of the optimizer's own lists reads).
    """
    torch.autograd.graph.increment_version(list(params))
