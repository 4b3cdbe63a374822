"""Small helpers of the non-fused steps: scaled in-place adds whose coefficient may be a tensor,
the host values of a group's step counters, Adam-style denominators with the bias correction as
a scalar, dead temporaries reused as out=, and cache-sized chunks of a CPU foreach group.

Why chunks: on the CPU a foreach op is a loop over its tensors, so a group's op streams every
tensor through memory before the next op starts; a step of ~10 ops then reads the whole model
from DRAM ~10 times. Run over chunks of consecutive tensors that fit in the cache, the ops after
the first find their operands there (as a per-tensor loop does). Elsewhere one chunk: on CUDA
each foreach op is one launch over the group, and the launches are what costs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "add_quotient_",
    "add_scaled_",
    "cache_chunks",
    "foreach_add_quotients_",
    "foreach_add_scaled_",
    "foreach_into",
    "foreach_sqrt_denominators",
    "reusable",
    "sqrt_denominator",
    "step_values",
]

#: Elements per CPU chunk: ~5 fp32 operands of 2**19 elements fit in a 16 MiB L3 cache. Measured
#: on the bench/cpu_step.py layouts (2-core EPYC, 2026-12-01): 2**17 to 2**21 alike; one chunk of
#: all tensors 1.3–1.5× slower for LAMB and Adan (LARS, with fewer ops per tensor, alike).
CPU_CHUNK_ELEMENTS = 2**19


def add_scaled_(target: Tensor, other: Tensor, coefficient: float | Tensor) -> Tensor:
    """target += coefficient · other, in place, for a float or a 0-dim tensor coefficient
    (a tensor lr, a trust ratio): one pass either way, no host synchronisation."""
    if isinstance(coefficient, Tensor):
        return target.addcmul_(other, coefficient)
    return target.add_(other, alpha=coefficient)


def foreach_add_scaled_(targets: list[Tensor], others: list[Tensor], coefficients: Sequence[Any]) -> None:
    """targets[i] += coefficients[i] · others[i] (floats, or 0-dim tensors), one foreach op."""
    first = coefficients[0]
    if not isinstance(first, Tensor) and all(c == first for c in coefficients):
        torch._foreach_add_(targets, others, alpha=first)
    else:
        tensors = [c if isinstance(c, Tensor) else torch.tensor(c) for c in coefficients]
        torch._foreach_addcmul_(targets, others, tensors)


def step_values(steps: Sequence[Tensor]) -> list[float]:
    """The values of CPU step counters, read in one go (not one `.item()` per tensor)."""
    if len(steps) == 1:
        return [steps[0].item()]
    return torch.stack(list(steps)).tolist()


def cache_chunks(lists: Sequence[list[Tensor]], budget: int | None = None) -> Iterator[list[list[Tensor]]]:
    """Parallel tensor lists (lists[0] the parameters) split into chunks of consecutive whole
    tensors of at most `budget` elements (default `CPU_CHUNK_ELEMENTS`; a larger tensor is a chunk
    of its own) on the CPU; the lists themselves, as one chunk, on any other device."""
    budget = CPU_CHUNK_ELEMENTS if budget is None else budget
    params = lists[0]
    if not params or params[0].device.type != "cpu":
        yield [list(values) for values in lists]
        return
    start, total = 0, 0
    for index, param in enumerate(params):
        if index > start and total + param.numel() > budget:
            yield [list(values[start:index]) for values in lists]
            start, total = index, 0
        total += param.numel()
    yield [list(values[start:]) for values in lists]


def add_quotient_(target: Tensor, numerator: Tensor, denominator: Tensor, coefficient: float | Tensor) -> Tensor:
    """target += coefficient · numerator / denominator, in place (a float: one `addcdiv_`)."""
    if isinstance(coefficient, Tensor):
        return target.addcmul_(numerator / denominator, coefficient)
    return target.addcdiv_(numerator, denominator, value=coefficient)


def foreach_add_quotients_(
    targets: list[Tensor], numerators: list[Tensor], denominators: list[Tensor], coefficients: Sequence[Any]
) -> None:
    """targets[i] += coefficients[i] · numerators[i] / denominators[i] (floats: one foreach op)."""
    if not any(isinstance(c, Tensor) for c in coefficients):
        torch._foreach_addcdiv_(targets, numerators, denominators, list(coefficients))
    else:
        foreach_add_scaled_(targets, torch._foreach_div(numerators, denominators), coefficients)


def reusable(buffer: Tensor) -> Tensor | None:
    """`buffer` as the out= of an op that may overwrite it, or None (a new tensor) under autograd
    (differentiable=True), where out= has no derivative. On the CPU a new tensor of a few MiB
    costs page faults: LAMB's update ops on the BERT-like layout took 160 ms instead of 197 with
    the division written into the denominator (micro-benchmark, one thread, 2026-12-01)."""
    return None if torch.is_grad_enabled() else buffer


def sqrt_denominator(
    second_moment: Tensor, bias_correction: float | Tensor, eps: float, out: Tensor | None = None
) -> tuple[Tensor, float | Tensor]:
    r"""(D, s) with s / D = 1 / (\sqrt{v / bc} + ε): D a new tensor (or `out`), s a scalar, two passes.

    D = √v + ε·√bc and s = √bc, so the bias correction costs no pass. Float16 keeps
    D = √v / √bc + ε (s = 1): ε·√bc can fall below its smallest subnormal, and a zero moment
    would then give 0 / 0.
    """
    sqrt_bc = bias_correction**0.5
    root = torch.sqrt(second_moment, out=out)
    if second_moment.dtype == torch.float16:
        return root.div_(sqrt_bc).add_(eps), 1.0
    return root.add_(eps * sqrt_bc), sqrt_bc


def foreach_into(op: Any, foreach_op: Any, inputs: Sequence[list[Tensor]], outs: list[Tensor] | None) -> list[Tensor]:
    """`foreach_op(*inputs)`, written into `outs` (dead temporaries) on the CPU, tensor by tensor
    with `op(..., out=)`: the same kernels without new tensors, whose page faults cost more than
    the loop there. Elsewhere (or without `outs`) the foreach op into new tensors: one launch."""
    if outs is None or outs[0].device.type != "cpu":
        return foreach_op(*inputs)
    for out, *args in zip(outs, *inputs):
        op(*args, out=out)
    return outs


def foreach_sqrt_denominators(
    second_moments: list[Tensor], bias_corrections: Sequence[Any], eps: float, outs: list[Tensor] | None = None
) -> tuple[list[Tensor], list[Any]]:
    """`sqrt_denominator` of each tensor of a foreach group (one dtype): the D list (into `outs`
    on the CPU, see `foreach_into`) and the s list."""
    sqrt_bcs = [bc**0.5 for bc in bias_corrections]
    denominators = foreach_into(torch.sqrt, torch._foreach_sqrt, [second_moments], outs)
    if second_moments[0].dtype == torch.float16:
        torch._foreach_div_(denominators, sqrt_bcs)
        torch._foreach_add_(denominators, eps)
        return denominators, [1.0] * len(sqrt_bcs)
    torch._foreach_add_(denominators, [eps * s for s in sqrt_bcs])
    return denominators, sqrt_bcs
