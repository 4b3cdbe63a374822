"""The gloo harness of the batching tests: spawn `worker(rank, store)` on N local processes.

The ranks meet through a FileStore (`store` is its path), not a TCP port: a port picked by binding
port 0 and releasing it can be taken by another test before the workers bind it.
"""

import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


class CountingAllReduce:
    """Stands in for `dist.all_reduce` in a worker, counting the calls (collectives are the cost)."""

    def __init__(self):
        self.calls = 0
        self._all_reduce = dist.all_reduce

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._all_reduce(*args, **kwargs)


def init_process_group(rank: int, world_size: int, store: str, timeout_s: int = 120) -> None:
    """In a worker: join the gloo group of `spawn`."""
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )


def _run_then_exit(rank: int, worker, store: str) -> None:
    """In a worker: run `worker(rank, store)`; on success, leave without interpreter finalisation.

    A spawned child otherwise ends in `sys.exit`, whose finalisation can still meet gloo's C++
    threads holding tensors (DDP's reducer and async work keep the process group alive past
    `destroy_process_group`); a thread that then takes the GIL aborts the process with
    "terminate called without an active exception" (SIGABRT), after every check has passed.
    A worker that raises still goes through spawn's error path, traceback included.
    """
    worker(rank, store)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, world_size: int, timeout_s: float) -> None:
    """Run `worker(rank, store)` on `world_size` processes; a worker's exception fails the test."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    directory = tempfile.mkdtemp(prefix="largebatch-gloo-")
    try:
        store = f"{directory}/store"
        context = mp.start_processes(_run_then_exit, args=(worker, store), nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1.0):  # raises with the child's traceback if a worker fails
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the {world_size} gloo workers did not finish within {timeout_s} s")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
