"""`GrowingBatchSampler`: index batches whose size follows an `AdaptiveBatchSize` controller.

Each epoch is one permutation of the indices (seeded by `seed + epoch`, or the identity without
shuffling) cut into consecutive *global* batches; every batch takes the controller's size at the
moment it is drawn. Since batches are consecutive slices of one permutation, every index appears
exactly once per epoch however often the size changes (with `drop_last`, a short final batch is
skipped instead). Without `drop_last`, a remainder too small to give every rank two samples
(one index on a single process) joins the batch before it, so no rank gets a batch of one
sample, whose variance no test can estimate.

Data parallel. With `num_replicas` = W ranks, the controller's batch size B is the global one and
rank r gets the r-th of W consecutive slices of each global batch, B/W indices. Every rank draws
the same permutation (same `seed`), so the slices of all ranks partition the epoch: each sample
is seen exactly once per epoch across ranks. The ranks stay in lockstep as long as their
controllers take the same decisions, i.e. are stepped with the same (all-reduced) statistics,
which is what `gradient_statistics(..., process_group=...)` and `DDPGradientStatistics` return.
B must be a multiple of W: the controller's `initial_batch_size`, `max_batch_size` and `multiple`
must be multiples of W. An epoch's short final batch (no `drop_last`) is split as evenly as
possible: the ranks' slices differ by at most one index.

The sampler is a stream: its position (epoch, global indices handed out) persists across
`iter()` calls, so breaking out of a loop and iterating again continues the epoch, and
`load_state_dict` resumes it. A fresh `iter()` after an epoch's last batch starts the next epoch.
The position counts global indices, so a checkpoint resumes on a different number of ranks too.

With `DataLoader(num_workers > 0)` the loader draws batches ahead of the training loop
(`prefetch_factor` batches per worker, drawn in the main process), so a new size reaches the
loop that many batches late, and `state_dict()` counts the prefetched batches as handed out:
save it with the loader's lag in mind, or resume with `num_workers=0` for an exact position.
Every index is still seen exactly once per epoch. With `num_workers=0` both are exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from largebatch.batching._checks import check_int, check_state_dict, is_int
from largebatch.batching.controller import AdaptiveBatchSize

__all__ = ["GrowingBatchSampler"]

STATE_KEYS = ("epoch", "position", "length", "seed")


def _default_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """`num_replicas` and `rank` as given, else `torch.distributed`'s (1 and 0 without it)."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    check_int("num_replicas", num_replicas, 1)
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if not is_int(rank) or not 0 <= rank < num_replicas:
        raise ValueError(f"Invalid rank: {rank!r} (must be an int in [0, num_replicas={num_replicas}))")
    return num_replicas, rank


