r"""Can LAMB, LARS and Adan train in bfloat16 without fp32 master weights? fp32, plain bf16 and Kahan-compensated bf16 at batch 2048.

Run ``python -m largebatch.experiments.bf16_precision`` (``--quick``: a seconds-long smoke
version; ``--out docs`` refreshes the committed ``docs/bf16_precision.md`` and
``docs/bf16_precision_runs.json``, which is also the cache a re-run resumes from).

The setting is :mod:`largebatch.experiments.deep_scaling`'s, and so is the training loop
(:func:`~largebatch.experiments.deep_scaling.train` with its ``dtype`` and ``kahan_sum``): the
same network, budget (10 epochs: 150 steps at batch 2048), warmup + poly-2 schedule,
shuffling and optimizers (``create_optimizer``'s groups, ``foreach=True``), at the learning rates
deep_scaling's committed run found best at batch 2048 (:func:`large_batch_lr`: the base lr tuned
at 64 times :math:`32^k`, with its measured exponent k).

Three things differ from deep_scaling's :data:`~largebatch.experiments.deep_scaling.FULL`
(:data:`FULL` here), to read gaps of half a point:

* a test set of 65,536 examples instead of 4,096: the binomial standard error of one accuracy
  near 89 % is then 0.12 points instead of 0.5. ``make_data`` draws every split from one
  generator, the class templates first: the task (templates and distribution) is deep_scaling's,
  but its 30,720 training examples are other draws from it (the lrs were tuned on that
  distribution, not on those examples);
* seeds 0–7 instead of 0–2 (initialisation and shuffling; the same seed in every precision,
  so each bf16 run has an fp32 twin);
* the test accuracy only at the end of the budget (``evals_per_epoch=0``: no curve is needed here,
  and deep_scaling's 20 evaluations of the large test set would cost about as much CPU as the
  training: 25 CPU-s against 32 for a bf16 run here, 8 against 7 for fp32).

Three precisions (:data:`PRECISIONS`):

* **fp32**: parameters, optimizer states, inputs and arithmetic in float32 (deep_scaling's rows);
* **bf16**: parameters and inputs in bfloat16 and no fp32 copy anywhere; the optimizer's states are
  made like the parameters, so bf16 too. Each update :math:`p \leftarrow \mathrm{bf16}(p + u)` is
  rounded to 8 bits of mantissa: an update smaller than half a unit in the last place of
  :math:`p` (:math:`2^{-9}|p|`) is lost, which the poly-2 decay makes the rule at the end of training;
* **bf16 + Kahan**: the same with ``kahan_sum=True``: a bf16 buffer :math:`c` per parameter
  carries what the rounding dropped, :math:`y = u + c,\ t = \mathrm{bf16}(p + y),\ c = y - (t - p),\ p = t`.

LAMB's step moves each tensor by about :math:`\eta_t \lVert w \rVert`, so its lr is the relative
size of the step; with the poly-2 decay :math:`\eta_t = \eta (1 - t/T)^2` (after the warmup) the
steps fall below the half ulp in the last :math:`\sqrt{2^{-9}/\eta}` of the decay: 14 % at the best
lr (0.0951). The other rows (:data:`ROWS`) move LAMB towards the regime compensation is for:
a sixteenth of the best lr over the same 150 steps (the last 57 % of the decay below the half ulp,
but under-trained), and a quarter of it over 4 times the budget (40 epochs, 600 steps, the whole
schedule stretched: the same lr × steps as the best-lr row, the last 29 % of the decay below the half ulp).
The loss is taken in fp32 from the bf16 logits.

A second table (:data:`DIAGNOSTICS`, on the rows :func:`diagnosed_rows` names) separates the
sources of the bf16 rows' gap: the same bf16 trainings tested as float32 copies, fp32 moments for
bf16 + Kahan weights, bf16 compute with fp32 weights (``torch.autocast``: mixed precision with
master weights), and bf16 models whose BatchNorm layers stay float32 (as autocast keeps them),
with and without Kahan; and fp32 weights with 8-bit moments.

The table gives the mean ± std over seeds of the final test accuracy and, per bf16 precision, the
paired gap: the mean over seeds of the accuracy minus the same seed's fp32 accuracy, ± its standard
error :math:`s_d / \sqrt{n}` (:func:`paired_gap`). The CPU has no bf16 arithmetic units, so the
bf16 rows' times here say nothing about a GPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from largebatch.experiments import deep_scaling
from largebatch.experiments.deep_scaling import (
    Config, Data, Results, add_experiment_arguments, experiment_config, make_data,
)  # fmt: skip

__all__ = [
    "DIAGNOSED_ROWS", "DIAGNOSTICS", "diagnosed_rows", "FULL", "LABELS", "PRECISIONS", "QUICK", "ROWS", "Precision", "Row", "Run",
    "large_batch_lr", "main", "paired_gap", "run_experiment", "train", "write_report",
]  # fmt: skip

#: The rows' methods, as deep_scaling labels them.
LABELS: tuple[str, ...] = ("LAMB + sqrt", "LARS, adapt (excluded adapted, not decayed)", "Adan + sqrt")
#: deep_scaling's tuned base lr at batch 64 and the exponent its oracle measured at batch 2048
#: (docs/deep_scaling.md: oracle lr 0.0951 for LAMB, 45.3 for LARS adapt, 0.152 for Adan).
_BASE_LR_AND_EXPONENT: dict[str, tuple[float, float]] = {
    "LAMB + sqrt": (0.04, 0.25),
    "LARS, adapt (excluded adapted, not decayed)": (8.0, 0.5),
    "Adan + sqrt": (0.064, 0.25),
}


@dataclass(frozen=True)
class Precision:
    """How a run trains: its parameters' (and inputs') dtype, the optimizer's ``kahan_sum`` and
    ``state_dtype`` (None: not passed), whether its model is also tested as a float32 copy,
    whether its training forward passes run under bf16 autocast (mixed precision), and whether its
    BatchNorm layers stay float32 in a bf16 model."""

    dtype: torch.dtype
    kahan_sum: bool | None = None
    state_dtype: str | None = None
    fp32_test: bool = False
    autocast: bool = False
    fp32_norms: bool = False


#: The table's precisions, run on every row.
PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(torch.float32),
    "bf16": Precision(torch.bfloat16, kahan_sum=False),
    "bf16 + Kahan": Precision(torch.bfloat16, kahan_sum=True),
}
#: Further precisions, run on `diagnosed_rows` only: which of bf16's roundings the bf16 rows'
#: gap comes from (the trained bf16 weights tested in fp32: the same training, bit for bit, as the
#: row of that name; fp32 moments for bf16 + Kahan weights; bf16 compute with fp32 weights, i.e.
#: mixed precision with master weights, the setting bf16 + Kahan replaces, which keeps BatchNorm in
#: fp32; the bf16 models with their BatchNorm layers in fp32, as autocast keeps them), and what
#: 8-bit moments cost fp32 weights.
DIAGNOSTICS: dict[str, Precision] = {
    "fp32 weights, bf16 autocast": Precision(torch.float32, autocast=True),
    "bf16, BatchNorm in fp32": Precision(torch.bfloat16, kahan_sum=False, fp32_norms=True),
    "bf16 + Kahan, BatchNorm in fp32": Precision(torch.bfloat16, kahan_sum=True, fp32_norms=True),
    "bf16, tested in fp32": Precision(torch.bfloat16, kahan_sum=False, fp32_test=True),
    "bf16 + Kahan, tested in fp32": Precision(torch.bfloat16, kahan_sum=True, fp32_test=True),
    "bf16 + Kahan, fp32 states": Precision(torch.bfloat16, kahan_sum=True, state_dtype="float32"),
    "fp32, 8-bit states": Precision(torch.float32, state_dtype="8bit"),
}
#: deep_scaling's settings with this experiment's test set, seeds and end-only test (module docstring).
FULL = replace(deep_scaling.FULL, test_size=65_536, seeds=tuple(range(8)), evals_per_epoch=0)
#: deep_scaling's smoke version, with two seeds so the paired gaps have a standard error.
QUICK = replace(deep_scaling.QUICK, seeds=(0, 1), evals_per_epoch=0)


def large_batch_lr(label: str, config: Config) -> float:
    """The peak lr of ``label`` at ``config.large_batch_size`` (see :data:`_BASE_LR_AND_EXPONENT`)."""
    base, k = _BASE_LR_AND_EXPONENT[label]
    return base * (config.large_batch_size / config.base_batch_size) ** k


@dataclass(frozen=True)
class Run:
    """One training run: a method in a precision, for one seed, at `lr_factor` × its best lr, over
    `budget` × the config's epochs (the whole schedule stretched, warmup included)."""

    method: str
    precision: str
    seed: int
    lr_factor: float = 1.0
    budget: int = 1

    def key(self, config: Config) -> str:
        """The run's identity in the JSON cache: its fields and every setting of `config` that
        changes a run (all but the seeds, which the run has, and the workers), so a cache written
        with other data, sizes or budgets is never read as this config's."""
        setting = asdict(config)
        del setting["seeds"], setting["workers"]
        return json.dumps({**asdict(self), "config": setting}, sort_keys=True)


