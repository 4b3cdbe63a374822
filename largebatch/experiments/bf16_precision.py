r"""Can LAMB, LARS and Adan train in bfloat16 without fp32 master weights? fp32, plain bf16 and Kahan-compensated bf16 at batch 2048.

Run ``python -m largebatch.experiments.bf16_precision`` (``--quick``: a seconds-long smoke
version; ``--out docs`` refreshes the committed ``docs/bf16_precision.md`` and
``docs/bf16_precision_runs.json``, which is also the cache a re-run resumes from).

The setting is :mod:`largebatch.experiments.deep_scaling`'s, and so is the training loop
(:func:`~largebatch.experiments.deep_scaling.train` with its ``dtype`` and ``kahan_sum``): the
same data, network, budget (10 epochs: 150 steps at batch 2048), warmup + poly-2 schedule,
shuffling and optimizers (``create_optimizer``'s groups, ``foreach=True``), at the learning rates
deep_scaling's committed run found best at batch 2048 (:func:`large_batch_lr`: the base lr tuned
at 64 times :math:`32^k`, with its measured exponent k).

Three precisions (:data:`PRECISIONS`):

* **fp32**: parameters, optimizer states, inputs and arithmetic in float32 (deep_scaling's rows);
* **bf16**: parameters and inputs in bfloat16 and no fp32 copy anywhere; the optimizer's states are
  made like the parameters, so bf16 too. Each update :math:`p \leftarrow \mathrm{bf16}(p + u)` is
  rounded to 8 bits of mantissa: an update smaller than half a unit in the last place of
  :math:`p` (:math:`2^{-9}|p|`) is lost, which the poly-2 decay makes the rule at the end of training;
* **bf16 + Kahan**: the same with ``kahan_sum=True``: a bf16 buffer :math:`c` per parameter
  carries what the rounding dropped, :math:`y = u + c,\ t = \mathrm{bf16}(p + y),\ c = y - (t - p),\ p = t`.

LAMB also runs at a sixteenth of its best lr (:data:`LOW_LR_ROWS`), a BERT-sized relative step
whose decay ends far below bf16's half ulp. The loss is taken in fp32 from the bf16 logits.
Every row runs seeds 0, 1, 2; the table gives the
mean ± std of the final test accuracy and each bf16 row's gap to fp32. The CPU has no bf16
arithmetic units, so the bf16 rows' times here say nothing about a GPU's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from largebatch.experiments import deep_scaling
from largebatch.experiments.deep_scaling import (
    Config, Data, Results, add_experiment_arguments, experiment_config, make_data,
)  # fmt: skip

__all__ = ["LABELS", "LOW_LR_ROWS", "PRECISIONS", "ROWS", "Run", "large_batch_lr", "main", "run_experiment", "train"]

#: The rows' methods, as deep_scaling labels them.
LABELS: tuple[str, ...] = ("LAMB + sqrt", "LARS, adapt (excluded adapted, not decayed)", "Adan + sqrt")
#: deep_scaling's tuned base lr at batch 64 and the exponent its oracle measured at batch 2048
#: (docs/deep_scaling.md: oracle lr 0.0951 for LAMB, 45.3 for LARS adapt, 0.152 for Adan).
_BASE_LR_AND_EXPONENT: dict[str, tuple[float, float]] = {
    "LAMB + sqrt": (0.04, 0.25),
    "LARS, adapt (excluded adapted, not decayed)": (8.0, 0.5),
    "Adan + sqrt": (0.064, 0.25),
}
#: name -> (parameter dtype, kahan_sum passed to the optimizer).
PRECISIONS: dict[str, tuple[torch.dtype, bool | None]] = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, False),
    "bf16 + Kahan": (torch.bfloat16, True),
}


def large_batch_lr(label: str, config: Config) -> float:
    """The peak lr of ``label`` at ``config.large_batch_size`` (see :data:`_BASE_LR_AND_EXPONENT`)."""
    base, k = _BASE_LR_AND_EXPONENT[label]
    return base * (config.large_batch_size / config.base_batch_size) ** k


#: Rows at a fraction of the best lr: LAMB's step moves each tensor by about lr·‖w‖, so its lr is
#: the relative size of the step, and at 0.0951 most steps are far above bf16's half ulp
#: (2⁻⁹ ≈ 0.002 of the weight). A sixteenth (0.0059) is the range of BERT's LAMB lrs, where the
#: end of the decay is well below it: the regime compensation is for.
LOW_LR_ROWS: tuple[tuple[str, float], ...] = (("LAMB + sqrt", 1 / 16),)


@dataclass(frozen=True)
class Run:
    """One training run: a method in a precision, for one seed, at `lr_factor` × its best lr."""

    method: str
    precision: str
    seed: int
    lr_factor: float = 1.0

    @property
    def key(self) -> str:
        """The run's identity in the JSON cache (`lr_factor` only when it is not 1)."""
        fields = asdict(self)
        if self.lr_factor == 1.0:
            del fields["lr_factor"]
        return json.dumps(fields, sort_keys=True)


