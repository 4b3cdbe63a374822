"""The gloo harness of the batching tests: spawn `worker(rank, port)` on N local processes."""

import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, timeout_s: int = 120) -> None:
    """In a worker: join the gloo group of `spawn`."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def spawn(worker, world_size: int, timeout_s: float) -> None:
    """Run `worker(rank, port)` on `world_size` processes; a worker's exception fails the test."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    context = mp.start_processes(worker, args=(free_port(),), nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):  # raises with the child's traceback if a worker fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} gloo workers did not finish within {timeout_s} s")