@dataclass(frozen=True)
class Row:
    """A row of the table: a method at `lr_factor` × its best lr over `budget` × the epochs."""

    method: str
    lr_factor: float = 1.0
    budget: int = 1

    @property
    def name(self) -> str:
        """The row's label in the tables: the method, then its lr factor and budget if not 1."""
        parts = [self.method]
        if self.lr_factor != 1.0:
            parts.append(f"lr × 1/{round(1 / self.lr_factor)}")
        if self.budget != 1:
            parts.append(f"{self.budget}× steps")
        return ", ".join(parts)

    def run(self, precision: str, seed: int) -> Run:
        """This row's run in `precision` for `seed`."""
        return Run(self.method, precision, seed, self.lr_factor, self.budget)


#: Every row of the table, in the order they are run: LAMB's first (the issue's bar), the long
#: row early so that the last runs to finish are short ones.
ROWS: tuple[Row, ...] = (
    Row("LAMB + sqrt"),
    Row("LAMB + sqrt", 1 / 4, 4),
    Row("LAMB + sqrt", 1 / 16),
    Row("LARS, adapt (excluded adapted, not decayed)"),
    Row("Adan + sqrt"),
)


#: The rows the `DIAGNOSTICS` run on: LAMB at its best lr, the issue's bar; the BatchNorm-in-fp32
#: pair also on LAMB's two rows of smaller steps (chosen before they ran: the best-lr row had shown
#: that bf16 BatchNorm, not the update's rounding, made its gap, and these rows' steps are the ones
#: that fall below bf16's half ulp).
DIAGNOSED_ROWS: tuple[Row, ...] = (ROWS[0],)
_SMALL_STEP_ROWS: tuple[Row, ...] = (ROWS[0], ROWS[1], ROWS[2])
_ROWS_OF: dict[str, tuple[Row, ...]] = {
    "bf16, BatchNorm in fp32": _SMALL_STEP_ROWS,
    "bf16 + Kahan, BatchNorm in fp32": _SMALL_STEP_ROWS,
}


