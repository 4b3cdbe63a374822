"""Host work of one fused optimizer step, against torch's fused AdamW, with every kernel stubbed.

    python -m bench.host_overhead [--repeats 7] [--steps 20] [--json out.json]

What a fused step costs the CPU around its kernel launches (grouping, checks, tables, state
loops) decides whether it can keep a GPU busy. This measures exactly that on the CPU: the Triton
launches of largebatch's fused LAMB, LARS and Adan (their step counts included: a per-tensor
pass, or LARS's update pass), torch's `torch._fused_adamw_` and its step-counter increment
(`torch._foreach_add_`) are replaced by no-ops that count their calls, so what remains is the
Python and C++ host work of `step()`.

Layouts: BERT-large (391 tensors) and ResNet-50 (161 tensors), with small sizes (the host work
depends on the number of tensors, not their sizes). Two cases:

    same   the same gradient tensors every step (gradients zeroed in place, or accumulated);
    fresh  new gradient tensors every step, as `zero_grad(set_to_none=True)` + backward hand them
           to the optimizer (allocated before each timed step, outside the timing).

Time is the calling thread's CPU time (`time.thread_time`, torch limited to one thread), which
is the host work itself and, unlike wall time, does not grow when other processes preempt this
one on a shared machine. Every candidate runs interleaved with the others in each repeat; the
table gives the median over repeats of each repeat's median step, and that time over torch fused
AdamW's in the same case; and, since noise on a shared machine only adds time, the same ratio
of the fastest repeats (each candidate's least repeat median over torch's).
It also counts kernel launches, pointer-row uploads and plan builds per steady-state step.
Triton's own launch overhead on a GPU (its Python launcher) is not in these numbers.
"""

from __future__ import annotations

import os

# The fused steps accept CPU tensors only under the interpreter, and the flag must be set before
# triton is imported; no kernel runs here (every launch is stubbed).
os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

import largebatch  # noqa: E402
from bench.shapes import Shape, bert_shapes, resnet50_shapes  # noqa: E402

LAYOUTS: dict[str, list[Shape]] = {
    "BERT-large layout (391 tensors)": bert_shapes(layers=24, hidden=16, vocab=64, positions=16),
    "ResNet-50 layout (161 tensors)": resnet50_shapes(width=4, classes=10),
}
CASES = ("same", "fresh")
# torch's fused AdamW kernel, and the step-counter increment its fused step launches before the
# kernel: one multi-tensor launch on a GPU, but on the CPU a loop that adds to each 0-dim
# counter, ~1 ms for 391 counters, which is device work there, not host work.
STUBBED_TORCH_OPS = ("_fused_adamw_", "_foreach_add_")


class LaunchCounter:
    """Replaces every kernel launch by a counted no-op while active."""

    def __init__(self) -> None:
        self.launches = 0

    @contextlib.contextmanager
    def stubbed(self) -> Iterator[None]:
        from triton.runtime.interpreter import InterpretedFunction

        counter = self

        def no_launch(*args: object, **kwargs: object) -> None:
            counter.launches += 1

        def no_foreach_add(tensors: list[torch.Tensor], *args: object, **kwargs: object) -> None:
            # What the real in-place op does to the host's state besides computing: one version
            # bump per tensor (what the fused plans' owned-state check counts on).
            counter.launches += 1
            torch.autograd.graph.increment_version(tensors)

        original_getitem = InterpretedFunction.__getitem__
        originals = {name: getattr(torch, name) for name in STUBBED_TORCH_OPS}
        InterpretedFunction.__getitem__ = lambda self, grid: no_launch  # type: ignore[method-assign]
        torch._fused_adamw_ = no_launch  # type: ignore[assignment]
        torch._foreach_add_ = no_foreach_add  # type: ignore[assignment]
        try:
            yield
        finally:
            InterpretedFunction.__getitem__ = original_getitem  # type: ignore[method-assign]
            for name, op in originals.items():
                setattr(torch, name, op)


@dataclass(frozen=True)
class Candidate:
    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]


