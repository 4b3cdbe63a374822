"""`GrowingBatchSampler`: index batches whose size follows an `AdaptiveBatchSize` controller.

Each epoch is one permutation of the indices (seeded by `seed + epoch`, or the identity without
shuffling) cut into consecutive batches; every batch takes the controller's size at the moment
it is drawn. Since batches are consecutive slices of one permutation, every index appears
exactly once per epoch however often the size changes (with `drop_last`, a short final batch is
skipped instead). Without `drop_last`, a single index left at the end of an epoch joins the
batch before it, so no batch holds one sample (whose variance no test can estimate).

The sampler is a stream: its position (epoch, indices handed out) persists across `iter()`
calls, so breaking out of a loop and iterating again continues the epoch, and
`load_state_dict` resumes it. A fresh `iter()` after an epoch's last batch starts the next epoch.

With `DataLoader(num_workers > 0)` the loader draws batches ahead of the training loop
(`prefetch_factor` per worker), so a new size reaches the loop that many batches late, and
`state_dict()` counts the prefetched batches as handed out. With `num_workers=0` both are exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from largebatch.batching.controller import AdaptiveBatchSize

__all__ = ["GrowingBatchSampler"]


class GrowingBatchSampler(Sampler[list[int]]):
    """A batch sampler for `DataLoader(dataset, batch_sampler=...)` with a growing batch size.

    Args:
        data_source: the dataset (anything with `len`) or its length.
        controller: the `AdaptiveBatchSize` whose `batch_size` each new batch takes.
        shuffle: a new permutation every epoch (torch.Generator seeded with `seed + epoch`).
        drop_last: skip an epoch's final batch when it is shorter than the current size.
        seed: the base seed of the permutations.
    """

    def __init__(
        self,
        data_source: Sized | int,
        controller: AdaptiveBatchSize,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        length = data_source if isinstance(data_source, int) and not isinstance(data_source, bool) else None
        if length is None:
            if not isinstance(data_source, Sized):
                raise ValueError(f"Invalid data_source: {data_source!r} (must be a Sized dataset or an int length)")
            length = len(data_source)
        if length < 1:
            raise ValueError(f"Invalid data_source: length {length} (must be >= 1)")
        if not isinstance(controller, AdaptiveBatchSize):
            raise ValueError(f"Invalid controller: {controller!r} (must be an AdaptiveBatchSize)")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise ValueError(f"Invalid {name}: {flag!r} (must be a bool)")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int)")
        self.length = length
        self.controller = controller
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.position = 0  # indices of the current epoch handed out so far

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        if self.position >= self.length:  # the previous epoch was used up: start the next one
            self.epoch += 1
            self.position = 0
        order = self._order(self.epoch)
        while self.position < self.length:
            batch_size = self.controller.batch_size
            end = min(self.position + batch_size, self.length)
            if self.drop_last and end - self.position < batch_size:
                self.position = self.length
                return
            if not self.drop_last and self.length - end == 1:
                # A lone last index joins this batch: a batch of one has no sample variance to
                # test (nor BatchNorm statistics).
                end = self.length
            batch = order[self.position : end].tolist()
            self.position = end  # before the yield: state_dict() taken after this batch resumes after it
            yield batch

    def __len__(self) -> int:
        """Batches in a whole epoch at the controller's current size (fewer once the batch grows)."""
        batch_size = self.controller.batch_size
        return self.length // batch_size if self.drop_last else -(-self.length // batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next `iter()` (as `DistributedSampler.set_epoch`)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"Invalid epoch: {epoch!r} (must be an int >= 0)")
        self.epoch = epoch
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands; save the controller's `state_dict()` alongside it."""
        return {"epoch": self.epoch, "position": self.position, "length": self.length, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from `state_dict()`: the next batches continue the saved sequence."""
        for name in ("length", "seed"):
            if state_dict[name] != getattr(self, name):
                raise ValueError(
                    f"Invalid state_dict: saved {name}={state_dict[name]!r} "
                    f"but this sampler has {getattr(self, name)!r}"
                )
        if not 0 <= state_dict["position"] <= self.length:
            raise ValueError(f"Invalid state_dict: position {state_dict['position']} outside [0, {self.length}]")
        self.epoch = state_dict["epoch"]
        self.position = state_dict["position"]
