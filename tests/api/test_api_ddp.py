"""DistributedDataParallel: 2 gloo processes with half the batch each train exactly as one process
with the whole batch, for every largebatch optimizer."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batching._gloo import init_process_group, spawn  # tests/batching/_gloo.py
from largebatch.optimizers import LAMB, LARS, AdaGradNorm, Adan

WORLD_SIZE = 2
# Wall-clock limit for the whole spawn (starting two interpreters that import torch dominates).
TIMEOUT_S = 120
BATCH, STEPS = 16, 4
OPTIMIZERS = {
    "LAMB": lambda params: LAMB(params, lr=0.01, weight_decay=0.01),
    "LARS": lambda params: LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-4),
    "Adan": lambda params: Adan(params, lr=0.01, weight_decay=0.02),
    "AdaGradNorm": lambda params: AdaGradNorm(params, lr=0.1),
}


def make_model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(STEPS, BATCH, 5, dtype=torch.float64)
    return model, x, x[..., :1].cos()


def train(model, optimizer, xs, ys):
    for x, y in zip(xs, ys):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()  # a mean: DDP's average of the halves is the whole's
        optimizer.step()


def worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_process_group(rank, WORLD_SIZE, store, timeout_s=60)
    try:
        results = {}
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        for name, make_optimizer in OPTIMIZERS.items():
            model, x, y = make_model_and_data()
            ddp = DistributedDataParallel(model)
            train(ddp, make_optimizer(ddp.parameters()), x[:, half], y[:, half])
            results[name] = [p.detach() for p in model.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_training_equals_single_process_training(tmp_path):
    spawn(functools.partial(worker, out_dir=str(tmp_path)), WORLD_SIZE, TIMEOUT_S)

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for name, make_optimizer in OPTIMIZERS.items():
        model, x, y = make_model_and_data()
        train(model, make_optimizer(model.parameters()), x, y)
        for rank in ranks:
            for got, expected in zip(rank[name], model.parameters()):
                # The all-reduce sums the halves in another order than one backward over the whole.
                torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-12)
        assert not torch.equal(ranks[0][name][0], make_model_and_data()[0][0].weight)  # it did train
