"""Step time of LAMB, LARS and Adan with fp32, bf16 and 8-bit moment states (``state_dtype``), on
the CPU, per-tensor and foreach.

    python -m bench.state_precision_step [--repeats 7] [--width 1024] [--depth 6]

Workload: bench.memory's MLP (fp32 parameters). Each optimizer is built once per state option
with the same parameters' values and gradients and warmed up by one step (so the states exist);
then every round steps all three in a shuffled order (interleaved, so that load from other
processes falls on all alike). Reported: the min over rounds in ms, and as × the fp32-states
step of the same optimizer and path. One thread.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import time

import torch

from bench.memory import OPTIMIZERS, mlp

STATE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "8-bit": "8bit"}


def step_times(name: str, foreach: bool, width: int, depth: int, repeats: int) -> dict[str, float]:
    """The min over `repeats` interleaved rounds of one step's seconds, per state option."""
    steps = {}
    for label, state_dtype in STATE_DTYPES.items():
        params = list(mlp(width, depth).parameters())  # mlp seeds itself: the same values each time
        generator = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = 1e-2 * torch.randn(p.shape, generator=generator)
        optimizer = OPTIMIZERS[name]([{"params": params, "foreach": foreach, "state_dtype": state_dtype}])
        optimizer.step()
        steps[label] = optimizer.step
    best = dict.fromkeys(steps, float("inf"))
    order = list(steps)
    for _ in range(repeats):
        random.shuffle(order)
        for label in order:
            start = time.perf_counter()
            steps[label]()
            best[label] = min(best[label], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    numel = sum(p.numel() for p in mlp(args.width, args.depth).parameters())
    print(f"Machine: {platform.machine()}, torch {torch.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
          f"MLP of {numel / 1e6:.2f} M fp32 parameters; min of {args.repeats} interleaved rounds, one thread\n")  # fmt: skip
    print("| optimizer | path | " + " | ".join(f"{label} states ms (× fp32)" for label in STATE_DTYPES) + " |")
    print("|---|---|" + "---:|" * len(STATE_DTYPES))
    for name in ("LAMB", "LARS", "Adan"):
        for foreach in (False, True):
            times = step_times(name, foreach, args.width, args.depth, args.repeats)
            cells = " | ".join(f"{1e3 * t:.1f} ({t / times['fp32']:.2f})" for t in times.values())
            print(f"| {name} | {'foreach' if foreach else 'per-tensor'} | {cells} |")


if __name__ == "__main__":
    main()
