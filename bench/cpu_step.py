"""The default (per-tensor) and foreach steps of LAMB, LARS and Adan on the CPU, against their peers.

    python -m bench.cpu_step [--repeats 7] [--width-scale 1.0]

Workloads: a BERT-like encoder (8 layers, hidden 512, vocabulary 8192: 135 fp32 tensors,
29.9 M parameters) and ResNet-50 (161 tensors, 25.6 M parameters), as written out in
bench/shapes.py. For each optimizer: ours with ``foreach=False`` and ``foreach=True``, timm's
(per-tensor, its CPU default, and foreach), pytorch-optimizer's (default and foreach; skipped
with a note when it is not installed) and, for scale, torch's AdamW / SGD (foreach and for-loop).

* Time: every implementation steps the same parameters and gradients, in a shuffled order each
  round (interleaved, so that load from other processes falls on all alike); min of the rounds,
  in ms and as × the best peer (the fastest of timm's and pytorch-optimizer's steps).
* Bytes per parameter: the input and output bytes of every aten op of one step, counted by
  :class:`Traffic`, over the parameter count; the minimum an update needs is beside it.
* Peak extra memory: the most bytes that tensors created during one step held at once (the step's
  temporaries; parameters, gradients and states exist before it), tracked by :class:`Traffic`.
* Agreement: before timing, ours (both paths) and timm's run three steps in float64 on a small
  layout of the same structure and must agree to 1e-10: the rows compare the same update.

timm is loaded from bench/.deps (``pip install --no-deps --target bench/.deps timm``, git-ignored)
or from sys.path, by bench/timm_optim.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from bench.shapes import Shape, bert_shapes, numel, resnet50_shapes
from bench.timm_optim import TimmNotInstalled, timm_optimizer
from largebatch.optimizers import AGVM, LAMB, LARS, AdaGradNorm, Adan

DEPS = Path(__file__).resolve().parent / ".deps"
#: The bytes per parameter an fp32 step must move: LAMB reads g, m, v, x and writes m, v (the
#: update's norm needs all of them), then reads m, v, x and writes x; LARS reads x, g for the norms,
#: then x, g, buf and writes buf, x; Adan reads x, g, g_prev, m, d, n and writes all but g.
MIN_BYTES_PER_PARAM = {"LAMB": 40, "LARS": 28, "Adan": 44}

# The same update in every implementation: timm's options matched to ours.
LAMB_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
LARS_HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, eps=1e-8)
ADAN_HYPER = dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02)

Make = Callable[[list[Tensor]], torch.optim.Optimizer]


def layouts(width_scale: float = 1.0) -> dict[str, list[Shape]]:
    """The two workloads; `width_scale` < 1 shrinks their widths (same tensor counts)."""
    hidden, width = max(8, int(512 * width_scale)), max(2, int(64 * width_scale))
    return {
        f"BERT-like (8 layers, hidden {hidden}, vocab {int(8192 * width_scale)})": bert_shapes(
            8, hidden, max(8, int(8192 * width_scale)), max(8, int(512 * width_scale))
        ),
        f"ResNet-50 (width {width})": resnet50_shapes(width, max(10, int(1000 * width_scale))),
    }


@dataclass(frozen=True)
class Impl:
    family: str  # the workload group whose rows share parameters: LAMB, LARS, Adan, AdaGradNorm, AGVM
    label: str
    make: Make
    kind: str  # "ours", "peer" (in the best peer), or "scale" (shown for scale only)
    baseline: str | None = None  # the label of the row it is compared with, instead of the best peer


def _timm(name: str, **hyper: Any) -> Make:
    search = [str(DEPS)] if (DEPS / "timm").is_dir() else None
    cls = timm_optimizer(name, search)
    return lambda params: cls(params, **hyper)


def implementations(notes: list[str]) -> list[Impl]:
    """Every row; a peer that is not installed is left out and said so in `notes`."""
    rows = []
    for family, ours, hyper in (("LAMB", LAMB, LAMB_HYPER), ("LARS", LARS, LARS_HYPER), ("Adan", Adan, ADAN_HYPER)):
        rows += [
            Impl(family, "ours, per-tensor (foreach=False)", lambda p, o=ours, h=hyper: o(p, **h, foreach=False), "ours"),
            Impl(family, "ours, foreach (foreach=True)", lambda p, o=ours, h=hyper: o(p, **h, foreach=True), "ours"),
        ]
    try:
        timm_hyper = {"LAMB": dict(LAMB_HYPER, max_grad_norm=None), "LARS": LARS_HYPER, "Adan": ADAN_HYPER}
        for family, hyper in timm_hyper.items():
            rows.append(Impl(family, "timm, per-tensor (its CPU default)", _timm(family, **hyper, foreach=False), "peer"))
            rows.append(Impl(family, "timm, foreach", _timm(family, **hyper, foreach=True), "peer"))
    except TimmNotInstalled as error:
        notes.append(f"timm rows skipped: {error}")
    rows += _pytorch_optimizer_rows(notes)
    adamw = dict(lr=1e-3, weight_decay=0.01)
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    rows += [
        Impl("LAMB", "torch AdamW foreach", lambda p: torch.optim.AdamW(p, **adamw, foreach=True), "scale"),
        Impl("LAMB", "torch AdamW for-loop", lambda p: torch.optim.AdamW(p, **adamw, foreach=False), "scale"),
        Impl("LARS", "torch SGD-momentum foreach", lambda p: torch.optim.SGD(p, **sgd, foreach=True), "scale"),
        Impl("LARS", "torch SGD-momentum for-loop", lambda p: torch.optim.SGD(p, **sgd, foreach=False), "scale"),
        Impl("AdaGradNorm", "ours, per-tensor", lambda p: AdaGradNorm(p, foreach=False), "ours"),
        Impl("AdaGradNorm", "ours, foreach", lambda p: AdaGradNorm(p, foreach=True), "ours"),
        Impl("AdaGradNorm", "torch Adagrad foreach", lambda p: torch.optim.Adagrad(p, foreach=True), "peer"),
        Impl("AdaGradNorm", "torch Adagrad for-loop", lambda p: torch.optim.Adagrad(p, foreach=False), "peer"),
    ]
    for foreach, path in ((False, "per-tensor"), (True, "foreach")):
        rows += [
            Impl("AGVM", f"LAMB {path}", lambda p, f=foreach: LAMB(p, **LAMB_HYPER, foreach=f), "peer"),
            Impl("AGVM", f"AGVM(LAMB {path}), a step that does not measure",
                 lambda p, f=foreach: AGVM(LAMB(p, **LAMB_HYPER, foreach=f), static=True), "ours", f"LAMB {path}"),
        ]  # fmt: skip
    return rows


def _pytorch_optimizer_rows(notes: list[str]) -> list[Impl]:
    try:
        import pytorch_optimizer as po
    except ImportError:
        notes.append("pytorch-optimizer rows skipped: not installed (`pip install pytorch-optimizer`)")
        return []
    # Its closest options; its updates still differ from ours and timm's (LAMB: no bias correction
    # of v, ‖x‖ clamped at 10, eps in the ratio; LARS: only ndim > 1 adapted, the gradient
    # overwritten; Adan: its own decay form), so its rows are speed references, not checked.
    hyper = {
        "LAMB": (po.Lamb, dict(LAMB_HYPER, weight_decouple=False, max_grad_norm=0.0)),
        "LARS": (po.LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
        "Adan": (po.Adan, ADAN_HYPER),
    }
    notes.append(f"pytorch-optimizer {version('pytorch-optimizer')}: closest options, not the same update (see bench/cpu_step.py)")
    rows = []
    for family, (cls, h) in hyper.items():
        rows.append(Impl(family, "pytorch-optimizer, default", lambda p, c=cls, h=h: c(p, **h), "peer"))
        rows.append(Impl(family, "pytorch-optimizer, foreach", lambda p, c=cls, h=h: c(p, **h, foreach=True), "peer"))
    return rows


# --------------------------------------------------------------------------- accounting


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _views(value: Any) -> dict[tuple[int, int], int]:
    """The distinct tensors of an argument, keyed by (address, bytes): an op reads a tensor
    passed twice (addcmul's g, g) once."""
    return {(t.data_ptr(), t.numel() * t.element_size()): t.numel() * t.element_size() for t in _tensors(value)}


# Ops whose first argument is written without being read.
_WRITE_ONLY = {"aten::copy_", "aten::zero_", "aten::fill_", "aten::_foreach_copy_", "aten::_foreach_zero_"}


def op_bytes(func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> int:
    """Bytes one aten op reads plus writes: each distinct tensor argument read once (in-place
    ones also written; out= and write-only first arguments only written), each fresh output written."""
    if func.is_view:
        return 0
    schema = func._schema
    read: dict[tuple[int, int], int] = {}
    written: dict[tuple[int, int], int] = {}
    for index, argument in enumerate(schema.arguments):
        views = _views(args[index] if index < len(args) else kwargs.get(argument.name))
        is_written = argument.alias_info is not None and argument.alias_info.is_write
        if is_written:
            written.update(views)
        if not (is_written and (argument.is_out or (index == 0 and schema.name in _WRITE_ONLY))):
            read.update(views)
    outs = out if isinstance(out, tuple) else (out,)
    for returned, value in zip(schema.returns, outs):
        if returned.alias_info is None:
            written.update(_views(value))
    return sum(read.values()) + sum(written.values())


class Traffic(TorchDispatchMode):
    """Counts the bytes read and written by every aten op run under it, and the peak of the bytes
    held by the tensors those ops created (freed ones dropped as they go; a kernel's internal
    scratch is not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.peak = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage address -> (weak ref, bytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.bytes += op_bytes(func, args, kwargs, out)
        self._live = {key: entry for key, entry in self._live.items() if not entry[0].expired()}
        if not func.is_view:
            outs = out if isinstance(out, tuple) else (out,)
            for returned, value in zip(func._schema.returns, outs):
                if returned.alias_info is None:
                    for tensor in _tensors(value):
                        ref = StorageWeakRef(tensor.untyped_storage())
                        self._live.setdefault(ref.cdata, (ref, tensor.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self._live.values()))
        return out


@dataclass(frozen=True)
class Accounting:
    bytes_per_param: float
    peak_extra_bytes: int


def account(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> Accounting:
    """One step of `optimizer` (already stepped once, so its state exists) under :class:`Traffic`."""
    with Traffic() as traffic:
        optimizer.step()
    return Accounting(traffic.bytes / sum(p.numel() for p in params), traffic.peak)


# --------------------------------------------------------------------------- agreement and timing


def make_params(shapes: Sequence[Shape], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Tensor]:
    """Parameters of the given shapes, each with a gradient (random, fixed by `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype) * 0.1)
        param.grad = torch.randn(shape, generator=generator, dtype=dtype) * 0.01
        params.append(param)
    return params


def check_agreement(rows: Sequence[Impl], shapes: Sequence[Shape], steps: int = 3) -> dict[str, float]:
    """Ours and timm's rows of LAMB, LARS and Adan, `steps` float64 steps from the same start on
    `shapes` with new gradients each step: AssertionError unless all agree to 1e-10. Returns the
    largest difference per family."""
    worst = {}
    for family in MIN_BYTES_PER_PARAM:
        checked = [r for r in rows if r.family == family and (r.kind == "ours" or r.label.startswith("timm"))]
        if not checked:
            continue
        results = []
        for row in checked:
            params = make_params(shapes, torch.float64)
            optimizer = row.make(params)
            for step in range(steps):
                for p, g in zip(params, make_params(shapes, torch.float64, seed=1 + step)):
                    p.grad = g.grad
                optimizer.step()
            results.append((row.label, [p.detach() for p in params]))
        reference_label, reference = results[0]
        worst[family] = 0.0
        for label, values in results[1:]:
            for a, b in zip(values, reference):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{family}: {label} vs {reference_label}: {m}")
                worst[family] = max(worst[family], (a - b).abs().max().item())
    return worst


@dataclass
class Measured:
    impl: Impl
    ms: float
    accounting: Accounting


def measure_family(rows: Sequence[Impl], shapes: Sequence[Shape], repeats: int, seed: int = 0) -> list[Measured]:
    """One family's rows on one layout: each steps once (state created), is accounted on its second
    step, then all are timed interleaved in a shuffled order per round; min of `repeats` rounds."""
    params = make_params(shapes)
    optimizers = [row.make(params) for row in rows]
    accounting = []
    for optimizer in optimizers:
        optimizer.step()
        accounting.append(account(optimizer, params))
    best = [float("inf")] * len(rows)
    order = list(range(len(rows)))
    shuffle = random.Random(seed)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for index in order:
            start = time.perf_counter()
            optimizers[index].step()
            best[index] = min(best[index], time.perf_counter() - start)
    return [Measured(row, 1e3 * t, a) for row, t, a in zip(rows, best, accounting)]


def table(measured: Sequence[Measured]) -> list[str]:
    """Markdown rows: ms, × the best peer of the family (or × the row's baseline: AGVM's base
    optimizer), bytes/param (and the minimum), peak extra MiB."""
    lines = [
        "| optimizer | implementation | ms | × best peer | bytes/param (min) | peak extra MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for family in dict.fromkeys(m.impl.family for m in measured):
        rows = [m for m in measured if m.impl.family == family]
        peers = [m.ms for m in rows if m.impl.kind == "peer"]
        best_peer = min(peers) if peers else float("nan")
        minimum = MIN_BYTES_PER_PARAM.get(family)
        by_label = {m.impl.label: m.ms for m in rows}
        for m in rows:
            ratio = m.ms / (by_label[m.impl.baseline] if m.impl.baseline else best_peer)
            ratio_text = f"**{ratio:.2f}**" if m.impl.kind == "ours" else f"{ratio:.2f}"
            bpp = f"{m.accounting.bytes_per_param:.0f}" + (f" ({minimum})" if minimum else "")
            peak = m.accounting.peak_extra_bytes / 2**20
            lines.append(f"| {family} | {m.impl.label} | {m.ms:.1f} | {ratio_text} | {bpp} | {peak:.1f} |")
    return lines


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, load average {load}"
    )


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds; the min is reported (default 7)")
    parser.add_argument("--width-scale", type=float, default=1.0, help="shrink the layouts' widths (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--families", nargs="*", default=None, help="only these (LAMB LARS Adan AdaGradNorm AGVM)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    notes: list[str] = []
    rows = implementations(notes)
    if args.families:
        rows = [r for r in rows if r.family in args.families]
    worst = check_agreement(rows, bert_shapes(layers=1, hidden=8, vocab=16, positions=4) + resnet50_shapes(1, 3)[:12])
    lines = [
        f"`python -m bench.cpu_step {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; before: {machine()}",
        "",
        "Float64 agreement with timm (largest difference over 3 steps): "
        + ", ".join(f"{family} {value:.1e}" for family, value in worst.items()),
        *notes,
        f"Our default on this machine: {'foreach' if _default_is_foreach() else 'per-tensor'}.",
    ]
    for name, shapes in layouts(args.width_scale).items():
        lines += ["", f"### {name}: {len(shapes)} tensors, {sum(map(numel, shapes)) / 1e6:.1f} M parameters", ""]
        for family in dict.fromkeys(r.family for r in rows):
            family_rows = [r for r in rows if r.family == family]
            measured = measure_family(family_rows, shapes, args.repeats)
            lines += table(measured)[(0 if family == rows[0].family else 2) :]
            print("\n".join(table(measured)[2:]), flush=True, file=sys.stderr)
    lines += ["", f"After: load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    print("\n".join(lines))
    return lines


def _default_is_foreach() -> bool:
    from largebatch.optimizers._base import resolve_foreach

    return resolve_foreach([torch.zeros(1)], None, False)


if __name__ == "__main__":
    main()