class GrowingBatchSampler(Sampler[list[int]]):
    """A batch sampler for `DataLoader(dataset, batch_sampler=...)` with a growing batch size.

    Args:
        data_source: the dataset (anything with `len`) or its length. Not a Sampler: to shard
            the data over ranks give the dataset and `num_replicas`/`rank` instead.
        controller: the `AdaptiveBatchSize` whose `batch_size` (global, over all ranks) each
            new batch takes.
        shuffle: a new permutation every epoch (torch.Generator seeded with `seed + epoch`).
        drop_last: skip an epoch's final batch when it is shorter than the current size.
        seed: the base seed of the permutations; must be the same on every rank.
        num_replicas: W, the number of data-parallel ranks (default: torch.distributed's world
            size, 1 when it is not initialised).
        rank: this rank, in [0, W) (default: torch.distributed's rank, 0 when not initialised).
    """

    def __init__(
        self,
        data_source: Sized | int,
        controller: AdaptiveBatchSize,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if isinstance(data_source, Sampler):
            raise ValueError(
                f"Invalid data_source: {type(data_source).__name__} is a Sampler, whose length is not the "
                "dataset's (a DistributedSampler holds one rank's share); pass the dataset itself, and "
                "num_replicas/rank to shard it over ranks"
            )
        length = data_source if is_int(data_source) else None
        if length is None:
            if not isinstance(data_source, Sized):
                raise ValueError(f"Invalid data_source: {data_source!r} (must be a Sized dataset or an int length)")
            length = len(data_source)
        if not isinstance(controller, AdaptiveBatchSize):
            raise ValueError(f"Invalid controller: {controller!r} (must be an AdaptiveBatchSize)")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise ValueError(f"Invalid {name}: {flag!r} (must be a bool)")
        if not is_int(seed):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int)")
        num_replicas, rank = _default_replicas(num_replicas, rank)
        if length < num_replicas:
            raise ValueError(f"Invalid data_source: length {length} (must be >= num_replicas={num_replicas} >= 1)")
        for name in ("initial_batch_size", "max_batch_size", "multiple"):
            if getattr(controller, name) % num_replicas:
                raise ValueError(
                    f"Invalid controller: {name}={getattr(controller, name)} is not a multiple of "
                    f"num_replicas={num_replicas}, so the global batch would not split evenly over the ranks"
                )
        self.length = length
        self.controller = controller
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0  # global indices of the current epoch handed out so far (all ranks)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator)

    def _global_batch_size(self) -> int:
        batch_size = self.controller.batch_size
        if batch_size % self.num_replicas:  # only a loaded controller state can get here
            raise ValueError(
                f"controller.batch_size {batch_size} is not a multiple of num_replicas={self.num_replicas}"
            )
        return batch_size

    def __iter__(self) -> Iterator[list[int]]:
        if self.position >= self.length:  # the previous epoch was used up: start the next one
            self.epoch += 1
            self.position = 0
        order = self._order(self.epoch)
        while self.position < self.length:
            batch_size = self._global_batch_size()
            start, end = self.position, min(self.position + batch_size, self.length)
            if self.drop_last and end - start < batch_size:
                self.position = self.length
                return
            if not self.drop_last and 0 < self.length - end < 2 * self.num_replicas:
                # Too few left to give every rank two samples: they join this batch. A batch of
                # one has no sample variance to test (nor BatchNorm statistics).
                end = self.length
            # Rank r's slice of [start, end): as even as possible when the size is not a multiple of W.
            size = end - start
            lo = start + size * self.rank // self.num_replicas
            hi = start + size * (self.rank + 1) // self.num_replicas
            batch = order[lo:hi].tolist()
            self.position = end  # before the yield: state_dict() taken after this batch resumes after it
            yield batch

    def __len__(self) -> int:
        """Batches in a whole epoch at the controller's current size (fewer once the batch grows)."""
        batch_size = self.controller.batch_size
        return self.length // batch_size if self.drop_last else -(-self.length // batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next `iter()` (as `DistributedSampler.set_epoch`)."""
        check_int("epoch", epoch, 0)
        self.epoch = epoch
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands; save the controller's `state_dict()` alongside it."""
        return {"epoch": self.epoch, "position": self.position, "length": self.length, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from `state_dict()`: the next batches continue the saved sequence.

        The whole state is checked first; on a ValueError the sampler is unchanged.
        """
        check_state_dict(state_dict, STATE_KEYS, "GrowingBatchSampler")
        for name in ("length", "seed"):
            if state_dict[name] != getattr(self, name):
                raise ValueError(
                    f"Invalid state_dict: saved {name}={state_dict[name]!r} "
                    f"but this sampler has {getattr(self, name)!r}"
                )
        epoch, position = state_dict["epoch"], state_dict["position"]
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"Invalid state_dict: epoch {epoch!r} (must be an int >= 0)")
        if not is_int(position) or not 0 <= position <= self.length:
            raise ValueError(f"Invalid state_dict: position {position!r} (must be an int in [0, {self.length}])")
        self.epoch = epoch
        self.position = position
