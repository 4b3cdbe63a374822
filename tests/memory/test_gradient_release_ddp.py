"""Gradient release refuses a DistributedDataParallel model (on 2 gloo ranks): DDP averages the
gradients after the post-accumulate-grad hooks fire, so a released step would use each rank's
local gradient."""

import pytest
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batching._gloo import init_process_group, spawn  # tests/batching/_gloo.py
from largebatch import LAMB
from largebatch.memory import prepare_for_gradient_release

WORLD_SIZE = 2
TIMEOUT_S = 120  # starting two interpreters that import torch dominates


def worker(rank: int, store: str) -> None:
    init_process_group(rank, WORLD_SIZE, store)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
        for wrapped in (DistributedDataParallel(model), nn.Sequential(DistributedDataParallel(model))):
            optimizer = LAMB(wrapped.parameters(), lr=0.1)
            with pytest.raises(ValueError, match="is a DistributedDataParallel. Its reducer averages the gradients"):
                prepare_for_gradient_release(wrapped, optimizer)
            assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # nothing registered
        dist.barrier()  # no rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_model_is_refused():
    spawn(worker, WORLD_SIZE, TIMEOUT_S)