def train(config: Config, data: Data, run: Run) -> dict[str, Any]:
    """deep_scaling's run of ``run.method`` at the large batch, in ``run.precision``."""
    dtype, kahan_sum = PRECISIONS[run.precision]
    lr = large_batch_lr(run.method, config) * run.lr_factor
    plain = deep_scaling.Run(run.method, config.large_batch_size, lr, run.seed)
    return deep_scaling.train(config, data, plain, dtype=dtype, kahan_sum=kahan_sum)


_DATA: dict[Config, Data] = {}  # per process: each worker builds the data once


def _run_in_worker(args: tuple[Config, Run]) -> tuple[str, dict[str, Any]]:
    config, run = args
    if config not in _DATA:
        _DATA[config] = make_data(config.train_size, config.val_size, config.test_size)
    return run.key, train(config, _DATA[config], run)


#: Every row of the table: (method, lr factor).
ROWS: tuple[tuple[str, float], ...] = (*((label, 1.0) for label in LABELS), *LOW_LR_ROWS)


def _runs(config: Config) -> list[Run]:
    return [Run(label, precision, seed, factor) for label, factor in ROWS for precision in PRECISIONS for seed in config.seeds]


def run_experiment(config: Config, results: Results, log: Callable[[str], None] = print) -> None:
    """Every run not in ``results`` yet, ``config.workers`` at a time (each saved as it finishes)."""
    todo = [(config, run) for run in _runs(config) if run.key not in results.runs]
    if not todo:
        return
    if config.workers > 1:
        with multiprocessing.get_context("spawn").Pool(min(config.workers, len(todo))) as pool:
            finished = pool.imap_unordered(_run_in_worker, todo)
            for key, result in finished:
                results.add(key, result)
                _log(log, key, result)
    else:
        for args in todo:
            key, result = _run_in_worker(args)
            results.add(key, result)
            _log(log, key, result)


def _log(log: Callable[[str], None], key: str, result: dict[str, Any]) -> None:
    run = json.loads(key)
    log(f"    {run['method'][:12]:<12} ×{run.get('lr_factor', 1.0):<6g} {run['precision']:<12} seed={run['seed']} "
        f"test={100 * result['test_accuracy']:.1f}% ({result['cpu_seconds']:.0f} CPU-s)")


def _row_results(config: Config, results: Results, row: tuple[str, float], precision: str) -> list[dict[str, Any]] | None:
    """The runs of every seed of one cell, or None while one is missing."""
    done = [results.runs.get(Run(row[0], precision, seed, row[1]).key) for seed in config.seeds]
    return None if any(r is None for r in done) else done  # type: ignore[return-value]


def _accuracies(config: Config, results: Results, row: tuple[str, float], precision: str) -> list[float] | None:
    done = _row_results(config, results, row, precision)
    return None if done is None else [100 * r["test_accuracy"] for r in done]


