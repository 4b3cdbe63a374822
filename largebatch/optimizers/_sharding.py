"""Full-tensor norms when each rank holds only a shard of every parameter.

Trust ratios (LAMB, LARS) and global gradient clipping need the norm of the *whole* tensor.
Under FSDP2 (`fully_shard`, parameters are DTensors sharded on dim 0), ZeRO-style flat shards,
or any DTensor sharding, a rank that computes norms from its shard alone trains a different model
than its peers (DeepSpeed #490, fairscale #696, pytorch #109581). Here each rank computes the
fp32 sums of squares of its shards, all tensors of a group are stacked into one vector, and that
vector is summed across the shard ranks with one all-reduce (per sharded mesh dimension).

Two ways to say that a group is sharded:

* its parameters are DTensors: the mesh dimensions with a ``Shard`` placement are reduced over
  (``Replicate`` dimensions hold identical copies and are not summed);
* ``shard_group=<ProcessGroup>`` in the param group: the group's plain tensors are this rank's
  shards of full tensors whose other shards sit, in the same order, on the other ranks of that
  process group (ZeRO-style flat shards).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ShardReduction", "complete_norms", "complete_squares", "locals_of", "shard_reduction", "to_local"]


def _dtensor_types() -> tuple[type, ...]:
    """(DTensor,) once torch.distributed.tensor has been imported, else (): no DTensor can exist
    before that, so nothing is imported here (an optimizer step asks this of every list, and an
    import statement per question would cost more than the question)."""
    module = sys.modules.get("torch.distributed.tensor")
    return () if module is None else (module.DTensor,)


def is_dtensor(tensor: Tensor) -> bool:
    return isinstance(tensor, _dtensor_types())


def any_dtensor(tensors: Sequence[Tensor]) -> bool:
    """Whether any of `tensors` is a DTensor, decided over their types (one C-level pass: an
    optimizer step asks this of every list)."""
    dtensor = _dtensor_types()
    return any(issubclass(kind, dtensor) for kind in set(map(type, tensors)))


def locals_of(params: Sequence[Tensor], *lists: Sequence[Tensor]) -> list[list[Tensor]]:
    """[params, *lists] as local shards, where lists are parallel to params (their gradients and
    states): one DTensor question for the group, asked of the parameters (a state or gradient is
    a DTensor exactly when its parameter is)."""
    if not any_dtensor(params):
        return [list(params), *(list(lst) for lst in lists)]
    return [to_local(params), *(to_local(lst) for lst in lists)]


def to_local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The local shards of DTensors (views: updating them updates the DTensor); others unchanged."""
    tensors = list(tensors)
    if not any_dtensor(tensors):
        return tensors
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


@dataclass(frozen=True)
class ShardReduction:
    """Sums per-tensor squared norms over the process groups that hold shards of the same tensors."""

    groups: tuple[Any, ...]

    def sum_over_shards(self, local_sums: Tensor) -> Tensor:
        """Sum per-shard partial sums (of squares, or dot products) over the shard ranks, in place:
        one all-reduce per sharded mesh dimension, whatever the number of entries."""
        for group in self.groups:
            dist.all_reduce(local_sums, op=dist.ReduceOp.SUM, group=group)
        return local_sums

    def full_norms(self, local_norms: Sequence[Tensor]) -> list[Tensor]:
        """Whole-tensor L2 norms from local-shard norms: √(Σ_ranks local²), one all-reduce per group.

        Each entry may be 0-dim (one tensor) or a vector (a foreach bucket); the result has the
        same shapes, dtypes and devices.
        """
        flat = [norm.reshape(-1) for norm in local_norms]
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in flat) else torch.float32
        device = flat[0].device
        squares = self.sum_over_shards(torch.cat([n.to(device=device, dtype=dtype) for n in flat]).square())
        full = squares.sqrt().split([n.numel() for n in flat])
        return [f.reshape(n.shape).to(device=n.device, dtype=n.dtype) for f, n in zip(full, local_norms)]


def complete_norms(norms: list[Tensor], reduction: ShardReduction | None) -> list[Tensor]:
    """Whole-tensor norms: the given ones when the tensors are whole, else completed across ranks."""
    return norms if reduction is None else reduction.full_norms(norms)


def complete_squares(squares: Tensor, reduction: ShardReduction | None) -> Tensor:
    """Sums of squares over whole tensors: as given when whole, else summed across the shard ranks."""
    return squares if reduction is None else reduction.sum_over_shards(squares)


def shard_reduction(params: Sequence[Tensor], shard_group: Any = None) -> ShardReduction | None:
    """How a group's norms are completed across ranks, or None when its tensors are whole.

    Raises:
        ValueError: DTensor and plain tensors mixed in one group, DTensors sharded over different
            meshes or placements in one group, or ``shard_group`` given for DTensor parameters.
    """
    dtensors = [p for p in params if is_dtensor(p)] if any_dtensor(params) else []
    if not dtensors:
        return ShardReduction((shard_group,)) if shard_group is not None else None
    if len(dtensors) != len(params):
        raise ValueError("a param group mixes DTensor and plain-tensor parameters; put them in separate groups")
    if shard_group is not None:
        raise ValueError("shard_group is for plain-tensor shards; DTensor parameters carry their own mesh")
    keys = {
        tuple(p.device_mesh.get_group(dim) for dim, placement in enumerate(p.placements) if placement.is_shard())
        for p in dtensors
    }
    if len(keys) != 1:
        raise ValueError("the DTensor parameters of one group are sharded differently; split the group by mesh")
    (groups,) = keys
    return ShardReduction(groups) if groups else None
