"""One optimizer step on real models' parameter shapes, timed against copy bandwidth.

    python -m bench.report --out DIR [--dry-run]

On a CUDA GPU: copy bandwidth, then the step time of torch AdamW (fused, foreach), torch SGD
with momentum (fused), timm Lamb/Lars/Adan (loaded without timm's `__init__`, see
bench/timm_optim.py) and largebatch LAMB/LARS/Adan (fused, foreach), on BERT-large (391
tensors, 335 M parameters) and ResNet-50 (161 tensors, 25.6 M) shapes, all fp32. Each step is
reported twice:

- host ms: the CPU wall time of `step()`, without synchronising (what the Python around the
  kernels costs; the device is idle when each timed call begins);
- device ms: CUDA events around each step, with the GPU held back by a sleep kernel while the
  host queues the steps, so that the events time the device's work and not the host's.

% of copy bandwidth = the minimum bytes an fp32 parameter must move in that step
(MIN_BYTES_PER_PARAM) × parameters / device time, over the copy bandwidth. Then the issue's
targets: fused LAMB, LARS and Adan at ≥ 85 % on BERT-large, and the ResNet-50 fused LARS step no
slower than torch's fused SGD.

Each candidate runs in its own process (bench/isolated.py), and the JSON and Markdown are
rewritten after every row (bench/rows.py). `bench/gpu_check.sh` runs the correctness
checks first and then this report.

`--dry-run` runs everything on the CPU with tiny shapes and few steps (the fused kernels under
TRITON_INTERPRET=1 with small chunks): it checks the machinery, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

import largebatch
from bench.isolated import Job
from bench.shapes import FULL_SIZE, Shape, bert_shapes, numel, resnet50_shapes
from bench.timm_optim import TimmNotInstalled, timm_optimizer

# The least an fp32 step must read and write per parameter, in bytes: AdamW reads x, g, m, v and
# writes x, m, v; SGD-momentum reads x, g, buf and writes x, buf; LAMB also re-reads x, m, v in its
# apply pass (the trust ratio needs ‖u‖ first); LARS reads x, g for the norms, then x, g, buf and
# writes x, buf; Adan reads x, g, g_prev, m, d, n and writes all but g.
MIN_BYTES_PER_PARAM = {"AdamW": 28, "SGD-momentum": 20, "LAMB": 40, "LARS": 28, "Adan": 44}
# The target for the fused LAMB, LARS and Adan steps on BERT-large.
TARGET_SHARE_OF_COPY_BANDWIDTH = 0.85


@dataclass(frozen=True)
class Profile:
    """Where and how big: the CUDA run, or the CPU dry run that exercises the same code."""

    device: str
    shape_sets: dict[str, list[Shape]]
    warmup: int  # untimed steps first (Triton compiles there); the correctness checks warm up as many
    steps: int  # timed steps per measurement
    check_steps: int  # steps compared with the reference in the correctness checks
    graph_replays: int  # replays of the captured step compared with as many eager steps
    copy_bytes: int
    # (chunk_size, num_warps) for the fused kernels; None: largebatch's production chunking.
    chunking: tuple[int, int] | None
    # Whether children run the Triton interpreter (TRITON_INTERPRET=1) or compiled kernels.
    interpret: bool
    note: str | None = None


PROFILES = {
    "cuda": Profile(
        "cuda",
        FULL_SIZE,
        warmup=3,
        steps=20,
        check_steps=5,
        graph_replays=10,
        copy_bytes=1 << 30,
        chunking=None,
        interpret=False,
    ),
    "dry-run": Profile(
        "cpu",
        {
            "bert (1 layer, hidden 4)": bert_shapes(layers=1, hidden=4, vocab=20, positions=4),
            "resnet-50 (width 1, first 20 tensors)": resnet50_shapes(width=1, classes=3)[:20],
        },
        warmup=1,
        steps=2,
        check_steps=2,
        graph_replays=2,
        copy_bytes=1 << 20,
        chunking=(16, 1),  # as the tests: several chunks and a tail in tiny tensors
        interpret=True,
        note="DRY RUN on the CPU: tiny shapes, the fused kernels under the Triton interpreter. It checks the "
        "machinery only; its numbers say nothing about any GPU.",
    ),
}


@dataclass(frozen=True)
class Candidate:
    optimizer: str  # a key of MIN_BYTES_PER_PARAM
    implementation: str
    make: Callable[[list[Tensor]], torch.optim.Optimizer]
    fused: bool = False  # a largebatch fused step (runs at the profile's chunking)

    @property
    def label(self) -> str:
        return f"{self.optimizer} / {self.implementation}"


def _timm(optimizer: str, **hyper: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    return lambda params: timm_optimizer(optimizer)(params, **hyper)


def _candidates() -> list[Candidate]:
    found = [
        Candidate("AdamW", "torch fused", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
        Candidate("AdamW", "torch foreach", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)),
        Candidate("SGD-momentum", "torch fused", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)),
        # timm's defaults otherwise (its foreach choice included); no gradient clipping, as ours.
        Candidate("LAMB", "timm", _timm("LAMB", lr=1e-3, weight_decay=0.01, max_grad_norm=None)),
        Candidate("LARS", "timm", _timm("LARS", lr=1.0, momentum=0.9, weight_decay=1e-4)),
        Candidate("Adan", "timm", _timm("Adan", lr=1e-3, weight_decay=0.02)),
    ]
    for fused in (True, False):
        kind = {"fused": True} if fused else {"foreach": True}
        label = "largebatch fused" if fused else "largebatch foreach"
        found += [
            Candidate("LAMB", label, lambda p, kind=kind: largebatch.LAMB(p, lr=1e-3, weight_decay=0.01, **kind), fused),
            Candidate(
                "LARS", label, lambda p, kind=kind: largebatch.LARS(p, lr=1.0, momentum=0.9, weight_decay=1e-4, **kind), fused
            ),
            Candidate("Adan", label, lambda p, kind=kind: largebatch.Adan(p, lr=1e-3, weight_decay=0.02, **kind), fused),
        ]
    return found


# label -> candidate, in the report's order: baselines first.
CANDIDATES: dict[str, Candidate] = {c.label: c for c in _candidates()}


@contextmanager
def fused_chunking(profile: Profile) -> Iterator[None]:
    """The profile's chunking for largebatch's fused steps (production when it names none)."""
    if profile.chunking is None:
        yield
        return
    from largebatch.fused import Chunking, chunking

    with chunking(Chunking(*profile.chunking)):
        yield


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def _sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def _device_ms(step: Callable[[], None], steps: int, host_ms: float) -> float:
    """Median device time per step from CUDA events recorded between back-to-back steps.

    A sleep kernel first holds the GPU for longer than the host needs to queue all the steps, so
    no step waits on the host: the events measure the device's work alone.
    """
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    ahead_ms = min(1.5 * host_ms * steps + 5.0, 1000.0)
    torch.cuda._sleep(int(ahead_ms * _sleep_cycles_per_ms()))
    events[0].record()
    for event in events[1:]:
        step()
        event.record()
    events[-1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairwise(events))


def step_times(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """(host ms, device ms) per step, medians; device ms is None off CUDA (the CPU has only host time)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    host = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        host.append(1e3 * (time.perf_counter() - begin))
        synchronize(device)  # outside the timed call: each step starts with an idle device
    host_ms = statistics.median(host)
    return host_ms, _device_ms(step, steps, host_ms) if device.type == "cuda" else None