def _mean_std(values: list[float] | None) -> str:
    if values is None:
        return "not run"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def _gap(values: list[float] | None, reference: list[float] | None) -> str:
    if values is None or reference is None:
        return "—"
    return f"{statistics.mean(values) - statistics.mean(reference):+.1f}"


def write_report(config: Config, results: Results, out: Path, seconds: float | None) -> str:
    """The results table as Markdown, written to ``out/bf16_precision.md`` (and returned)."""
    seeds = ", ".join(map(str, config.seeds))
    lines = [
        "# bf16 without fp32 master weights: plain rounding vs Kahan-compensated updates",
        "",
        "Written by `python -m largebatch.experiments.bf16_precision` (the module docstring has the setting).",
        f"deep_scaling's network and budget at batch {config.large_batch_size} ({config.epochs} epochs of "
        f"{config.train_size} examples), each method at its best lr there (and LAMB also at a sixteenth of it: "
        f"`LOW_LR_ROWS`). Test accuracy (%) after the budget, "
        f"mean ± std over seeds {seeds}; the gaps are to the fp32 row's mean.",
    ]
    if seconds is not None:
        lines.append(f"This run took {seconds / 60:.1f} minutes wall time with {config.workers} worker processes.")
    lines += [
        "",
        "| method | lr | fp32 | bf16 | bf16 gap | bf16 + Kahan | Kahan gap | CPU-s per run (fp32 / bf16 / Kahan) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        label, factor = row
        accs = {precision: _accuracies(config, results, row, precision) for precision in PRECISIONS}
        cpu = []
        for precision in PRECISIONS:
            done = _row_results(config, results, row, precision)
            cpu.append("—" if done is None else f"{statistics.mean(r['cpu_seconds'] for r in done):.0f}")
        name = label if factor == 1.0 else f"{label}, lr × 1/{round(1 / factor)}"
        lines.append(
            f"| {name} | {large_batch_lr(label, config) * factor:.3g} | {_mean_std(accs['fp32'])} | {_mean_std(accs['bf16'])} | "
            f"{_gap(accs['bf16'], accs['fp32'])} | {_mean_std(accs['bf16 + Kahan'])} | "
            f"{_gap(accs['bf16 + Kahan'], accs['fp32'])} | {' / '.join(cpu)} |"
        )
    lines += [
        "",
        "Per seed, paired (the same initialisation and shuffling in every precision): each bf16 row's test accuracy "
        "and final training loss minus fp32's.",
        "",
        "| method | seed | bf16: Δ acc. | bf16: Δ loss | bf16 + Kahan: Δ acc. | bf16 + Kahan: Δ loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        cells = {precision: _row_results(config, results, row, precision) for precision in PRECISIONS}
        if any(done is None for done in cells.values()):
            continue
        name = row[0] if row[1] == 1.0 else f"{row[0]}, lr × 1/{round(1 / row[1])}"
        for index, seed in enumerate(config.seeds):
            base = cells["fp32"][index]  # type: ignore[index]
            deltas = []
            for precision in ("bf16", "bf16 + Kahan"):
                run = cells[precision][index]  # type: ignore[index]
                deltas += [f"{100 * (run['test_accuracy'] - base['test_accuracy']):+.1f}",
                           f"{run['train_loss'] - base['train_loss']:+.3f}"]  # fmt: skip
            lines.append(f"| {name} | {seed} | " + " | ".join(deltas) + " |")
    text = "\n".join(lines) + "\n"
    (out / "bf16_precision.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: run (or resume) the experiment and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_experiment_arguments(parser, "bf16_precision", "bf16_precision.md and _runs.json")
    args = parser.parse_args(argv)
    config = experiment_config(parser, args)
    results = Results(args.out / ("bf16_precision_quick_runs.json" if args.quick else "bf16_precision_runs.json"))
    started, cached = time.perf_counter(), len(results.runs)
    run_experiment(config, results, lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started if len(results.runs) > cached else None
    print(write_report(config, results, args.out, seconds))


if __name__ == "__main__":
    main()
