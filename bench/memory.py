"""Memory per parameter of each precision configuration, and the peak of a training step with and
without gradient release.

    python -m bench.memory [--width 1024] [--depth 6] [--batch 64] [--markdown]

Bytes per parameter. Every row is read from real optimizers after one step: the bytes of every
state tensor (step counters and the per-block scales of 8-bit states included) over the number
of parameters, plus the parameters' own bytes and their gradients'; a Kahan compensation buffer
(``kahan_sum``, state ``kahan_comp``) is counted with the weights, as its measured bytes.
AdaGrad-Norm has no Kahan option: "n/a" in the Kahan rows; nor ``state_dtype`` (its state is two
scalars per tensor): its rows with the option show its ordinary state.

Peak memory of one training step (forward, backward, step, zero_grad), fp32, on a multilayer
perceptron, after one warm-up step (so the optimizer states exist before the measured one):
`peak_allocated_bytes` runs the step under torch's profiler with ``profile_memory=True``, which
makes c10's CPU allocator report every allocation and free together with its running total of
bytes allocated since profiling started; the peak is the largest running total. It counts every
tensor storage allocated in the step (activations, gradients, the optimizer's temporaries, the
autograd engine's buffers), not the allocator's or Python's own overhead; what lived before the
step (parameters, states) is added from the tensors themselves. A deterministic accounting, not
a timing: the same step gives the same bytes.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from largebatch import LAMB, LARS, AdaGradNorm, Adan
from largebatch.memory import prepare_for_gradient_release

MiB = 2**20
OPTIMIZERS: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
    "LAMB": lambda groups: LAMB(groups, lr=1e-3, weight_decay=0.01),
    "LARS": lambda groups: LARS(groups, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "Adan": lambda groups: Adan(groups, lr=1e-3, weight_decay=0.02),
    # one accumulator per tensor: the AdaGrad-Norm that gradient release takes (see largebatch.memory)
    "AdaGrad-Norm (per tensor)": lambda groups: AdaGradNorm([{"params": [p]} for g in groups for p in g["params"]]),
}


def peak_allocated_bytes(step: Callable[[], object]) -> int:
    """The most bytes of CPU tensor storage live at once while `step()` runs, counting only
    what it allocates (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak, pending = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def storage_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


# --------------------------------------------------------------------------- bytes per parameter


@dataclass(frozen=True)
class Config:
    name: str
    weights: float  # bytes per parameter: the model's parameter, a master copy, a compensation buffer
    grad: float
    #: the dtype of the parameters the real optimizer's states are read from
    states: torch.dtype
    #: with a Kahan compensation buffer: the optimizers run with kahan_sum=True (the buffers'
    #: measured bytes join `weights`); optimizers without the option are "n/a"
    kahan_sum: bool = False
    #: the optimizers' ``state_dtype`` (None: like the parameters; "8bit": block-quantised)
    state_dtype: torch.dtype | str | None = None


CONFIGS = [
    Config("fp32", 4, 4, torch.float32),
    Config("bf16 params, bf16 states, kahan_sum=False", 2, 2, torch.bfloat16),
    Config("bf16 params + fp32 master (optimizer over fp32 copies)", 2 + 4, 2 + 4, torch.float32),
    Config("bf16 + Kahan (bf16 compensation), bf16 states: the default for bf16 parameters", 2, 2, torch.bfloat16, kahan_sum=True),
    Config("fp32 params, bf16 states (state_dtype=torch.bfloat16)", 4, 4, torch.float32, state_dtype=torch.bfloat16),
    Config("bf16 params, fp32 states (state_dtype=torch.float32), kahan_sum=False", 2, 2, torch.bfloat16, state_dtype=torch.float32),
    Config(
        "bf16 + Kahan (bf16 compensation), fp32 states (state_dtype=torch.float32)",
        2, 2, torch.bfloat16, kahan_sum=True, state_dtype=torch.float32,
    ),  # fmt: skip
    Config("fp32 params, 8-bit states (state_dtype='8bit')", 4, 4, torch.float32, state_dtype="8bit"),
    Config("bf16 + Kahan (bf16 compensation), 8-bit states (state_dtype='8bit')", 2, 2, torch.bfloat16, kahan_sum=True, state_dtype="8bit"),
]


def measured_state_bytes(
    name: str, dtype: torch.dtype, width: int, depth: int, kahan_sum: bool, state_dtype: torch.dtype | str | None = None
) -> tuple[float, float] | None:
    """After one step of optimizer `name` on the MLP in `dtype` with `kahan_sum` (and its groups'
    ``state_dtype`` when not None): the bytes per parameter of its states without the
    compensation buffers, and the buffers' bytes per parameter. None where the optimizer has no
    kahan_sum and it is asked for."""
    model = mlp(width, depth).to(dtype)
    group = {"params": list(model.parameters())} | ({} if state_dtype is None else {"state_dtype": state_dtype})
    if name == "AdaGradNorm":  # two scalars per tensor: neither option
        group.pop("state_dtype", None)
    optimizer = OPTIMIZERS[name]([group])
    if "kahan_sum" not in optimizer.defaults:
        if kahan_sum:
            return None
    else:
        optimizer.param_groups[0]["kahan_sum"] = kahan_sum
    model(torch.ones(2, width, dtype=dtype)).sum().backward()
    optimizer.step()
    numel = sum(p.numel() for p in model.parameters())
    comps = [state.pop("kahan_comp") for state in optimizer.state.values() if "kahan_comp" in state]
    return state_bytes(optimizer) / numel, storage_bytes(comps) / numel


def bytes_per_parameter(width: int, depth: int) -> list[dict]:
    """Per configuration and optimizer: weights + states (persistent) and the gradient's bytes."""
    measured = {
        (name, config.states, config.kahan_sum, config.state_dtype): measured_state_bytes(
            name, config.states, width, depth, config.kahan_sum, config.state_dtype
        )
        for name in OPTIMIZERS
        for config in CONFIGS
    }
    rows = []
    for config in CONFIGS:
        row = {"config": config.name, "weights": config.weights, "grad": config.grad}
        if config.kahan_sum:  # the buffers' measured bytes (alike for every optimizer with them)
            row["weights"] += measured["LAMB", config.states, True, config.state_dtype][1]
        for name in OPTIMIZERS:
            found = measured[name, config.states, config.kahan_sum, config.state_dtype]
            row[name] = None if found is None else config.weights + found[1] + found[0]  # None: no kahan_sum option
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- peak of a step


def peak_of_step(
    name: str, foreach: bool, release: bool, width: int, depth: int, batch: int, state_dtype: torch.dtype | str | None = None
) -> dict:
    """One fp32 training step's peak, after a warm-up step (states in `state_dtype` when not
    None); and the final parameters."""
    model = mlp(width, depth)
    group = {"params": list(model.parameters()), "foreach": foreach}
    optimizer = OPTIMIZERS[name]([group if state_dtype is None else {**group, "state_dtype": state_dtype}])
    handle = prepare_for_gradient_release(model, optimizer) if release else None
    x, y = torch.randn(batch, width, generator=torch.Generator().manual_seed(1)), torch.zeros(batch, 1)

    def train_step() -> None:
        nn.functional.mse_loss(model(x), y).backward()
        if handle is None:
            optimizer.step()
            optimizer.zero_grad()

    train_step()
    before = storage_bytes(model.parameters()) + state_bytes(optimizer)
    peak = peak_allocated_bytes(train_step)
    if handle is not None:
        handle.remove()
    return {
        "optimizer": name if state_dtype is None else f"{name}, {str(state_dtype).removeprefix('torch.')} states",
        "path": "foreach" if foreach else "per-tensor",
        "release": release,
        "params_and_states": before,
        "gradients": storage_bytes(model.parameters()),  # what backward allocates for them
        "peak_above": peak,
        "peak": before + peak,
        "params": [p.detach().clone() for p in model.parameters()],
    }


#: The peak rows: every optimizer with its states like the parameters, and those with the
#: ``state_dtype`` option with bf16 and with 8-bit states.
PEAK_CASES = [(name, None) for name in OPTIMIZERS] + [
    (name, state_dtype) for state_dtype in (torch.bfloat16, "8bit") for name in ("LAMB", "LARS", "Adan")
]


def peak_rows(width: int, depth: int, batch: int) -> list[dict]:
    rows = []
    for name, state_dtype in PEAK_CASES:
        for foreach in (False, True):
            plain, released = (
                peak_of_step(name, foreach, release, width, depth, batch, state_dtype) for release in (False, True)
            )
            released["identical"] = all(map(torch.equal, plain["params"], released["params"]))
            rows += [plain, released]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    numel = sum(p.numel() for p in mlp(args.width, args.depth).parameters())
    print(
        f"Machine: {platform.machine()}, torch {torch.__version__}, {datetime.date.today()}; MLP of {args.depth} "
        f"Linear({args.width}, {args.width}) + GELU and a Linear({args.width}, 1): {numel / 1e6:.2f} M parameters, "
        f"batch {args.batch}\n"
    )
    names = list(OPTIMIZERS)
    print("| configuration | weights B | grad B | " + " | ".join(f"{n} B" for n in names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for row in bytes_per_parameter(args.width, args.depth):
        cells = " | ".join("n/a" if row[n] is None else f"{row[n]:.2f}" for n in names)
        print(f"| {row['config']} | {row['weights']:g} | {row['grad']:g} | {cells} |")
    print("\n(optimizer columns: weights + optimizer states per parameter; add the grad column unless released)\n")
    print("| optimizer | path | release | params + states MiB | gradients MiB | peak above MiB | peak MiB | release / plain | bit-identical |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    rows = peak_rows(args.width, args.depth, args.batch)
    for plain, released in zip(rows[::2], rows[1::2]):
        for row in (plain, released):
            ratio = f"{row['peak'] / plain['peak']:.2f}" if row["release"] else ""
            same = ("yes" if row["identical"] else "NO") if row["release"] else ""
            print(
                f"| {row['optimizer']} | {row['path']} | {'yes' if row['release'] else 'no'} | "
                f"{row['params_and_states'] / MiB:.1f} | {row['gradients'] / MiB:.1f} | {row['peak_above'] / MiB:.1f} | "
                f"{row['peak'] / MiB:.1f} | {ratio} | {same} |"
            )


if __name__ == "__main__":
    main()