def diagnosed_rows(precision: str) -> tuple[Row, ...]:
    """The rows the diagnostic `precision` runs on (`DIAGNOSED_ROWS` unless said otherwise)."""
    return _ROWS_OF.get(precision, DIAGNOSED_ROWS)


def train(config: Config, data: Data, run: Run) -> dict[str, Any]:
    """deep_scaling's run of ``run.method`` at the large batch, in ``run.precision``."""
    precision = {**PRECISIONS, **DIAGNOSTICS}[run.precision]
    lr = large_batch_lr(run.method, config) * run.lr_factor
    if run.budget != 1:
        config = replace(config, epochs=config.epochs * run.budget, warmup_epochs=config.warmup_epochs * run.budget)
    plain = deep_scaling.Run(run.method, config.large_batch_size, lr, run.seed)
    return deep_scaling.train(config, data, plain, dtype=precision.dtype, kahan_sum=precision.kahan_sum,
                              state_dtype=precision.state_dtype, fp32_test=precision.fp32_test,
                              autocast=precision.autocast, fp32_norms=precision.fp32_norms)  # fmt: skip


_DATA: dict[Config, Data] = {}  # per process: each worker builds the data once


def _run_in_worker(args: tuple[Config, Run]) -> tuple[str, dict[str, Any]]:
    config, run = args
    if config not in _DATA:
        _DATA[config] = make_data(config.train_size, config.val_size, config.test_size)
    return run.key(config), train(config, _DATA[config], run)


