"""One optimizer step on real models' parameter shapes, timed against copy bandwidth.

    python -m bench.report --json out.json [--markdown out.md] [--steps 20] [--warmup 5]

On a CUDA GPU: copy bandwidth, then the step time of torch AdamW (fused, foreach), torch SGD
with momentum (fused), timm Lamb/Lars/Adan when timm is installed, and largebatch LAMB/LARS/Adan
(fused, foreach), on BERT-large (391 tensors, 335 M parameters) and ResNet-50 (161 tensors,
25.6 M) shapes, all fp32. Each step is reported in ms and as the share of copy bandwidth it
reaches, counting the minimum bytes an fp32 parameter must move in that step
(MIN_BYTES_PER_PARAM). Then the issue's targets: fused LAMB, LARS and Adan at ≥ 85 % of copy
bandwidth on BERT-large, and the ResNet-50 fused LARS step no slower than torch's fused SGD.

Without a GPU it runs what the CPU can: the torch and foreach implementations on smaller
shapes (the fused kernels need a GPU; under TRITON_INTERPRET=1 they would time the Python
interpreter), and says so in the output. Those numbers say nothing about the GPU targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import largebatch
from bench.shapes import FULL_SIZE, SMALL, Shape, numel

# The least an fp32 step must read and write per parameter, in bytes: AdamW reads x, g, m, v and
# writes x, m, v; SGD-momentum reads x, g, buf and writes x, buf; LAMB also re-reads x, m, v in its
# apply pass (the trust ratio needs ‖u‖ first); LARS reads x, g for the norms, then x, g, buf and
# writes x, buf; Adan reads x, g, g_prev, m, d, n and writes all but g.
MIN_BYTES_PER_PARAM = {"AdamW": 28, "SGD-momentum": 20, "LAMB": 40, "LARS": 28, "Adan": 44}
# The target for the fused LAMB, LARS and Adan steps on BERT-large.
TARGET_SHARE_OF_COPY_BANDWIDTH = 0.85
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}


@dataclass(frozen=True)
class Candidate:
    optimizer: str  # a key of MIN_BYTES_PER_PARAM
    implementation: str
    make: Callable[[list[Tensor]], torch.optim.Optimizer]
    needs_cuda: bool = False


def candidates() -> list[Candidate]:
    found = [
        Candidate("AdamW", "torch fused", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
        Candidate("AdamW", "torch foreach", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)),
        Candidate("SGD-momentum", "torch fused", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)),
    ]
    try:
        from timm.optim import Adan as TimmAdan
        from timm.optim import Lamb as TimmLamb
        from timm.optim import Lars as TimmLars
    except ImportError:
        pass  # timm is optional: its rows are left out, and the report lists them as not installed
    else:
        found += [
            Candidate("LAMB", "timm", lambda p: TimmLamb(p, lr=1e-3, weight_decay=0.01, max_grad_norm=None)),
            Candidate("LARS", "timm", lambda p: TimmLars(p, lr=1.0, momentum=0.9, weight_decay=1e-4)),
            Candidate("Adan", "timm", lambda p: TimmAdan(p, lr=1e-3, weight_decay=0.02)),
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(run: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        run()
    _synchronize(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def copy_bandwidth(device: torch.device, warmup: int, steps: int) -> float:
    """Bytes per second of a device-to-device copy (each copied byte is read once and written once)."""
    nbytes = COPY_BYTES[device.type]
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    ms = _median_ms(lambda: target.copy_(source), device, warmup, steps)
    return 2 * nbytes / (ms / 1e3)


def parameters_with_grads(shapes: list[Shape], device: torch.device) -> list[Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.randn(shape, device=device, generator=generator).requires_grad_()
        param.grad = torch.randn(shape, device=device, generator=generator)
        params.append(param)
    return params


def measure(candidate: Candidate, shapes: list[Shape], device: torch.device, bandwidth: float, warmup: int, steps: int) -> dict[str, Any]:
    n_params = sum(numel(s) for s in shapes)
    row: dict[str, Any] = {"optimizer": candidate.optimizer, "implementation": candidate.implementation}
    if candidate.needs_cuda and device.type != "cuda":
        return {**row, "ms": None, "share_of_copy_bandwidth": None, "error": "needs a CUDA GPU"}
    params = parameters_with_grads(shapes, device)
    try:
        optimizer = candidate.make(params)
        ms = _median_ms(optimizer.step, device, warmup, steps)
    except (RuntimeError, TypeError, ValueError) as error:  # e.g. an option this torch/timm lacks
        return {**row, "ms": None, "share_of_copy_bandwidth": None, "error": f"{type(error).__name__}: {error}"}
    finally:
        del params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    achieved = MIN_BYTES_PER_PARAM[candidate.optimizer] * n_params / (ms / 1e3)
    return {**row, "ms": ms, "share_of_copy_bandwidth": achieved / bandwidth, "error": None}


def run(warmup: int, steps: int) -> dict[str, Any]:
    has_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if has_gpu else "cpu")
    shape_sets = FULL_SIZE if has_gpu else SMALL
    bandwidth = copy_bandwidth(device, warmup, steps)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if has_gpu else "CPU (no CUDA device)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "note": None
        if has_gpu
        else "No CUDA device: CPU comparison of the torch and foreach steps on small shapes. The fused kernels "
        "were not measured and the GPU targets were not checked.",
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "min_bytes_per_param": MIN_BYTES_PER_PARAM,
        "shape_sets": {name: {"tensors": len(s), "params": sum(numel(x) for x in s)} for name, s in shape_sets.items()},
        "results": {},
    }
    for name, shapes in shape_sets.items():
        report["results"][name] = [measure(c, shapes, device, bandwidth, warmup, steps) for c in candidates()]
    if has_gpu:
        report["targets"] = targets(report["results"])
    return report


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _find(rows: list[dict[str, Any]], optimizer: str, implementation: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["optimizer"] == optimizer and r["implementation"] == implementation), None)


def targets(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    checks = []
    for optimizer in ("LAMB", "LARS", "Adan"):
        row = _find(results["bert-large"], optimizer, "largebatch fused")
        share = row["share_of_copy_bandwidth"] if row else None
        checks.append({
            "target": f"bert-large fused {optimizer} >= {TARGET_SHARE_OF_COPY_BANDWIDTH:.0%} of copy bandwidth",
            "value": share,
            "met": share is not None and share >= TARGET_SHARE_OF_COPY_BANDWIDTH,
        })  # fmt: skip
    ours = _find(results["resnet-50"], "LARS", "largebatch fused")
    sgd = _find(results["resnet-50"], "SGD-momentum", "torch fused")
    met = bool(ours and sgd and ours["ms"] is not None and sgd["ms"] is not None and ours["ms"] <= sgd["ms"])
    checks.append({
        "target": "resnet-50 fused LARS step no slower than torch fused SGD-momentum",
        "value": [ours and ours["ms"], sgd and sgd["ms"]],
        "met": met,
    })  # fmt: skip
    return checks


def markdown(report: dict[str, Any]) -> str:
    names = list(report["results"])
    lines = [
        f"Device: {report['device']} · torch {report['torch']} · triton {report['triton']} · "
        f"timm {report['timm'] or 'not installed'} · {report['date']}",
        "",
        f"Copy bandwidth: {report['copy_bandwidth_GBps']:.0f} GB/s. "
        "% = minimum fp32 bytes per parameter × parameters / step time, over copy bandwidth "
        f"(bytes per parameter: {', '.join(f'{k} {v}' for k, v in report['min_bytes_per_param'].items())}).",
        "",
    ]
    if report["note"]:
        lines += [f"**{report['note']}**", ""]
    sets = ", ".join(f"{n}: {s['tensors']} tensors, {s['params'] / 1e6:.1f} M params" for n, s in report["shape_sets"].items())
    lines += [f"Shapes: {sets}.", ""]
    lines.append("| optimizer | implementation | " + " | ".join(f"{n} ms | {n} %" for n in names) + " |")
    lines.append("|---|---|" + "---:|---:|" * len(names))
    for i, row in enumerate(report["results"][names[0]]):
        cells = []
        for name in names:
            r = report["results"][name][i]
            if r["ms"] is None:
                cells += [r["error"], ""]
            else:
                cells += [f"{r['ms']:.2f}", f"{100 * r['share_of_copy_bandwidth']:.1f}"]
        lines.append(f"| {row['optimizer']} | {row['implementation']} | " + " | ".join(cells) + " |")
    if report.get("targets"):
        lines += ["", "Targets:"]
        lines += [f"- {'met' if t['met'] else 'NOT met'}: {t['target']} ({t['value']})" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the full results")
    parser.add_argument("--markdown", help="where to write the table (it is printed in any case)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (Triton compiles here)")
    args = parser.parse_args(argv)
    report = run(args.warmup, args.steps)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    main()
