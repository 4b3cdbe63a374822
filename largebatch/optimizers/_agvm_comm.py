"""The DDP side of AGVM: a comm hook that measures two half-world gradient means.

AGVM needs two independent estimates g_A, g_B of each step's gradient. Under
``DistributedDataParallel`` they come for free: the ranks are split into two halves and
each half averages its own gradients. :func:`agvm_comm_hook` does that on the steps where
AGVM measures and a plain all-reduce mean on every other step:

- normal step: one all-reduce of the bucket (divided by the world size first);
- measuring step: the same all-reduce of the raw bucket plus one all-reduce of a copy within
  the rank's half-world, issued together so they overlap. The other half's sum is the
  global sum minus this half's sum, so one extra collective gives both half means.

The hook and the optimizer share one :class:`AGVMCommState`: the optimizer tells it whether
the coming step measures, the hook leaves the two half means in it, and the optimizer
broadcasts rank 0's disagreement values through it so every rank applies identical
learning-rate factors (ranks of the two halves compute the other half's mean by
subtraction, which can differ in the last bit).
"""

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["AGVMCommState", "agvm_comm_hook"]


class AGVMCommState:
    r"""State shared by :func:`agvm_comm_hook` and :class:`~largebatch.optimizers.agvm.AGVM`.

    Construct it on every process of the default group (it creates the two half-world
    groups with :func:`torch.distributed.new_group`, a collective call), pass it to
    ``AGVM(..., comm_state=state)`` and to
    ``ddp_model.register_comm_hook(state, agvm_comm_hook)``.

    Ranks ``0 … W//2 − 1`` of ``process_group`` form half A, the rest half B.

    Args:
        process_group: the group DDP reduces over (default: the default group).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise ValueError("AGVMCommState needs torch.distributed to be initialised first")
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        if self.world_size < 2:
            raise ValueError(
                f"AGVMCommState needs at least 2 ranks in process_group to form two halves, "
                f"got world size {self.world_size}"
            )
        ranks = dist.get_process_group_ranks(self.process_group)
        half = self.world_size // 2
        first_ranks, second_ranks = ranks[:half], ranks[half:]
        # new_group is collective over the default group: every process creates both halves.
        first_group = dist.new_group(first_ranks)
        second_group = dist.new_group(second_ranks)
        self.in_first_half = dist.get_rank(self.process_group) < half
        self.own_half = first_group if self.in_first_half else second_group
        self.own_half_size = len(first_ranks) if self.in_first_half else len(second_ranks)
        self.other_half_size = self.world_size - self.own_half_size
        self.source_rank = ranks[0]
        # param -> (half A mean, half B mean), filled by the hook on measuring steps.
        self.halves: dict[Tensor, tuple[Tensor, Tensor]] = {}
        self._measuring: Callable[[], bool] | None = None

    def bind(self, measuring: Callable[[], bool]) -> None:
        """Called by AGVM: ``measuring()`` says whether the coming step measures."""
        if self._measuring is not None:
            raise ValueError("this AGVMCommState is already bound to an AGVM optimizer")
        self._measuring = measuring

    def measuring(self) -> bool:
        """Whether the current step is an AGVM measuring step (the hook then keeps the two half means)."""
        if self._measuring is None:
            raise RuntimeError(
                "agvm_comm_hook ran before its AGVMCommState was given to an AGVM optimizer: "
                "construct AGVM(..., comm_state=state) before the first backward"
            )
        return self._measuring()

    def record(self, params: Sequence[Tensor], half_a: Tensor, half_b: Tensor) -> None:
        """Keep each parameter's slice of a bucket's two half means."""
        numels = [p.numel() for p in params]
        if sum(numels) != half_a.numel():
            raise RuntimeError(
                f"bucket holds {half_a.numel()} gradient elements but its parameters have "
                f"{sum(numels)}: this bucket layout is not supported by agvm_comm_hook"
            )
        for p, a, b in zip(params, half_a.split(numels), half_b.split(numels)):
            self.halves[p] = (a.view_as(p), b.view_as(p))

    def agree(self, values: Tensor) -> Tensor:
        """Make every rank hold rank 0's ``values`` (in place)."""
        dist.broadcast(values, src=self.source_rank, group=self.process_group)
        return values


def agvm_comm_hook(state: AGVMCommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: the global gradient mean, plus both half-world means on AGVM steps.

    Register with ``ddp_model.register_comm_hook(state, agvm_comm_hook)``.
    """
    buffer = bucket.buffer()
    if not state.measuring():
        buffer.div_(state.world_size)
        reduced = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()
        return reduced.then(lambda fut: fut.value()[0])

    params = bucket.parameters()
    own_sum = buffer.clone()
    # Both collectives are issued here, in bucket order, identically on every rank; none is
    # issued from a callback, where completion order (and so call order) could differ by rank.
    own_done = dist.all_reduce(own_sum, group=state.own_half, async_op=True).get_future()
    total_done = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()

    def finish(_: torch.futures.Future) -> Tensor:
        # Both half means stay at the gradients' current scale (GradScaler's, if any): AGVM
        # only needs their cosine, which does not depend on a common scale.
        other_mean = (buffer - own_sum).div_(state.other_half_size)
        own_mean = own_sum.div_(state.own_half_size)
        if state.in_first_half:
            state.record(params, own_mean, other_mean)
        else:
            state.record(params, other_mean, own_mean)
        return buffer.div_(state.world_size)

    return torch.futures.collect_all([own_done, total_done]).then(finish)
