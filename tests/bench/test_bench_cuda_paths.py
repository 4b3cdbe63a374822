"""The CUDA-only branches of bench/report.py and bench/gpu_check.py (device timing with events
and a sleep kernel, sync debug mode, graph capture), run on the CPU against stand-ins for the
torch.cuda calls they make: what they do with those calls is checked, not the GPU."""

from __future__ import annotations

import os
import time

import pytest
import torch

from bench import gpu_check, report, rows
from bench.isolated import REPO_ROOT

CUDA = torch.device("cuda")


class _Clock:
    """A fake GPU timeline: the sleep kernel and each step advance it; events read it."""

    def __init__(self) -> None:
        self.ms = 0.0
        self.calls: list[str] = []

    def sleep(self, cycles: int) -> None:
        self.calls.append(f"sleep {cycles}")
        self.ms += cycles / 1e6  # 1e6 cycles per ms

    def event(self, enable_timing: bool = False):
        clock = self

        class Event:
            def record(self) -> None:
                self.at = clock.ms

            def synchronize(self) -> None:
                clock.calls.append("event sync")

            def elapsed_time(self, end) -> float:
                return end.at - self.at

        return Event()


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(torch.cuda, "Event", clock.event)
    monkeypatch.setattr(torch.cuda, "_sleep", clock.sleep)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: clock.calls.append("device sync"))
    report._sleep_cycles_per_ms.cache_clear()
    yield clock
    report._sleep_cycles_per_ms.cache_clear()


def test_device_time_is_the_median_between_events_and_host_time_is_wall(clock):
    device_ms = iter([4.0, 5.0, 100.0])  # what the GPU takes for each device-timed step
    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        if calls > 2 + 3:  # after the warm-up and the host-timed steps
            clock.ms += next(device_ms)
        time.sleep(0.001)

    host_ms, device = report.step_times(step, CUDA, warmup=2, steps=3)
    assert device == 5.0  # median of 4, 5, 100
    assert host_ms >= 1.0  # the wall time of steps that sleep 1 ms on the host
    sleeps = [c for c in clock.calls if c.startswith("sleep")]
    assert sleeps[0] == "sleep 10000000"  # the calibration, then a sleep long enough to queue 3 steps
    assert int(sleeps[1].split()[1]) >= 1.5 * 3 * host_ms * 1e6
    assert clock.calls[-1] == "event sync"


def test_sync_debug_mode_is_on_inside_and_off_after_even_when_the_step_raises(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with pytest.raises(RuntimeError, match="synchronizing"):
        with gpu_check.host_syncs_raise(CUDA):
            assert modes == ["error"]
            raise RuntimeError("called a synchronizing CUDA operation")
    assert modes == ["error", 0]


def test_graph_capture_runs_the_step_once_and_returns_the_replay(monkeypatch):
    events = []

    class Graph:
        def replay(self) -> None:
            events.append("replay")

    class Capture:
        def __init__(self, graph) -> None:
            assert isinstance(graph, Graph)

        def __enter__(self) -> None:
            events.append("capture begins")

        def __exit__(self, *exc) -> None:
            events.append("capture ends")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    replay, how = gpu_check._graphed(lambda: events.append("step"), CUDA, replays=10)
    replay()
    assert events == ["capture begins", "step", "capture ends", "replay"]
    assert how == "1 step captured, 10 replays"


def test_environment_on_a_cuda_machine_names_what_triton_lacks(monkeypatch):
    class Properties:
        name, major, minor, total_memory = "NVIDIA H200", 9, 0, 141 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    monkeypatch.setattr(rows, "c_compiler", lambda: None)
    row = rows.environment("cuda")
    assert row["facts"]["device"] == "NVIDIA H200 (sm_90, 141 GiB)"
    assert row["status"] == "error" and row["fatal"] is False  # the baselines can still run
    assert "no C compiler (gcc)" in row["detail"]


def test_cuda_children_never_run_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" not in rows.child_env(report.PROFILES["cuda"])
    assert rows.child_env(report.PROFILES["dry-run"])["TRITON_INTERPRET"] == "1"
    assert rows.child_env(report.PROFILES["cuda"])["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
