"""Moment states kept in another precision than their parameter: the ``state_dtype`` option of
LAMB, LARS and Adan.

``state_dtype=None`` (the default) keeps every moment state in its parameter's dtype, as
torch.optim does. ``torch.float32`` or ``torch.bfloat16`` (or ``"float32"``/``"bfloat16"``)
keeps them in that dtype whatever the parameter's: bf16 states halve the state memory of fp32
parameters; fp32 states give bf16 parameters precise moments.

How a step computes with them (per-tensor and foreach paths; the fused kernels do the same in
registers):

* the working dtype of a tensor's moments is the wider of the state's and the gradient's
  (`torch.promote_types`): fp32 for fp32 params + bf16 states and for bf16 params + fp32 states;
* a state narrower than that is read as a working copy (`widened`), updated there, and written
  back rounded to nearest even (`store_`), once per step; the parameter's update is then
  computed from the stored (rounded) moments, so that all three paths, and a step resumed from
  a checkpoint, see the same values;
* a state already of the working dtype is updated in place, as without the option.

Round-to-nearest loses a bf16 state's increments below half its ulp (2⁻⁹ relative): with
β2 = 0.999 a second moment whose gradient² stays near it moves by ~0.1 % a step and may stand
still. Stochastic rounding would remove that bias in expectation, at the cost of random numbers
in every path and of fused == reference agreement; it is not done (see README, "Memory").

``"8bit"`` keeps the moments block-quantised (one byte per element and one float32 scale per
256 elements; see `largebatch.optimizers._quantised`); the optimizer's other precision states
(Adan's g_prev, which the next step subtracts from a gradient element by element) are then
kept in bfloat16.

Loading a checkpoint casts its states to this optimizer's ``state_dtype`` (`loaded_state`), as
torch casts states to the parameter's dtype: a checkpoint of another option, or of a version
without the option, loads and converts.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from ._quantised import EIGHT_BIT

__all__ = [
    "STATE_DTYPES",
    "check_state_dtype",
    "foreach_store_",
    "foreach_widened",
    "is_quantised",
    "loaded_state",
    "new_state",
    "state_dtype_of",
    "store_",
    "widened",
]

#: The dtypes a moment state may be kept in, by the names accepted for them.
STATE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_DTYPE = attrgetter("dtype")
#: Under "8bit", the dtype of the precision states that are not quantised (Adan's g_prev).
UNQUANTISED_DTYPE = torch.bfloat16


def check_state_dtype(value: Any) -> torch.dtype | str | None:
    """`value` as a torch.dtype (None: like the parameter; ``"8bit"``: block-quantised), or a
    ValueError naming state_dtype."""
    if value is None or value == EIGHT_BIT:
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in STATE_DTYPES:
            return STATE_DTYPES[name]
    elif value in STATE_DTYPES.values():
        return value
    raise ValueError(
        f"Invalid state_dtype: {value!r} (must be None, torch.float32 or torch.bfloat16, "
        f"one of the names {sorted(STATE_DTYPES)}, or {EIGHT_BIT!r} for block-quantised states)"
    )


def state_dtype_of(param: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype `param`'s (unquantised) moment states are kept in under `group`'s option."""
    option = group.get("state_dtype")
    if option == EIGHT_BIT:
        return UNQUANTISED_DTYPE
    return option or param.dtype


def is_quantised(group: dict[str, Any]) -> bool:
    """Whether `group` keeps its moments 8-bit block-quantised."""
    return group.get("state_dtype") == EIGHT_BIT


def new_state(param: Tensor, group: dict[str, Any]) -> Tensor:
    """A zero moment state for `param`: its shape, device and layout, the group's state dtype."""
    return torch.zeros_like(param, dtype=state_dtype_of(param, group), memory_format=torch.preserve_format)


def loaded_state(value: Tensor, param: Tensor, group: dict[str, Any]) -> Tensor:
    """A checkpoint's moment state, copied onto `param`'s device in the group's state dtype
    (never the checkpoint's own tensor: states are updated in place)."""
    return value.to(device=param.device, dtype=state_dtype_of(param, group), copy=True)


def widened(tensor: Tensor, other: Tensor) -> Tensor:
    """`tensor` as the step computes with it beside `other` (a state beside its gradient, or a
    gradient beside its state): itself when at least as wide, else a copy in the wider dtype
    (for a state, written back by `store_`)."""
    working = torch.promote_types(tensor.dtype, other.dtype)
    return tensor if tensor.dtype == working else tensor.to(working)


def store_(state: Tensor, working: Tensor) -> Tensor:
    """Write the updated `working` copy back into `state`, rounded to its dtype, and return the
    working tensor holding exactly the stored values (nothing to do when `working` is `state`)."""
    if working is state:
        return state
    state.copy_(working)
    return working.copy_(state)


def foreach_widened(grads: list[Tensor], *states: list[Tensor]) -> tuple[list[Tensor], list[list[Tensor]]]:
    """`widened` for a foreach chunk: per tensor, its gradient and states in the widest of their
    dtypes (torch._foreach_lerp_ needs one dtype across its operands). Lists without a change
    are returned as they are, the usual case: no copy, and `foreach_store_` does nothing."""
    if len({*map(_DTYPE, grads), *(dtype for lst in states for dtype in map(_DTYPE, lst))}) == 1:
        return grads, list(states)
    workings = [reduce(torch.promote_types, map(_DTYPE, row)) for row in zip(grads, *states)]
    return _cast_list(grads, workings), [_cast_list(lst, workings) for lst in states]


def _cast_list(tensors: list[Tensor], dtypes: Sequence[torch.dtype]) -> list[Tensor]:
    if all(t.dtype == dtype for t, dtype in zip(tensors, dtypes)):
        return tensors
    return [t if t.dtype == dtype else t.to(dtype) for t, dtype in zip(tensors, dtypes)]


def foreach_store_(states: list[Tensor], workings: list[Tensor]) -> list[Tensor]:
    """`store_` for a foreach chunk: the copies among `workings` written back into their states,
    rounded, and the working list returned holding the stored values."""
    if workings is states:
        return states
    pairs = [(s, w) for s, w in zip(states, workings) if s is not w]
    if pairs:
        stored, copies = [s for s, _ in pairs], [w for _, w in pairs]
        torch._foreach_copy_(stored, copies)
        torch._foreach_copy_(copies, stored)
    return workings