CANDIDATES = [
    Candidate("torch AdamW fused", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
    Candidate("LAMB fused", lambda p: largebatch.LAMB(p, lr=1e-3, fused=True)),
    Candidate("LAMB fused + max_grad_norm", lambda p: largebatch.LAMB(p, lr=1e-3, max_grad_norm=1.0, fused=True)),
    Candidate("LARS fused", lambda p: largebatch.LARS(p, lr=0.1, momentum=0.9, fused=True)),
    Candidate("Adan fused", lambda p: largebatch.Adan(p, lr=1e-3, fused=True)),
    Candidate("Adan fused + max_grad_norm", lambda p: largebatch.Adan(p, lr=1e-3, max_grad_norm=1.0, fused=True)),
    Candidate("LAMB fused, 8-bit states", lambda p: largebatch.LAMB(p, lr=1e-3, fused=True, state_dtype="8bit")),
    Candidate("LARS fused, 8-bit states", lambda p: largebatch.LARS(p, lr=0.1, momentum=0.9, fused=True, state_dtype="8bit")),
    Candidate("Adan fused, 8-bit states", lambda p: largebatch.Adan(p, lr=1e-3, fused=True, state_dtype="8bit")),
]


def plan_counts(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(plan builds, pointer-row uploads) so far; (0, 0) for torch's optimizers."""
    caches = getattr(optimizer, "_fused_plan_caches", [])
    return sum(c.builds for c in caches), sum(c.uploads for c in caches)


class Run:
    """One candidate on one layout in one case: its parameters, optimizer and timings."""

    def __init__(self, candidate: Candidate, shapes: list[Shape], case: str, counter: LaunchCounter) -> None:
        self.candidate, self.case, self.counter = candidate, case, counter
        self.params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
        self.new_grads()
        self.optimizer = candidate.make(self.params)
        self.optimizer.step()  # builds the plans and the state
        self.medians: list[float] = []
        self.per_step: dict[str, float] = {}

    def new_grads(self) -> None:
        for p in self.params:
            p.grad = torch.full_like(p, 1e-3)

    def measure(self, steps: int) -> None:
        times = []
        launches, (builds, uploads) = self.counter.launches, plan_counts(self.optimizer)
        for _ in range(steps):
            if self.case == "fresh":
                self.new_grads()
            start = time.thread_time()
            self.optimizer.step()
            times.append(time.thread_time() - start)
        self.medians.append(statistics.median(times))
        new_builds, new_uploads = plan_counts(self.optimizer)
        self.per_step = {
            "launches": (self.counter.launches - launches) / steps,
            "uploads": (new_uploads - uploads) / steps,
            "plan builds": (new_builds - builds) / steps,
        }


def measure(repeats: int, steps: int) -> list[dict[str, object]]:
    counter = LaunchCounter()
    rows = []
    with counter.stubbed():
        for layout, shapes in LAYOUTS.items():
            for case in CASES:
                runs = [Run(candidate, shapes, case, counter) for candidate in CANDIDATES]
                for _ in range(repeats):
                    for run in runs:  # interleaved: each repeat times every candidate once
                        run.measure(steps)
                torch_ms, torch_min = statistics.median(runs[0].medians) * 1e3, min(runs[0].medians) * 1e3
                for run in runs:
                    ms, fastest = statistics.median(run.medians) * 1e3, min(run.medians) * 1e3
                    rows.append({"layout": layout, "case": case, "step": run.candidate.name, "host ms": ms,
                                 "x torch": ms / torch_ms, "x torch (min)": fastest / torch_min,
                                 **run.per_step})  # fmt: skip
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| layout | gradients | step | host ms | × torch fused AdamW | × torch, fastest repeats | launches | uploads | plan builds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['case']} | {r['step']} | {r['host ms']:.3f} | {r['x torch']:.2f} | {r['x torch (min)']:.2f} | "
            f"{r['launches']:g} | {r['uploads']:g} | {r['plan builds']:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per candidate per repeat (default 20)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    torch.set_num_threads(1)
    rows = measure(args.repeats, args.steps)
    header = (
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
        f"torch {torch.__version__} · median of {args.repeats} interleaved repeats × {args.steps} steps"
    )
    print(header)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
