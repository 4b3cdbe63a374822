"""8-bit block-quantised moment states: ``state_dtype="8bit"`` of LAMB, LARS and Adan.

A state x (a tensor shaped like its parameter) is stored as

* **codes**, one byte per element, shaped like the parameter (so state shapes, and the checks
  of a loaded checkpoint, are as without the option): ``torch.int8`` for signed states (first
  moments, LARS momentum, Adan's m and d), ``torch.uint8`` for unsigned ones (second moments:
  LAMB's v, Adan's n). The codes' dtype says which code map they index;
* **scales**, one float32 per block of `BLOCK_SIZE` consecutive elements (in row-major order;
  the last block may be shorter): the block's absmax, state key ``<key>_scale``.

The value of an element is ``scale[block] · MAP[code]``, with a *dynamic* code map (after
Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization"): the map's values are
spread over seven decades of |x| / absmax, from 10⁻⁶ to 1, each decade split linearly, with
more steps in the larger decades (1, 2, 4, …, 64 per decade and sign for the signed map; twice
that, 3 in the lowest decade, for the unsigned map, which has no sign to encode). Quantising
picks the nearest map value. A linear map (absmax · k/255 for unsigned states) would round every
|x| < absmax/510 of a block to zero: second moments, which span many decades within a block,
would then read 0 and the step m / (√v + ε) would blow up (tests/optimizers/
test_quantised_states.py shows the zeros).

The absolute error is at most half the gap between neighbouring map values:
``|x − deq(q(x))| ≤ absmax · HALF_GAP`` overall (0.0071 signed, 0.0036 unsigned), and at most
absmax · 0.45·10^(i−6) / n_i in decade i (n_i steps there): 0.35–3.5 % (unsigned) or 0.7–7 %
(signed) of |x| in the top decade, more in the lower ones; below absmax · 5·10⁻⁷ (signed) or 2·10⁻⁷ (unsigned) an
element reads 0.

A step dequantises the states of a slice of the parameters to float32 (float64 for float64
parameters) working tensors, runs the optimizer's ordinary per-tensor or foreach body on them,
and requantises them (`step_on_working_states`): the parameter update uses the exact fp32
moments of this step, as bitsandbytes' kernels do, and only what is kept between steps is
8-bit. The per-tensor path works one tensor at a time; the foreach path one cache-sized chunk
(a bounded one on accelerators), (de)quantising tensor by tensor. The fused kernels do the same
in registers, chunk by chunk (`largebatch.fused._blockwise`, with `kernel_tables`), and give the
same codes for the same float32 values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE",
    "EIGHT_BIT",
    "HALF_GAP",
    "check_unsharded",
    "code_map",
    "dequantised",
    "new_codes",
    "kernel_tables",
    "num_blocks",
    "quantise_",
    "quantised",
    "run_body",
    "scale_key",
    "step_on_working_states",
]

#: The ``state_dtype`` value that asks for 8-bit block-quantised states.
EIGHT_BIT = "8bit"
#: Elements per scale (torchao's AdamW8bit uses 256, bitsandbytes 2048 on GPU): 4/256 = 1.6 %
#: of a byte per element on top of the code.
BLOCK_SIZE = 256
#: Elements dequantised at once by the foreach path off the CPU (the CPU uses the cache-sized
#: chunks of the other foreach bodies): bounds the float32 working copies to 64 MiB a state.
DEVICE_CHUNK_ELEMENTS = 1 << 24
#: Blocks quantised at once: bounds the search's int32 temporaries (five of the rows' size).
QUANTISE_ROWS = 256
# Steps per decade (of |x| / absmax, from the 10⁻⁶ decade up to the 10⁰ one) and sign.
_SIGNED_STEPS = (1, 2, 4, 8, 16, 32, 64)
_UNSIGNED_STEPS = (3, 4, 8, 16, 32, 64, 128)


def _positive_values(steps: Sequence[int]) -> Tensor:
    """The positive map values: per decade [10^(i−7), 10^(i−6)], `steps[i]` values spaced
    linearly up to and including its top, so that 1 (the block's absmax) is exact."""
    values = []
    for exponent, count in zip(range(-len(steps) + 1, 1), steps):
        top = 10.0**exponent
        values.append(torch.linspace(0.1 * top, top, count + 1, dtype=torch.float64)[1:])
    return torch.cat(values)


def _maps() -> dict[torch.dtype, Tensor]:
    positive = _positive_values(_SIGNED_STEPS)  # 127 values
    # int8 code c reads SIGNED[c + 128]: c = 0 is 0, ±127 are ±1; -128 (never written) reads -1 too.
    signed = torch.cat([-positive[-1:], -positive.flip(0), torch.zeros(1, dtype=torch.float64), positive])
    unsigned = torch.cat([torch.zeros(1, dtype=torch.float64), _positive_values(_UNSIGNED_STEPS)])  # 256 values
    assert signed.numel() == unsigned.numel() == 256
    return {torch.int8: signed.float(), torch.uint8: unsigned.float()}


_MAPS = _maps()
_OFFSETS = {torch.int8: 128, torch.uint8: 0}
# Quantising |y| = |x| / absmax finds the nearest of the map's values >= 0 (for int8 codes the
# sign is put back after: the map is symmetric). torch.bucketize over the 255 midpoints costs
# ~50 ns an element on one CPU thread; a table indexed by the top 20 bits of |y|'s float32
# representation (sign, exponent, 11 mantissa bits) gives, per bucket of floats, the number of
# midpoints below it, and one comparison with the next midpoint finishes the search: the same
# codes (a bucket spans 2⁻¹¹ of its value, far less than the closest midpoints: checked below).
_KEY_SHIFT = 12
_KEYS = (0x3F800000 >> _KEY_SHIFT) + 1  # up to the key of 1.0


def _search_table(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(table, midpoints): per key the count of midpoints below its bucket's lowest float, and
    the midpoints between the map's values >= 0, padded with +inf (read after the last)."""
    values = _MAPS[dtype][_OFFSETS[dtype] :]
    midpoints = (values[1:] + values[:-1]) / 2
    lowest = (torch.arange(_KEYS, dtype=torch.int32) << _KEY_SHIFT).view(torch.float32)
    table = torch.bucketize(lowest, midpoints, out_int32=True)
    highest = torch.cat([lowest[1:], torch.tensor([float("inf")])])
    assert bool((torch.bucketize(highest, midpoints, out_int32=True) - table <= 1).all()), "a bucket holds two midpoints"
    return table, torch.cat([midpoints, torch.tensor([float("inf")])])


_SEARCH_TABLES = {dtype: _search_table(dtype) for dtype in _MAPS}


@functools.lru_cache(maxsize=None)
def _device_tables(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The code map and the search tables of `dtype` on `device` (copied there once)."""
    table, midpoints = _SEARCH_TABLES[dtype]
    return _MAPS[dtype].to(device), table.to(device), midpoints.to(device)


@functools.lru_cache(maxsize=None)
def kernel_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """The fused kernels' tables on `device` (`largebatch.fused._blockwise`): the int8 code map
    then the uint8 one (512 float32 values), and each map's midpoints between its values >= 0
    (those `_nearest_codes` searches), padded with +inf to 256 each."""
    maps, midpoints = [], []
    for dtype in (torch.int8, torch.uint8):
        values = _SEARCH_TABLES[dtype][1]
        maps.append(_MAPS[dtype])
        midpoints.append(torch.cat([values, values.new_full((256 - values.numel(),), float("inf"))]))
    return torch.cat(maps).to(device), torch.cat(midpoints).to(device)


def _nearest_codes(normalised: Tensor, dtype: torch.dtype) -> Tensor:
    """int32 codes of `dtype` of the map values nearest to `normalised` (float32, contiguous, in
    [-1, 1]; NaN reads as 1): the count of midpoints below |y| (as torch.bucketize counts them),
    negated for negative y of int8 codes. |y| and the sign are read from the float's bits."""
    _, table, midpoints = _device_tables(dtype, normalised.device)
    bits = normalised.view(torch.int32)
    magnitude_bits = bits & 0x7FFFFFFF
    keys = (magnitude_bits >> _KEY_SHIFT).clamp_(max=_KEYS - 1)
    codes = table.index_select(0, keys.view(-1)).view(keys.shape)
    codes += magnitude_bits.view(torch.float32) > midpoints.index_select(0, codes.view(-1)).view(codes.shape)
    if dtype == torch.int8:
        codes *= (bits >> 31) | 1  # -1 where the sign bit is set, else 1
    return codes


#: The largest |x − deq(q(x))| / absmax of each map: half its widest gap (in the top decade).
HALF_GAP = {dtype: float((values[1:] - values[:-1]).max()) / 2 for dtype, values in _MAPS.items()}


def code_map(dtype: torch.dtype) -> Tensor:
    """The 256 values (float32, a copy) that codes of `dtype` index: code c reads
    ``code_map(dtype)[c + 128]`` for int8 and ``[c]`` for uint8."""
    return _MAPS[dtype].clone()


def num_blocks(numel: int) -> int:
    """How many scales a state of `numel` elements has."""
    return -(-numel // BLOCK_SIZE)


def scale_key(key: str) -> str:
    """The state key of the scales of the quantised state `key`."""
    return f"{key}_scale"


def new_codes(param: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Zero codes (contiguous, shaped like `param`) and zero scales: a zero state."""
    dtype = torch.int8 if signed else torch.uint8
    codes = torch.zeros(param.shape, dtype=dtype, device=param.device)
    return codes, torch.zeros(num_blocks(param.numel()), dtype=torch.float32, device=param.device)


def _block_rows(flat: Tensor, most: int | None = None) -> list[Tensor]:
    """Views of a flat tensor whose rows, in order, are its blocks: the full blocks as
    (blocks, BLOCK_SIZE) views of at most `most` rows each (default: one view), and a shorter
    last block as a (1, rest) view."""
    full = flat.numel() // BLOCK_SIZE * BLOCK_SIZE
    whole = flat[:full].view(-1, BLOCK_SIZE)
    rows = list(whole.split(most)) if most and whole.shape[0] > most else [whole]
    if full < flat.numel():
        rows.append(flat[full:].view(1, -1))
    return rows


def quantise_(codes: Tensor, scales: Tensor, values: Tensor, *, consume: bool = False) -> None:
    """Write `values` (shaped like `codes`, any floating dtype) into `codes` (contiguous) and
    `scales`, in place: each block's absmax as its scale, each element as the code of the map
    value nearest to it. `consume`: `values` may be overwritten (a dead working copy), which
    saves a temporary of its size; the others are one int32 per element, a block at a time."""
    flat = values.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat, consume = flat.float(), True
    dtype, out = codes.dtype, codes.view(-1)
    start = 0
    for rows in _block_rows(flat, QUANTISE_ROWS):
        absmax = torch.maximum(rows.amax(dim=1), -rows.amin(dim=1)) if rows.numel() else rows.new_zeros(rows.shape[0])
        blocks = slice(start // BLOCK_SIZE, start // BLOCK_SIZE + rows.shape[0])
        divisor = torch.where(absmax > 0, absmax, 1.0).unsqueeze(1)
        normalised = rows.div_(divisor) if consume else rows / divisor
        out[start : start + rows.numel()].copy_(_nearest_codes(normalised, dtype).view(-1))
        scales[blocks] = absmax
        start += rows.numel()


def dequantised(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values `codes` and `scales` stand for, a new tensor of `dtype` shaped like `codes`."""
    indices = codes.reshape(-1).int()
    if _OFFSETS[codes.dtype]:
        indices.add_(_OFFSETS[codes.dtype])
    values = _device_tables(codes.dtype, codes.device)[0].index_select(0, indices)
    del indices
    start = 0
    for rows in _block_rows(values):
        rows.mul_(scales[start // BLOCK_SIZE : start // BLOCK_SIZE + rows.shape[0]].unsqueeze(1))
        start += rows.numel()
    return values.view(codes.shape).to(dtype)


def quantised(values: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """New codes and scales of `values` (a checkpoint's state converted to 8-bit)."""
    codes, scales = new_codes(values, signed)
    quantise_(codes, scales, values)
    return codes, scales


def working_dtype(param: Tensor) -> torch.dtype:
    """The dtype a quantised state of `param` is updated in: float32, float64 for float64 params."""
    return torch.promote_types(torch.float32, param.dtype)


def _index_chunks(params: Sequence[Tensor], per_tensor: bool) -> Iterator[slice]:
    """Consecutive slices of `params`: one tensor each, or whole tensors of at most the foreach
    bodies' CPU chunk budget (`DEVICE_CHUNK_ELEMENTS` elsewhere; a larger tensor alone)."""
    from ._inplace import CPU_CHUNK_ELEMENTS

    if per_tensor:
        yield from (slice(i, i + 1) for i in range(len(params)))
        return
    budget = CPU_CHUNK_ELEMENTS if params and params[0].device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    start, total = 0, 0
    for index, param in enumerate(params):
        if index > start and total + param.numel() > budget:
            yield slice(start, index)
            start, total = index, 0
        total += param.numel()
    yield slice(start, len(params))


def run_body(
    body: Callable[..., None],
    tensors: Sequence[list[Any] | None],
    scales: Mapping[int, list[Tensor] | None],
    *,
    per_tensor: bool,
    sharded: bool,
) -> None:
    """`body(*tensors)`, through `step_on_working_states` where some `scales` are given (the
    functional forms' ``<state>_scales`` lists, keyed by their state's index in `tensors`)."""
    given = {index: values for index, values in scales.items() if values is not None}
    if not given:
        body(*tensors)
        return
    check_unsharded(given.values(), sharded)
    step_on_working_states(body, tensors, given, per_tensor=per_tensor)


def check_unsharded(scales: Iterable[list[Tensor] | None], sharded: bool) -> None:
    """A ValueError when some `scales` are given for `sharded` parameters (every path's check)."""
    if sharded and any(values is not None for values in scales):
        raise ValueError(
            f"state_dtype={EIGHT_BIT!r} (8-bit states with scales) cannot step sharded parameters: the blocks of a "
            "shard are not those of its parameter"
        )


def step_on_working_states(
    step: Callable[..., None],
    tensors: Sequence[list[Any] | None],
    scales: Mapping[int, list[Tensor]],
    *,
    per_tensor: bool,
) -> None:
    """Run `step` (an optimizer body taking the parallel lists `tensors`, tensors[0] the params)
    on slices of the parameters, with each quantised state list (`tensors[i]` for i in `scales`:
    codes, their scales `scales[i]`) replaced by dequantised working tensors, requantised after.

    `per_tensor`: one parameter a slice (the per-tensor body); else `_index_chunks`. The body
    must need nothing across slices (no norm completed over shards): the callers refuse sharded
    parameters with 8-bit states."""
    params = tensors[0]
    assert params is not None
    for chunk in _index_chunks(params, per_tensor):
        sliced = [None if values is None else values[chunk] for values in tensors]
        workings = {
            i: [dequantised(c, s, working_dtype(p)) for c, s, p in zip(tensors[i][chunk], scales[i][chunk], params[chunk])]
            for i in scales
        }
        for i, working in workings.items():
            sliced[i] = working
        step(*sliced)
        for i, working in workings.items():
            for codes, scale, values in zip(tensors[i][chunk], scales[i][chunk], working):
                quantise_(codes, scale, values, consume=True)