def parameters_with_grads(shapes: list[Shape], device: torch.device) -> list[Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.randn(shape, device=device, generator=generator).requires_grad_()
        param.grad = torch.randn(shape, device=device, generator=generator)
        params.append(param)
    return params


# ------------------------------------------------------------------ job functions (run in a child)


def copy_bandwidth(profile: str) -> dict[str, Any]:
    """Bytes per second of a device-to-device copy (each copied byte is read once and written once)."""
    config = PROFILES[profile]
    device = torch.device(config.device)
    source = torch.empty(config.copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    host_ms, device_ms = step_times(lambda: target.copy_(source), device, config.warmup, config.steps)
    ms = host_ms if device_ms is None else device_ms
    return {"copy_bandwidth_GBps": 2 * config.copy_bytes / (ms / 1e3) / 1e9, "bytes": config.copy_bytes}


def step_row(profile: str, shape_set: str, candidate: str) -> dict[str, Any]:
    """One candidate's step times on one shape set."""
    config = PROFILES[profile]
    chosen = CANDIDATES[candidate]
    shapes = config.shape_sets[shape_set]
    row: dict[str, Any] = {
        "optimizer": chosen.optimizer,
        "implementation": chosen.implementation,
        "shapes": shape_set,
        "tensors": len(shapes),
        "params": sum(numel(s) for s in shapes),
        "bytes_per_param": MIN_BYTES_PER_PARAM[chosen.optimizer],
    }
    device = torch.device(config.device)
    with fused_chunking(config) if chosen.fused else nullcontext():
        try:
            optimizer = chosen.make(parameters_with_grads(shapes, device))
        except TimmNotInstalled as missing:
            return {**row, "status": "skipped", "detail": str(missing)}
        host_ms, device_ms = step_times(optimizer.step, device, config.warmup, config.steps)
    return {**row, "host_ms": host_ms, "device_ms": device_ms}


def report_jobs(profile: str) -> list[Job]:
    """Copy bandwidth, then every candidate on every shape set, each its own job."""
    # The module by name, not __name__: run as `python -m bench.report`, that is "__main__".
    jobs = [Job("bandwidth", "copy bandwidth", "bench.report", "copy_bandwidth", {"profile": profile}, timeout_s=60)]
    for shape_set in PROFILES[profile].shape_sets:
        for label, candidate in CANDIDATES.items():
            jobs.append(
                Job(
                    "step time",
                    f"{shape_set}: {label}",
                    "bench.report",
                    "step_row",
                    {"profile": profile, "shape_set": shape_set, "candidate": label},
                    timeout_s=180 if candidate.fused else 120,  # the first fused job compiles the kernels
                )
            )
    return jobs


def main(argv: list[str] | None = None) -> None:
    from bench.rows import add_run_arguments, run_from_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, default_name="report")
    run_from_arguments(parser.parse_args(argv), report_jobs, title="Optimizer step report")


if __name__ == "__main__":
    main()
