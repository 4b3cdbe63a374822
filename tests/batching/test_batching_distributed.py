"""DDP: statistics reduced over 2 gloo processes equal the statistics of the whole batch."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from largebatch.batching import MicroBatchGradients, gradient_statistics

from _gloo import CountingAllReduce, init_process_group, spawn  # tests/batching/_gloo.py

WORLD_SIZE = 2
# Wall-clock limit for the whole spawn (starting two interpreters that import torch dominates).
TIMEOUT_S = 120
FIELDS = ("num_units", "num_samples", "mean_sq_norm", "variance_trace", "inner_product_variance", "orthogonal_variance")


def half_squared_error(output, target):
    return 0.5 * (output - target).square().sum()


def per_sample_gradients(model, x, y):
    """Closed-form per-sample gradients of ½(w·x + c − y)² (torch.func's first call costs seconds
    in a fresh process; the vmap path is tested in test_batching_statistics)."""
    with torch.no_grad():
        residual = model(x) - y
    return [(residual * x).unsqueeze(1), residual]


def assert_same_statistics(got, expected):
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-10, atol=1e-12, msg=name)
    for g, e in zip(got.mean_gradient, expected.mean_gradient):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    if expected.coordinate_variance is not None:
        torch.testing.assert_close(got.coordinate_variance, expected.coordinate_variance, rtol=1e-10, atol=1e-12)


def worker(rank: int, store: str) -> None:
    init_process_group(rank, WORLD_SIZE, store, timeout_s=60)
    try:
        torch.manual_seed(0)  # the same data and model on both ranks; each takes its shard
        x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
        model = torch.nn.Linear(3, 1).double()
        world = dist.group.WORLD
        counter = CountingAllReduce()
        dist.all_reduce = counter

        # 1. Per-sample gradients, unequal shards (5 and 7), no mean given: the mean is reduced too.
        shard = slice(0, 5) if rank == 0 else slice(5, 12)
        local = per_sample_gradients(model, x[shard], y[shard])
        reduced = gradient_statistics(local, process_group=world, coordinatewise=True)
        whole = gradient_statistics(per_sample_gradients(model, x, y), coordinatewise=True)
        assert_same_statistics(reduced, whole)
        assert counter.calls == 2, counter.calls

        # 2. DDP already averaged the gradient: one all-reduce of the sums (coordinates included).
        ddp = DistributedDataParallel(model)
        shard = slice(6 * rank, 6 * rank + 6)
        (half_squared_error(ddp(x[shard]), y[shard]) / 6).backward()
        counter.calls = 0
        local = per_sample_gradients(ddp.module, x[shard], y[shard])
        reduced = gradient_statistics(
            local, mean_gradient=[p.grad for p in model.parameters()], process_group=world, coordinatewise=True
        )
        assert counter.calls == 1, counter.calls
        assert_same_statistics(reduced, whole)

        # 3. Micro-batches of 3 under no_sync; the reduced mean is the gradient to step with.
        model.zero_grad(set_to_none=True)
        recorder = MicroBatchGradients(model.parameters())
        with ddp.no_sync():
            for xb, yb in zip(x[shard].split(3), y[shard].split(3)):
                (half_squared_error(ddp(xb), yb) / 3).backward()
                recorder.record(3)
        reduced = recorder.statistics(process_group=world)
        # The mean gradient of each micro-batch of the whole batch, in rank order.
        micro_units = [g.reshape(4, 3, *g.shape[1:]).mean(1) for g in per_sample_gradients(model, x, y)]
        assert_same_statistics(reduced, gradient_statistics(micro_units, [3, 3, 3, 3]))
        recorder.write_mean_gradient(reduced)
        torch.testing.assert_close(model.weight.grad, whole.mean_gradient[0], rtol=1e-10, atol=1e-12)
        dist.barrier()  # no rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_statistics_equal_single_process_statistics():
    spawn(worker, WORLD_SIZE, TIMEOUT_S)
