r"""A scheduler that couples every group's learning rate to the current batch size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._checks import check_positive_int
from .rules import scaling_exponent
from .schedulers import is_initial_step

__all__ = ["BatchSizeCoupledLR"]


def _clone_lr(lr: float | Tensor) -> float | Tensor:
    return lr.clone() if isinstance(lr, Tensor) else lr


class BatchSizeCoupledLR(LRScheduler):
    r"""Scale each group's lr by the batch-size rule, on top of any other schedule.

    .. math::
        \eta_g(t) = \eta^{other}_g(t) \left(\frac{B_t}{B_0}\right)^{k},

    with :math:`\eta^{other}_g(t)` what the other (chainable) schedulers make of the group's lr,
    :math:`B_t` the current batch size, :math:`B_0` the batch size the lr was tuned at, and
    :math:`k` the rule's exponent (``"linear"``: 1, Goyal et al. 2017; ``"sqrt"``: 1/2,
    Krizhevsky 2014; or a float; see :func:`~largebatch.schedules.suggest_scaling_rule`).

    The batch size is set by the user or by an adaptive batch-size controller through
    :meth:`set_batch_size` (or by assigning :attr:`batch_size`): the lr of every group changes
    at once, by the factor :math:`(B_{new}/B_{old})^{k}`, so the next ``optimizer.step()`` uses it.
    :meth:`step` leaves the lr alone, since there is nothing left to apply. The batch size is part
    of ``state_dict``; the scaled lr itself is in the optimizer's.

    Only multiplicative (chainable) schedulers compose with it; a closed-form one that writes
    absolute values (``OneCycleLR``, ``CyclicLR``) overwrites its factor.

    Schedules in epochs: given ``dataset_size`` and ``epoch_schedulers`` (schedules built with
    ``warmup_epochs=``/``total_epochs=`` and ``steps_per_epoch``), every batch-size change also
    calls their ``set_steps_per_epoch`` with :math:`\lceil N / B \rceil` (``drop_last``:
    :math:`\lfloor N / B \rfloor`), so warmup and decay keep their lengths in epochs while the
    number of steps per epoch changes with the batch. The schedulers are not part of this
    scheduler's ``state_dict`` (each has its own).

    Args:
        optimizer: the wrapped optimizer; its lrs are those tuned at ``base_batch_size``.
        base_batch_size: :math:`B_0`.
        rule: ``"linear"``, ``"sqrt"`` or an exponent ≥ 0.
        batch_size: the initial :math:`B`; default ``base_batch_size``.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler`.
        dataset_size: :math:`N`, the samples in one epoch, for ``epoch_schedulers``.
        epoch_schedulers: epoch-based schedules told the new steps per epoch at each change.
        drop_last: whether the loader drops a last, incomplete batch (then an epoch has
            :math:`\lfloor N / B \rfloor` steps).

    Example:
        .. code-block:: python

            coupled = BatchSizeCoupledLR(optimizer, base_batch_size=256, rule="linear")
            warmup = LinearWarmup(optimizer, warmup_steps=500)
            for inputs, targets in loader:
                loss_fn(model(inputs), targets).backward()
                optimizer.step()
                optimizer.zero_grad()
                warmup.step()
                coupled.step()
                coupled.set_batch_size(next_batch_size)  # lr changes now
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base_batch_size: int,
        rule: str | float = "linear",
        batch_size: int | None = None,
        last_epoch: int = -1,
        *,
        dataset_size: int | None = None,
        epoch_schedulers: Sequence[LRScheduler] = (),
        drop_last: bool = False,
    ) -> None:
        self._set_epoch_followers(dataset_size, epoch_schedulers, drop_last)
        self.base_batch_size = check_positive_int("base_batch_size", base_batch_size)
        self.rule = rule
        self.exponent = scaling_exponent(rule)
        initial = self.base_batch_size if batch_size is None else batch_size
        self._batch_size = check_positive_int("batch_size", initial)
        super().__init__(optimizer, last_epoch)

    @property
    def batch_size(self) -> int:
        """The current batch size :math:`B`; assigning it calls :meth:`set_batch_size`."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, batch_size: int) -> None:
        self.set_batch_size(batch_size)

    def multiplier(self, batch_size: int) -> float:
        """The factor :math:`(B / B_0)^{k}` the rule gives a batch of ``batch_size``."""
        return (batch_size / self.base_batch_size) ** self.exponent

    def set_batch_size(self, batch_size: int) -> None:
        """Set the batch size and rescale every group's lr now by :math:`(B_{new}/B_{old})^{k}`."""
        new = check_positive_int("batch_size", batch_size)
        ratio = (new / self._batch_size) ** self.exponent
        groups = self.optimizer.param_groups
        # Every new lr is computed before any is written: groups may share one lr tensor
        # (create_optimizer(..., lr=torch.tensor(...)) does), which must be scaled once, not per group.
        scaled = [group["lr"] * ratio for group in groups]
        for scheduler in self._epoch_schedulers:
            scheduler.set_steps_per_epoch(self.steps_per_epoch(new))
        for group, lr in zip(groups, scaled):
            if isinstance(group["lr"], Tensor):
                group["lr"].copy_(lr)  # in place: whoever holds the tensor sees the new lr
            else:
                group["lr"] = lr
        self._batch_size = new
        self._last_lr = [_clone_lr(group["lr"]) for group in groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, checked first: a bad batch size or rule changes nothing."""
        for name in ("_batch_size", "base_batch_size", "rule", "exponent"):
            if name not in state_dict:
                raise ValueError(f"Invalid state_dict: missing {name!r}")
        check_positive_int("state_dict['_batch_size']", state_dict["_batch_size"])
        check_positive_int("state_dict['base_batch_size']", state_dict["base_batch_size"])
        exponent = scaling_exponent(state_dict["rule"])
        if state_dict["exponent"] != exponent:
            raise ValueError(
                f"Invalid state_dict: exponent {state_dict['exponent']!r} is not that of rule "
                f"{state_dict['rule']!r} ({exponent})"
            )
        super().load_state_dict(state_dict)

    def get_lr(self) -> list[float | Tensor]:
        """The next lr of each group: scaled by the rule at the start, unchanged afterwards."""
        groups = self.optimizer.param_groups
        if is_initial_step(self):
            multiplier = self.multiplier(self._batch_size)
            return [group["lr"] * multiplier for group in groups]
        return [_clone_lr(group["lr"]) for group in groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        multiplier = self.multiplier(self._batch_size)
        return [base_lr * multiplier for base_lr in self.base_lrs]

    # ------------------------------------------------------------------ schedules in epochs

    def _set_epoch_followers(
        self, dataset_size: int | None, epoch_schedulers: Sequence[LRScheduler], drop_last: bool
    ) -> None:
        followers = list(epoch_schedulers)
        for index, scheduler in enumerate(followers):
            if getattr(scheduler, "steps_per_epoch", None) is None or not hasattr(scheduler, "set_steps_per_epoch"):
                raise ValueError(
                    f"epoch_schedulers[{index}] ({type(scheduler).__name__}) is not an epoch-based schedule: "
                    "build it with warmup_epochs/total_epochs and steps_per_epoch"
                )
        if followers and dataset_size is None:
            raise ValueError("dataset_size: epoch_schedulers need it to count the steps in an epoch")
        self.dataset_size = None if dataset_size is None else check_positive_int("dataset_size", dataset_size)
        if not isinstance(drop_last, bool):
            raise ValueError(f"drop_last must be a bool, got {drop_last!r}")
        self.drop_last = drop_last
        self._epoch_schedulers = followers

    def steps_per_epoch(self, batch_size: int) -> int:
        """The steps in one epoch of ``dataset_size`` samples at ``batch_size`` (at least 1)."""
        if self.dataset_size is None:
            raise ValueError("dataset_size was not given, so the steps per epoch are not known")
        batch = check_positive_int("batch_size", batch_size)
        steps = self.dataset_size // batch if self.drop_last else math.ceil(self.dataset_size / batch)
        return max(steps, 1)

    def state_dict(self) -> dict[str, Any]:
        """As :class:`~torch.optim.lr_scheduler.LRScheduler`'s, without the epoch schedulers (objects)."""
        state = super().state_dict()
        state.pop("_epoch_schedulers", None)
        return state