def _runs(config: Config) -> list[Run]:
    """Every run, row by row, a seed's precisions together (so a run cut short has pairs); the
    diagnostics after."""
    runs = [row.run(precision, seed) for row in ROWS for seed in config.seeds for precision in PRECISIONS]
    diagnosed = [(row, precision) for row in ROWS for precision in DIAGNOSTICS if row in diagnosed_rows(precision)]
    return runs + [row.run(precision, seed) for row, precision in diagnosed for seed in config.seeds]


def run_experiment(config: Config, results: Results, log: Callable[[str], None] = print) -> None:
    """Every run not in ``results`` yet, ``config.workers`` at a time (each saved as it finishes)."""
    todo = [(config, run) for run in _runs(config) if run.key(config) not in results.runs]
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
    log(f"    {run['method'][:12]:<12} ×{run['lr_factor']:<6g} {run['budget']}× {run['precision']:<12} "
        f"seed={run['seed']} test={100 * result['test_accuracy']:.2f}% ({result['cpu_seconds']:.0f} CPU-s)")


def _row_results(config: Config, results: Results, row: Row, precision: str) -> list[dict[str, Any]] | None:
    """The runs of every seed of one cell, or None while one is missing."""
    done = [results.runs.get(row.run(precision, seed).key(config)) for seed in config.seeds]
    return None if any(r is None for r in done) else done  # type: ignore[return-value]


def _accuracies(
    config: Config, results: Results, row: Row, precision: str, field: str = "test_accuracy"
) -> list[float] | None:
    done = _row_results(config, results, row, precision)
    return None if done is None else [100 * r[field] for r in done]


def paired_gap(values: Sequence[float], reference: Sequence[float]) -> tuple[float, float | None]:
    r"""The mean of the paired differences :math:`d_i = x_i - r_i` and its standard error
    :math:`s_d/\sqrt{n}` (:math:`s_d` the sample std of the :math:`d_i`; None for one pair).

    Raises:
        ValueError: the two have different lengths, or none.
    """
    if len(values) != len(reference) or not values:
        raise ValueError(f"values and reference must be pairs, got {len(values)} and {len(reference)} values")
    differences = [x - r for x, r in zip(values, reference)]
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None
    return statistics.mean(differences), error


def _mean_std(values: list[float] | None) -> str:
    if values is None:
        return "not run"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def _gap(values: list[float] | None, reference: list[float] | None) -> str:
    if values is None or reference is None:
        return "—"
    mean, error = paired_gap(values, reference)
    return f"{mean:+.2f}" if error is None else f"{mean:+.2f} ± {error:.2f}"


