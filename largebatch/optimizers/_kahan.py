r"""Kahan-compensated updates of bf16/fp16 parameters (the ``kahan_sum`` option of LAMB, LARS, Adan).

A 16-bit parameter p cannot hold a step much smaller than its own rounding unit: bf16 keeps 8
significant bits, so p + u rounds back to p when |u| < 2^-9·|p|, and many small steps are lost.
A compensation buffer c (the parameter's shape and dtype, zero at the start) keeps what the
rounding lost; each step adds the update u to p as (all in float32, stored in the param dtype)

.. math::
    y = u + c, \qquad t = \operatorname{round}(p + y), \qquad c \leftarrow \operatorname{round}(y - (t - p)), \qquad p \leftarrow t

so that p + c tracks the exactly summed parameter. t is the value as stored (rounded to the
parameter's dtype): y − (t − p) is the part of the step the stored parameter did not take.
That compensated value x̃ = p + c (in float32) is the parameter the optimizers' equations read:
weight decay λ·x̃ and the trust ratios' ‖x̃‖ (LAMB, LARS), Adan's decay (folded into u, so that
the decay is compensated too instead of rounding away as a separate multiply).

torch-optimi's ``kahan_sum`` (the anchor) uses the same recurrence, but runs it in bf16, one op
at a time, and applies weight decay to p outside the compensation; ours keeps the recurrence in
float32 registers in the fused kernels and takes x̃ where the update reads the parameter.

The buffer exists for bfloat16 and float16 parameters only (`COMPENSATED_DTYPES`): an fp32
parameter's rounding unit (2^-24) is far below any step that training takes, so
``kahan_sum=True`` leaves fp32/fp64 parameters as they are (no buffer, bit-identical results).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._inplace import add_scaled_, foreach_add_scaled_

__all__ = [
    "COMPENSATED_DTYPES",
    "KAHAN_KEY",
    "apply_update_",
    "check_kahan_comps",
    "check_kahan_sum",
    "compensated",
    "fp32_combination",
    "foreach_apply_updates_",
    "foreach_compensated",
    "foreach_kahan_add_",
    "kahan_add_",
]

#: Parameter dtypes that get a compensation buffer (see the module docstring).
COMPENSATED_DTYPES = (torch.bfloat16, torch.float16)
#: The state key of a parameter's compensation buffer.
KAHAN_KEY = "kahan_comp"


def check_kahan_sum(value: Any) -> None:
    """``kahan_sum`` is None (compensate bf16/fp16 parameters), True (the same) or False."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid kahan_sum: {value!r} (must be None, True or False)")


def check_kahan_comps(params: Sequence[Tensor], kahan_comps: Sequence[Tensor | None] | None, kahan_sum: Any) -> bool:
    """Whether a functional step compensates: ``kahan_comps`` given (and ``kahan_sum`` not False).

    ``kahan_comps[i]`` is a tensor of ``params[i]``'s shape and dtype when that parameter is bf16
    or fp16, None otherwise (what the optimizers keep); ``kahan_sum=True`` needs the list,
    ``kahan_sum=False`` refuses it. ValueError naming what is wrong.
    """
    check_kahan_sum(kahan_sum)
    if kahan_comps is None:
        if kahan_sum and any(p.dtype in COMPENSATED_DTYPES for p in params):
            raise ValueError("kahan_sum=True needs kahan_comps: one buffer per bf16/fp16 parameter, None for the others")
        return False
    if kahan_sum is False:
        raise ValueError("kahan_sum=False but kahan_comps were given: pass kahan_comps=None, or kahan_sum=None/True")
    if len(kahan_comps) != len(params):
        raise ValueError(f"kahan_comps must have one entry per parameter, got {len(kahan_comps)} for {len(params)}")
    for i, (param, comp) in enumerate(zip(params, kahan_comps)):
        if param.dtype not in COMPENSATED_DTYPES:
            if comp is not None:
                raise ValueError(f"kahan_comps[{i}] is given for a {param.dtype} parameter: only bf16/fp16 ones are compensated")
        elif comp is None or comp.dtype != param.dtype or comp.shape != param.shape:
            found = None if comp is None else f"{comp.dtype} {tuple(comp.shape)}"
            raise ValueError(
                f"kahan_comps[{i}] must be a {param.dtype} tensor of shape {tuple(param.shape)} like its parameter, got {found}"
            )
    return True


def compensated(param: Tensor, comp: Tensor | None) -> Tensor:
    """x̃ = p + c in float32 (a new tensor); the parameter itself without a buffer."""
    if comp is None:
        return param
    return param.to(torch.float32, copy=True).add_(comp)


def foreach_compensated(params: list[Tensor], comps: list[Tensor] | None) -> list[Tensor]:
    """`compensated` of each tensor of a foreach chunk (the parameters themselves without buffers)."""
    if comps is None:
        return params
    return torch._foreach_add([p.float() for p in params], comps)


def fp32_combination(*terms: tuple[Tensor, float | Tensor]) -> Tensor:
    """Σ coefficient · tensor over `terms`, accumulated in a new float32 tensor (coefficients:
    floats or 0-dim tensors)."""
    (first, coefficient), *rest = terms
    total = first.to(torch.float32, copy=True).mul_(coefficient)
    for tensor, coefficient in rest:
        add_scaled_(total, tensor, coefficient)
    return total


def kahan_add_(param: Tensor, comp: Tensor, update: Tensor) -> None:
    """p ← p + u with compensation c (see the module docstring); `update` is a float32 tensor
    that this overwrites (it becomes y)."""
    y = update.add_(comp)
    base = param.float()
    param.copy_(base + y)  # t = p + y, rounded to the parameter's dtype
    comp.copy_(y.sub_(param.float().sub_(base)))  # c = y − (t − p)


def foreach_kahan_add_(params: list[Tensor], comps: list[Tensor], updates: list[Tensor]) -> None:
    """`kahan_add_` over a foreach chunk; `updates` (float32) are overwritten."""
    torch._foreach_add_(updates, comps)
    bases = [p.float() for p in params]
    torch._foreach_copy_(params, torch._foreach_add(bases, updates))
    torch._foreach_sub_(updates, torch._foreach_sub([p.float() for p in params], bases))
    torch._foreach_copy_(comps, updates)


def apply_update_(param: Tensor, update: Tensor, coefficient: float | Tensor, comp: Tensor | None) -> None:
    """p ← p + coefficient · update: a plain in-place add without a buffer, compensated with one."""
    if comp is None:
        add_scaled_(param, update, coefficient)
    else:
        kahan_add_(param, comp, fp32_combination((update, coefficient)))


def foreach_apply_updates_(
    params: list[Tensor], updates: list[Tensor], coefficients: Sequence[Any], comps: list[Tensor] | None
) -> None:
    """`apply_update_` over a foreach chunk (all with buffers, or none)."""
    if comps is None:
        foreach_add_scaled_(params, updates, coefficients)
        return
    scaled = [fp32_combination((u, c)) for u, c in zip(updates, coefficients)]
    foreach_kahan_add_(params, comps, scaled)
