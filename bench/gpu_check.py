"""The one-shot GPU check: correctness on CUDA first, then the step-time report.

    bash bench/gpu_check.sh [--out DIR] [--dry-run] [--only TEXT]...

Every row is its own process (bench/isolated.py) and the JSON and Markdown are rewritten after
each (bench/rows.py). In order:

1. environment: the device, and what Triton needs to build its launcher (a C compiler, Python.h);
2. for LAMB, LAMB with max_grad_norm, LARS, Adan, Adan with max_grad_norm, at the production
   chunking (the tests use a small one):
   - reference: fused=True == the per-tensor reference (fused=False, foreach=False) after
     5 steps, params and every state tensor, within the tolerance of
     tests/fused/test_fused_against_reference.py, on shapes that include BERT-large's largest
     tensor, sizes with tail chunks, a 0-dim and an empty tensor; and, as a second case, params
     and gradients that start 4 bytes into their allocation (no 16-byte alignment);
   - no host sync: `torch.cuda.set_sync_debug_mode("error")` around, after warm-up compilation,
     a steady-state step, a step on fresh gradient tensors, and a GradScaler step: any
     synchronising CUDA call raises;
   - CUDA graph: with capturable=True and lr a CUDA tensor, one step captured with
     `torch.cuda.graph` and replayed 10 times (new gradients copied in and a new lr filled in
     before each replay) == 10 eager steps of an identical optimizer;
3. the report of bench/report.py: copy bandwidth, then every candidate on BERT-large and ResNet-50.

`--dry-run` runs all of it on the CPU: tiny shapes, the fused kernels under TRITON_INTERPRET=1
with small chunks; the CUDA-only parts (sync debug mode, graph capture) are said to be skipped in
their rows, and everything around them runs.
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

import largebatch
from bench.isolated import Job
from bench.report import PROFILES, Profile, fused_chunking, report_jobs, synchronize
from bench.shapes import Shape

# The optimizers checked, with the hyper-parameters of the report (and clipping, a separate pass).
VARIANTS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "LAMB": (largebatch.LAMB, {"lr": 1e-3, "weight_decay": 0.01}),
    "LAMB max_grad_norm": (largebatch.LAMB, {"lr": 1e-3, "weight_decay": 0.01, "max_grad_norm": 1.0}),
    "LARS": (largebatch.LARS, {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-4}),
    "Adan": (largebatch.Adan, {"lr": 1e-3, "weight_decay": 0.02}),
    "Adan max_grad_norm": (largebatch.Adan, {"lr": 1e-3, "weight_decay": 0.02, "max_grad_norm": 1.0}),
}

# Per profile: shapes for the checks. On CUDA: BERT-large's largest tensor (the word embeddings),
# an FFN matrix, tails (2047, 2049 and 1000 × 1001 are not multiples of a 2048 chunk), and the
# degenerate 0-dim and empty tensors. In the dry run the same roles at a 16-element chunk.
CHECK_SHAPES: dict[str, list[Shape]] = {
    "cuda": [(30522, 1024), (4096, 1024), (1024,), (2047,), (2049,), (1000, 1001), (3, 5, 7), (1,), (), (0,)],
    "dry-run": [(50, 8), (15,), (17,), (5, 7), (3, 2, 2), (1,), (), (0,)],
}
MISALIGNED_SHAPES: dict[str, list[Shape]] = {"cuda": [(2049,), (64, 33), (4096,)], "dry-run": [(37,), (5, 7)]}
# |fused − reference| ≤ RTOL·|reference| + ATOL_SCALE·max|reference| per tensor, as
# tests/fused/test_fused_against_reference.py.
RTOL = ATOL_SCALE = 1e-5


def _leaves(shapes: list[Shape], device: torch.device, generator: torch.Generator, misaligned: bool = False) -> list[Tensor]:
    params = []
    for shape in shapes:
        value = torch.randn(shape, device=device, generator=generator)
        params.append(_offset_copy(value) if misaligned else value)
    return [p.requires_grad_() for p in params]


def _offset_copy(value: Tensor) -> Tensor:
    """`value` in a tensor whose data starts 4 bytes into its allocation: a dense leaf, not 16-byte aligned."""
    storage = torch.empty(value.numel() + 1, dtype=value.dtype, device=value.device)
    view = storage[1:].view(value.shape)
    view.copy_(value)
    return view


def _errors(actual: list[Tensor], expected: list[Tensor]) -> float:
    """The worst |a − e| / tolerance over all tensors (≤ 1 passes); inf where NaNs, shapes or the
    number of tensors differ."""
    if len(actual) != len(expected):
        return float("inf")
    worst = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return float("inf")
        if e.numel() == 0:
            continue
        a, e = a.detach().double(), e.detach().double()
        if not torch.equal(a.isnan(), e.isnan()):
            return float("inf")
        tolerance = RTOL * e.abs() + ATOL_SCALE * float(e.abs().nan_to_num().max())
        excess = ((a - e).abs() / tolerance.clamp_min(torch.finfo(torch.float64).tiny)).nan_to_num(0.0)
        worst = max(worst, float(excess.max()))
    return worst


def _states(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor]:
    """Every state tensor, in a fixed order (per param, keys sorted), the step counters included."""
    return [value for p in params for _, value in sorted(optimizer.state[p].items()) if isinstance(value, Tensor)]


def _compare_with_reference(
    variant: str, shapes: list[Shape], device: torch.device, misaligned: bool, steps: int
) -> dict[str, Any]:
    cls, hyper = VARIANTS[variant]
    generator = torch.Generator(device=device).manual_seed(0)
    initial = _leaves(shapes, device, generator, misaligned)
    runs = []
    for fused in (True, False):
        copy = _offset_copy if misaligned else Tensor.clone
        params = [copy(p.detach()).requires_grad_() for p in initial]
        options = {"fused": True} if fused else {"fused": False, "foreach": False}
        runs.append((params, cls(params, **hyper, **options)))
    for _ in range(steps):
        grads = [torch.randn(p.shape, device=device, generator=generator) for p in initial]
        for params, optimizer in runs:
            for param, grad in zip(params, grads):
                param.grad = _offset_copy(grad) if misaligned else grad.clone()
            optimizer.step()
    (fused_params, fused_optimizer), (ref_params, ref_optimizer) = runs
    return {
        "params": _errors(fused_params, ref_params),
        "states": _errors(_states(fused_optimizer, fused_params), _states(ref_optimizer, ref_params)),
    }


def check_reference(profile: str, variant: str) -> dict[str, Any]:
    """Job function: fused == per-tensor reference, aligned shapes and misaligned ones, each a case."""
    config = PROFILES[profile]
    device = torch.device(config.device)
    cases = {"shapes": (CHECK_SHAPES[profile], False), "misaligned": (MISALIGNED_SHAPES[profile], True)}
    results: dict[str, Any] = {}
    with fused_chunking(config):
        for case, (shapes, misaligned) in cases.items():
            try:
                results[case] = _compare_with_reference(variant, shapes, device, misaligned, config.check_steps)
            except Exception as error:  # one case's refusal must not hide the other's result
                results[case] = f"{type(error).__qualname__}: {error}"
    passed = all(isinstance(r, dict) and max(r.values()) <= 1.0 for r in results.values())
    detail = "; ".join(
        f"{case}: worst error/tolerance params {r['params']:.3g}, states {r['states']:.3g}"
        if isinstance(r, dict)
        else f"{case}: {r}"
        for case, r in results.items()
    )
    return {"status": "ok" if passed else "FAILED", "detail": f"{config.check_steps} steps; {detail}", "cases": results}


def _setup(
    profile: str, variant: str
) -> tuple[Profile, torch.device, type[torch.optim.Optimizer], dict[str, Any], torch.Generator, list[Tensor]]:
    """The profile, its device, the variant's class and hyper-parameters, a seeded generator, and
    leaves of CHECK_SHAPES drawn from it."""
    config = PROFILES[profile]
    device = torch.device(config.device)
    generator = torch.Generator(device=device).manual_seed(0)
    return config, device, *VARIANTS[variant], generator, _leaves(CHECK_SHAPES[profile], device, generator)


@contextmanager
def host_syncs_raise(device: torch.device) -> Iterator[None]:
    """Inside: any synchronising CUDA call raises (on the CPU there is no device to sync with)."""
    if device.type != "cuda":
        yield
        return
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check_no_host_sync(profile: str, variant: str) -> dict[str, Any]:
    """Job function: a steady step, a step on fresh gradient tensors and a GradScaler step, none syncing."""
    config, device, cls, hyper, generator, params = _setup(profile, variant)
    for param in params:
        param.grad = torch.randn(param.shape, device=device, generator=generator)
    scaler = torch.amp.GradScaler(device.type, init_scale=4.0)
    with fused_chunking(config):
        optimizer = cls(params, **hyper, fused=True)
        for _ in range(config.warmup):
            optimizer.step()
        scaler.scale(torch.ones((), device=device))  # the scale tensor exists before the checked phases
        fresh = [torch.randn(p.shape, device=device, generator=generator) for p in params]

        def fresh_gradients() -> None:
            for param, grad in zip(params, fresh):
                param.grad = grad  # new tensors: every gradient pointer moved
            optimizer.step()

        def grad_scaler_step() -> None:
            scaler.step(optimizer)
            scaler.update()

        phases: dict[str, Callable[[], None]] = {
            "steady step": optimizer.step,
            "fresh gradient tensors": fresh_gradients,
            "GradScaler step": grad_scaler_step,
        }
        syncs, where = {}, []
        for phase, run in phases.items():
            try:
                with host_syncs_raise(device):
                    run()
            except RuntimeError as error:
                if "synchroniz" not in str(error):
                    raise
                syncs[phase] = str(error).splitlines()[0]
                where.append(f"{phase}:\n{traceback.format_exc(limit=-8)}")  # the frames that synced
        synchronize(device)
    if device.type != "cuda":
        return {"status": "ok", "detail": f"dry run: the CPU has no host-device sync to catch; {', '.join(phases)} ran"}
    if syncs:
        return {"status": "FAILED", "detail": "; ".join(f"{p}: {e}" for p, e in syncs.items()), "output": "\n".join(where)}
    return {"status": "ok", "detail": f"no sync in: {', '.join(phases)}"}


def _graphed(step: Callable[[], None], device: torch.device, replays: int) -> tuple[Callable[[], None], str]:
    """One captured `step` and how to replay it; on the CPU (no graphs) the step itself, said so."""
    if device.type != "cuda":
        return step, "dry run: no CUDA graph on the CPU, the capturable step ran eagerly in place of the replays"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay, f"1 step captured, {replays} replays"


def check_graph(profile: str, variant: str) -> dict[str, Any]:
    """Job function: capturable=True, lr a device tensor: captured-step replays == eager steps."""
    config, device, cls, hyper, generator, initial = _setup(profile, variant)
    copies = []
    with fused_chunking(config):
        for _ in ("eager", "graphed"):
            params = [p.detach().clone().requires_grad_() for p in initial]
            for param in params:
                param.grad = torch.zeros_like(param)  # static: each step's gradients are copied in
            lr = torch.tensor(hyper["lr"], device=device)
            optimizer = cls(params, **{**hyper, "lr": lr}, capturable=True, fused=True)
            copies.append((params, lr, optimizer))
        (eager_params, eager_lr, eager), (graph_params, graph_lr, graphed) = copies

        def set_inputs(lr_value: float) -> None:
            grads = [torch.randn(p.shape, device=device, generator=generator) for p in initial]
            for params, lr, _ in copies:
                lr.fill_(lr_value)
                for param, grad in zip(params, grads):
                    param.grad.copy_(grad)

        side = torch.cuda.Stream() if device.type == "cuda" else None
        for _ in range(config.warmup):  # on a side stream, as torch.cuda.graph's documentation asks
            set_inputs(hyper["lr"])
            eager.step()
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    graphed.step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                graphed.step()
        replay, how = _graphed(graphed.step, device, config.graph_replays)
        for i in range(config.graph_replays):
            set_inputs(hyper["lr"] * (1.0 - 0.05 * i))  # a changing lr: the replays must read it
            eager.step()
            replay()
        synchronize(device)
    params_error = _errors(graph_params, eager_params)
    states_error = _errors(_states(graphed, graph_params), _states(eager, eager_params))
    graph_tensors = graph_params + _states(graphed, graph_params)
    identical = all(torch.equal(a, b) for a, b in zip(graph_tensors, eager_params + _states(eager, eager_params)))
    passed = max(params_error, states_error) <= 1.0
    detail = (
        f"{how}; after {config.warmup} + {config.graph_replays} steps: "
        f"{'bitwise identical' if identical else 'not bitwise identical'}, "
        f"worst error/tolerance params {params_error:.3g}, states {states_error:.3g}"
    )
    return {"status": "ok" if passed else "FAILED", "detail": detail}


def correctness_jobs(profile: str) -> list[Job]:
    checks = [("reference", "check_reference"), ("no host sync", "check_no_host_sync"), ("CUDA graph", "check_graph")]
    return [
        Job("correctness", f"{check}: {variant}", "bench.gpu_check", function, {"profile": profile, "variant": variant}, 180)
        for check, function in checks
        for variant in VARIANTS
    ]


def gpu_check_jobs(profile: str) -> list[Job]:
    return correctness_jobs(profile) + report_jobs(profile)


def main(argv: list[str] | None = None) -> None:
    from bench.rows import add_run_arguments, run_from_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, default_name="gpu_check")
    run_from_arguments(parser.parse_args(argv), gpu_check_jobs, title="GPU check: largebatch fused optimizers")


if __name__ == "__main__":
    main()
