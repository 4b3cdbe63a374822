"""8-bit block-quantised states in the fused kernels (``state_dtype="8bit"``).

A quantised state is two lists (see `largebatch.optimizers._quantised`): its codes, one int8
(signed states) or uint8 (second moments) per element, laid out like the parameter, so the plan
walks them in chunks like any state; and its scales, one float32 absmax per block of BLOCK_SIZE
elements, which a bucket carries as its last lists (`StepPlan`'s `n_blockwise`) and the kernels
take as pointer rows after the step counters' (None each for a bucket of float states, which
compiles the quantisation out).

A kernel dequantises a chunk of codes c with their block's scale s as x = s · MAP[c] in float32,
computes the step from it, and requantises the new value: per block of the chunk its absmax a
becomes the scale and each element the code of the map value nearest to x / a (a binary search
over the map's sorted midpoints, counting those below |x / a|, as `_nearest_codes` does; the
division rounds to nearest, as torch's does). A chunk holds whole blocks (the plan refuses a
chunk size that is not a multiple of BLOCK_SIZE), so no block spans two programs and no
program reads a scale that another writes.

The step uses the exact float32 moments of this step, as the per-tensor and foreach paths do:
only what is kept between steps is 8-bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from largebatch.optimizers._quantised import BLOCK_SIZE, kernel_tables

from ._engine import tensor_pointer

__all__ = ["load_state", "quantised_lists", "rounded_like_stored", "store_state", "tables_of"]

# Where each map's 256 values (and its midpoints) start in `kernel_tables`: int8's, then uint8's.
_UNSIGNED_START: tl.constexpr = tl.constexpr(256)
_BLOCK: tl.constexpr = tl.constexpr(BLOCK_SIZE)


def quantised_lists(
    lists: Sequence[Sequence[Tensor]], layout: dict[str, int], scales: Sequence[list[Tensor] | None]
) -> tuple[list[Sequence[Tensor]], dict[str, int]]:
    """A fused step's lists and layout with the scale lists of its 8-bit states appended (as
    `StepPlan` takes them), or unchanged when there are none.

    Raises:
        ValueError: only some of the quantised states have scales (the kernels take all of an
            optimizer's moments 8-bit, or none), or a parameter is not contiguous: its blocks
            are runs of its elements in row-major order on every path, and the kernels walk a
            tensor's storage, which for another layout (channels_last) is another order.
    """
    given = [values for values in scales if values is not None]
    if not given:
        return list(lists), layout
    if len(given) != len(scales):
        raise ValueError(
            "fused=True with 8-bit states needs the scales of every quantised state (all of the functional form's "
            "*_scales lists, or none)"
        )
    if not all(map(Tensor.is_contiguous, lists[0])):
        index = next(i for i, p in enumerate(lists[0]) if not p.is_contiguous())
        raise ValueError(
            f"fused=True with state_dtype='8bit' needs contiguous parameters; tensor {index} is "
            f"{tuple(lists[0][index].shape)} with strides {lists[0][index].stride()} (channels_last or another "
            "layout): 8-bit blocks are runs of elements in row-major order, the kernels walk storage order. Use "
            "fused=False, or bf16 states, for such parameters"
        )
    return [*lists, *given], {**layout, "n_table": layout["n_table"] + len(given), "n_blockwise": len(given)}


def tables_of(quantised: bool, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """The kernels' (code_maps, midpoints) arguments: `kernel_tables` for a bucket with 8-bit
    states, (None, None) otherwise."""
    return kernel_tables(device) if quantised else (None, None)


@triton.jit
def _table_start(DTYPE: tl.constexpr):
    """Where the map (and the midpoints) of codes of DTYPE start in the tables."""
    start = _UNSIGNED_START
    if DTYPE == tl.int8:
        start = 0
    return start


@triton.jit
def _code_zero(DTYPE: tl.constexpr):
    """The map index of code 0: int8 codes run from -128, uint8 codes from 0."""
    zero = 0
    if DTYPE == tl.int8:
        zero = 128
    return zero


@triton.jit
def load_state(
    state_ptrs, scale_ptrs, code_maps, tensor, offsets, mask, other, DTYPE: tl.constexpr, ALIGNED: tl.constexpr
):  # fmt: skip
    """A chunk of a state in float32: as stored, or (`scale_ptrs` given) dequantised,
    scale[block] · MAP[code]."""
    state = tensor_pointer(state_ptrs, tensor, DTYPE, ALIGNED)
    if scale_ptrs is None:
        value = tl.load(state + offsets, mask=mask, other=other).to(tl.float32)
    else:
        scales = tensor_pointer(scale_ptrs, tensor, tl.float32, False)
        codes = tl.load(state + offsets, mask=mask, other=other).to(tl.int32)
        value = tl.load(code_maps + (_table_start(DTYPE) + _code_zero(DTYPE)) + codes)
        value = value * tl.load(scales + offsets // _BLOCK, mask=mask, other=other)
    return value


@triton.jit
def rounded_like_stored(value, scale_ptrs, DTYPE: tl.constexpr):
    """`value` as the state will hold it: rounded to DTYPE for a float state (whose step uses
    the stored moments, as the per-tensor path does), unchanged for an 8-bit one (whose step
    uses the exact float32 moments)."""
    if scale_ptrs is None:
        value = value.to(DTYPE).to(tl.float32)
    return value


@triton.jit
def store_state(
    state_ptrs, scale_ptrs, midpoints, tensor, offsets, mask, numel, value,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):  # fmt: skip
    """Store a chunk of a state: `value` in DTYPE, or (`scale_ptrs` given) quantised, each block's
    absmax as its scale and each element as its nearest code (see the module docstring)."""
    state = tensor_pointer(state_ptrs, tensor, DTYPE, ALIGNED)
    if scale_ptrs is None:
        tl.store(state + offsets, value.to(DTYPE), mask=mask)
    else:
        scales = tensor_pointer(scale_ptrs, tensor, tl.float32, False)
        if MASKED:
            value = tl.where(mask, value, 0.0)  # past the end: no part of the last block's absmax
        blocks = tl.reshape(value, (CHUNK_SIZE // _BLOCK, _BLOCK))
        absmax = tl.max(tl.abs(blocks), axis=1)
        divisor = tl.broadcast_to(tl.where(absmax > 0, absmax, 1.0)[:, None], (CHUNK_SIZE // _BLOCK, _BLOCK))
        normalised = tl.reshape(tl.math.div_rn(blocks, divisor), (CHUNK_SIZE,))
        magnitude = tl.abs(normalised)
        # The count of midpoints below |y|, bit by bit from 128 down: at most 255 (uint8), and
        # 127 for int8, whose 127 midpoints are padded with +inf.
        below = midpoints + (_table_start(DTYPE) - 1)  # below[k] is the k-th midpoint, k >= 1
        count = tl.zeros((CHUNK_SIZE,), dtype=tl.int32)
        for bit in tl.static_range(8):
            probe = count + (128 >> bit)
            count = tl.where(tl.load(below + probe) < magnitude, probe, count)
        if DTYPE == tl.int8:
            count = tl.where(normalised < 0, -count, count)
        tl.store(state + offsets, count.to(DTYPE), mask=mask)
        block_ids = tl.max(tl.reshape(offsets, (CHUNK_SIZE // _BLOCK, _BLOCK)), axis=1) // _BLOCK
        tl.store(scales + block_ids, absmax, mask=block_ids * _BLOCK < numel)
