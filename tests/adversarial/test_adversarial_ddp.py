"""DDP: ConAdv on 2 gloo ranks, each perturbing its own shard, equals one process on the whole batch;
with auxiliary BatchNorm, the adversarial twins' gradients are all-reduced too."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from largebatch import LAMB
from largebatch.adversarial import ConAdv, convert_to_auxiliary_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "batching"))
from _gloo import init_process_group, spawn  # noqa: E402  tests/batching/_gloo.py

WORLD_SIZE = 2
STEPS = 4
TIMEOUT_S = 120


def make_model() -> nn.Module:
    """No BatchNorm: its batch statistics are per rank under DDP, so they would differ by design."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
            for _ in range(STEPS)]


def train(model: nn.Module, conadv_model: nn.Module, batches) -> None:
    optimizer = LAMB(model.parameters(), lr=0.05)
    conadv = ConAdv(conadv_model, nn.functional.cross_entropy, epsilon=0.1, norm="l2", staleness=1)
    for x, y in batches:
        optimizer.zero_grad()
        conadv.backward(x, y)
        optimizer.step()


def batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    return convert_to_auxiliary_batchnorm(model)


def check_auxiliary_batchnorm_stays_in_sync(rank: int) -> None:
    """Per-rank batch statistics differ, but every weight, the adversarial twin's included, gets the
    all-reduced gradient: both ranks hold the same weights after the steps."""
    model = batchnorm_model()
    start = model[1].adversarial.weight.detach().clone()
    shards = [(x.chunk(WORLD_SIZE)[rank], y.chunk(WORLD_SIZE)[rank]) for x, y in data()]
    train(model, DistributedDataParallel(model), shards)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, weights)
    assert torch.equal(gathered[0], gathered[1])
    assert not torch.equal(model[1].adversarial.weight, start)  # the twin was trained


def worker(rank: int, store: str) -> None:
    init_process_group(rank, WORLD_SIZE, store, timeout_s=60)
    try:
        model = make_model()
        ddp = DistributedDataParallel(model)
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(dist.group.WORLD, counting_hook)
        shards = [(x.chunk(WORLD_SIZE)[rank], y.chunk(WORLD_SIZE)[rank]) for x, y in data()]
        train(model, ddp, shards)
        # One all-reduce per step (the model fits one bucket): the perturbation passes reduce nothing.
        assert len(calls) == STEPS, calls
        reference = make_model()
        train(reference, reference, data())
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        check_auxiliary_batchnorm_stays_in_sync(rank)
        dist.barrier()  # no rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_on_two_ranks_equals_one_process_on_the_whole_batch():
    spawn(worker, WORLD_SIZE, TIMEOUT_S)