def write_report(config: Config, results: Results, out: Path, seconds: float | None) -> str:
    """The results table as Markdown, written to ``out/bf16_precision.md`` (and returned)."""
    seeds = ", ".join(map(str, config.seeds))
    steps = config.total_samples // config.large_batch_size
    lines = [
        "# bf16 without fp32 master weights: plain rounding vs Kahan-compensated updates",
        "",
        "Written by `python -m largebatch.experiments.bf16_precision` (the module docstring has the setting).",
        f"deep_scaling's network and budget at batch {config.large_batch_size} ({config.epochs} epochs of "
        f"{config.train_size} examples, {steps} steps; rows with k× steps stretch the whole schedule), each method at "
        f"its best lr there or the fraction of it the row says. Test accuracy (%) on {config.test_size} test examples "
        f"after the budget, mean ± std over seeds {seeds}. The gaps are paired: the mean over seeds of the row's "
        "accuracy minus the same seed's accuracy in the other precision, ± its standard error (std of the "
        "differences / √n).",
    ]
    if seconds is not None:
        lines.append(f"This run took {seconds / 60:.1f} minutes wall time with {config.workers} worker processes.")
    lines += [
        "",
        "| method | lr | fp32 | bf16 | bf16 − fp32 | bf16 + Kahan | Kahan − fp32 | Kahan − bf16 | CPU-s per run (fp32 / bf16 / Kahan) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        accs = {precision: _accuracies(config, results, row, precision) for precision in PRECISIONS}
        cpu = []
        for precision in PRECISIONS:
            done = _row_results(config, results, row, precision)
            cpu.append("—" if done is None else f"{statistics.mean(r['cpu_seconds'] for r in done):.0f}")
        lines.append(
            f"| {row.name} | {large_batch_lr(row.method, config) * row.lr_factor:.3g} | {_mean_std(accs['fp32'])} | "
            f"{_mean_std(accs['bf16'])} | {_gap(accs['bf16'], accs['fp32'])} | {_mean_std(accs['bf16 + Kahan'])} | "
            f"{_gap(accs['bf16 + Kahan'], accs['fp32'])} | {_gap(accs['bf16 + Kahan'], accs['bf16'])} | {' / '.join(cpu)} |"
        )
    lines += _diagnostics_table(config, results)
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
        for index, seed in enumerate(config.seeds):
            base = cells["fp32"][index]  # type: ignore[index]
            deltas = []
            for precision in ("bf16", "bf16 + Kahan"):
                run = cells[precision][index]  # type: ignore[index]
                deltas += [f"{100 * (run['test_accuracy'] - base['test_accuracy']):+.2f}",
                           f"{run['train_loss'] - base['train_loss']:+.3f}"]  # fmt: skip
            lines.append(f"| {row.name} | {seed} | " + " | ".join(deltas) + " |")
    text = "\n".join(lines) + "\n"
    (out / "bf16_precision.md").write_text(text)
    return text


def _diagnostics_table(config: Config, results: Results) -> list[str]:
    """The `DIAGNOSTICS` of each row they run on (`diagnosed_rows`): accuracy, and its paired gap
    to fp32 and, for those tested in fp32, to the same training tested in bf16."""
    lines = [
        "",
        "Where the gap comes from, and 8-bit moments (`DIAGNOSTICS`): the same seeds; \"tested in fp32\" is the same "
        "training as the row of that name (its bf16 test accuracy is checked to be that row's, bit for bit), "
        "its trained weights and BatchNorm statistics then tested as a float32 copy on float32 inputs.",
        "",
        "| method | precision | test accuracy | − fp32 | − the same training tested in bf16 |",
        "|---|---|---:|---:|---:|",
    ]
    for row in ROWS:
        fp32 = _accuracies(config, results, row, "fp32")
        for name, precision in DIAGNOSTICS.items():
            if row not in diagnosed_rows(name):
                continue
            if precision.fp32_test:
                accs = _accuracies(config, results, row, name, "test_accuracy_fp32")
                twin = name.removesuffix(", tested in fp32")
                same, replicated = _accuracies(config, results, row, twin), _accuracies(config, results, row, name)
                if same is not None and replicated is not None and same != replicated:
                    raise RuntimeError(f"{row.name}, {name}: the training did not replicate {twin!r}'s")
                versus = _gap(accs, same)
            else:
                accs, versus = _accuracies(config, results, row, name), "—"
            lines.append(f"| {row.name} | {name} | {_mean_std(accs)} | {_gap(accs, fp32)} | {versus} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: run (or resume) the experiment and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_experiment_arguments(parser, "bf16_precision", "bf16_precision.md and _runs.json")
    args = parser.parse_args(argv)
    config = replace(QUICK if args.quick else FULL, workers=experiment_config(parser, args).workers)
    results = Results(args.out / ("bf16_precision_quick_runs.json" if args.quick else "bf16_precision_runs.json"))
    started, cached = time.perf_counter(), len(results.runs)
    run_experiment(config, results, lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started if len(results.runs) > cached else None
    print(write_report(config, results, args.out, seconds))


if __name__ == "__main__":
    main()
