r"""Does ConAdv help the deep BatchNorm CNN at batch 2048? LAMB and SGD, with and without it.

Run ``python -m largebatch.experiments.conadv_scaling`` (``--quick``: a seconds-long smoke
version; ``--out docs`` refreshes the committed ``docs/conadv_scaling.md`` and
``docs/conadv_scaling_runs.json``, which is also the cache a re-run resumes from).

The setting is :mod:`largebatch.experiments.deep_scaling`'s, imported from it: the same data
(:func:`~largebatch.experiments.deep_scaling.make_data`), network
(:func:`~largebatch.experiments.deep_scaling.make_model`), budget (10 epochs: 150 steps at batch
2048), warmup + poly-2 schedule, shuffling, optimizers (its :data:`METHODS` "LAMB + sqrt" and
"SGD + linear") and their learning rates at batch 2048: :func:`large_batch_lr`, the best ones
deep_scaling's committed run found there (base lr tuned at 64 × 32^k, measured k = 0.25 for LAMB and 0.5 for SGD;
``docs/deep_scaling.md``). The loop is written here because each step is ConAdv's instead of a
plain backward; it is deep_scaling's loop otherwise.

**ConAdv rows** (:class:`largebatch.adversarial.ConAdv`): staleness τ = 1, one L∞ sign step
(FGSM), clean/adversarial weights ½/½, and the paper's BatchNorm handling: the model is converted
with :func:`~largebatch.adversarial.convert_to_auxiliary_batchnorm` before its optimizer is built,
so adversarial examples (and their perturbation pass) go through their own BatchNorm twins, with
their own γ, β and statistics, and the clean batch and evaluation through the model's own ("main
BN" and "adv BN" of the paper's Algorithm 1; ``docs/conadv_paper_notes.md``). The
radius ε is chosen from :data:`EPSILONS` by validation accuracy with LAMB, seed 0 (the data have
unit-scale templates with white noise of standard deviation 0.2 on top). Every row runs seeds
0, 1, 2; tables give the mean ± std of the final test accuracy.

**Cost**: every run's training time, and an interleaved timing of single steps at the large batch
(plain, ConAdv, and ConAdv's perturbation pass alone, the part that separate streams or ranks
could overlap with the previous step), median of :data:`TIMING_REPEATS`, in one process.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largebatch.adversarial import ConAdv, convert_to_auxiliary_batchnorm
from largebatch.experiments.deep_scaling import (
    METHODS, Config, Data, accuracy, add_experiment_arguments, build_optimizer, experiment_config, make_data,
    make_model,
)  # fmt: skip
from largebatch.schedules import WarmupPolynomialDecay

__all__ = ["BATCHNORM", "EPSILONS", "LABELS", "STALENESS", "Run", "chosen_epsilon", "large_batch_lr", "main", "run_experiment", "train"]

_METHODS = {m.label: m for m in METHODS}
#: The rows' methods, as deep_scaling labels them.
LABELS: tuple[str, ...] = ("LAMB + sqrt", "SGD + linear")
#: Peak lr as a function of the batch: deep_scaling's tuned base lr at 64 times (B / 64)^k, with
#: the exponent its oracle measured at batch 2048 (0.0951 for LAMB, 2.26 for SGD at 2048).
_BASE_LR_AND_EXPONENT: dict[str, tuple[float, float]] = {"LAMB + sqrt": (0.04, 0.25), "SGD + linear": (0.4, 0.5)}
#: The ε grid of the validation sweep (LAMB, seed 0).
EPSILONS: tuple[float, ...] = (0.005, 0.02, 0.05, 0.1)
STALENESS = 1
#: ConAdv's BatchNorm handling in these rows; part of a ConAdv run's cache key, so that runs of
#: the earlier shared-BatchNorm version (a cache from before this field) are not taken for them.
BATCHNORM = "auxiliary"
TIMING_REPEATS = 7


def large_batch_lr(label: str, config: Config) -> float:
    """The peak lr of ``label`` at ``config.large_batch_size`` (see :data:`_BASE_LR_AND_EXPONENT`)."""
    base, k = _BASE_LR_AND_EXPONENT[label]
    return base * (config.large_batch_size / config.base_batch_size) ** k


@dataclass(frozen=True)
class Run:
    """One training run; ``epsilon`` None is the plain (no ConAdv) run."""

    method: str
    epsilon: float | None
    seed: int

    @property
    def key(self) -> str:
        """The run's identity in the JSON cache (ConAdv runs: with :data:`BATCHNORM`)."""
        return json.dumps({**asdict(self), **({} if self.epsilon is None else {"batchnorm": BATCHNORM})}, sort_keys=True)


def train(config: Config, data: Data, run: Run) -> dict[str, Any]:
    """deep_scaling's loop at the large batch, each step ConAdv's when ``run.epsilon`` is set."""
    torch.set_num_threads(1)
    method = _METHODS[run.method]
    model = make_model(run.seed, config.channels)
    if run.epsilon is not None:  # the twins are new parameters: before the optimizer is built
        model = convert_to_auxiliary_batchnorm(model)
    lr = large_batch_lr(run.method, config)
    optimizer = build_optimizer(method, model, lr)
    n, unit, batch_size = config.train_size, config.base_batch_size, config.large_batch_size
    scheduler = WarmupPolynomialDecay(
        optimizer, warmup_steps=round(config.warmup_epochs * n / unit), total_steps=config.total_samples // unit, power=2.0
    )
    conadv = None if run.epsilon is None else ConAdv(
        model, nn.functional.cross_entropy, epsilon=run.epsilon, staleness=STALENESS
    )
    order = torch.Generator().manual_seed(1000 + run.seed)  # deep_scaling's shuffling
    epoch_order, position = torch.randperm(n, generator=order), 0
    eval_every = config.eval_interval
    curve: list[tuple[int, float]] = []
    seen = steps = 0
    train_seconds = 0.0
    clean_loss = math.nan
    while seen < config.total_samples:
        size = min(batch_size, config.total_samples - seen)
        if position + size > n:
            epoch_order, position = torch.randperm(n, generator=order), 0
        idx = epoch_order[position : position + size]
        position += size
        x, y = data.x_train[idx], data.y_train[idx]
        started = time.perf_counter()
        optimizer.zero_grad()
        if conadv is None:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        else:
            loss = conadv.backward(x, y).clean
        optimizer.step()
        for _ in range(size // unit):
            scheduler.step()
        train_seconds += time.perf_counter() - started
        clean_loss = float(loss.detach())
        steps += 1
        before, seen = seen, seen + size
        if seen // eval_every > before // eval_every or seen >= config.total_samples:
            curve.append((steps, accuracy(model, data.x_test, data.y_test)))
    return {
        "curve": curve,
        "test_accuracy": curve[-1][1],
        "val_accuracy": accuracy(model, data.x_val, data.y_val),
        "train_loss": clean_loss,
        "steps": steps,
        "lr": lr,
        "train_seconds": train_seconds,
    }


# ----------------------------------------------------------------------------- runs, in workers

@functools.cache
def _data(config: Config) -> Data:
    """The data of ``config``, built once per process (each worker builds its own)."""
    return make_data(config.train_size, config.val_size, config.test_size)


def _run_in_worker(args: tuple[Config, Run]) -> tuple[str, dict[str, Any]]:
    config, run = args
    return run.key, train(config, _data(config), run)


class Results:
    """Finished runs keyed by :attr:`Run.key`, saved to JSON after each (a re-run resumes)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        self.timing: dict[str, dict[str, float]] = {}
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            # The step timing of another BatchNorm handling (or of a cache from before the field) is not ours.
            self.runs = saved["runs"]
            self.timing = saved.get("timing", {}) if saved.get("batchnorm") == BATCHNORM else {}

    def add(self, key: str, result: dict[str, Any]) -> None:
        self.runs[key] = result
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps({"runs": self.runs, "timing": self.timing, "batchnorm": BATCHNORM}, indent=0))


def _sweep_runs() -> list[Run]:
    return [Run(LABELS[0], eps, 0) for eps in EPSILONS]


def chosen_epsilon(results: Results) -> float | None:
    """The ε of the sweep's best validation accuracy, once every sweep run is done."""
    done = {run.epsilon: results.runs.get(run.key) for run in _sweep_runs()}
    if any(result is None for result in done.values()):
        return None
    return max(done, key=lambda eps: done[eps]["val_accuracy"])  # type: ignore[index]


def _run_all(config: Config, results: Results, runs: list[Run], log: Callable[[str], None]) -> None:
    todo = [run for run in runs if run.key not in results.runs]
    if not todo:
        return
    if config.workers > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(config.workers, len(todo))) as pool:
            for key, result in pool.imap_unordered(_run_in_worker, [(config, run) for run in todo]):
                results.add(key, result)
                _log(log, key, result)
    else:
        for run in todo:
            result = train(config, _data(config), run)
            results.add(run.key, result)
            _log(log, run.key, result)


def _log(log: Callable[[str], None], key: str, result: dict[str, Any]) -> None:
    run = json.loads(key)
    log(f"    {run['method']:<14} eps={run['epsilon']!s:<5} seed={run['seed']} "
        f"test={100 * result['test_accuracy']:.1f}% val={100 * result['val_accuracy']:.1f}% "
        f"({result['train_seconds']:.0f}s training)")


def _step_timing(config: Config, label: str, epsilon: float) -> dict[str, float]:
    """Median seconds of one plain step, one ConAdv step and its perturbation pass, interleaved."""
    torch.set_num_threads(1)
    data = make_data(config.large_batch_size, 1, 1)
    x, y = data.x_train, data.y_train
    model = convert_to_auxiliary_batchnorm(make_model(0, config.channels))  # the plain step uses the main BN
    method = _METHODS[label]
    optimizer = build_optimizer(method, model, large_batch_lr(label, config))
    conadv = ConAdv(model, nn.functional.cross_entropy, epsilon=epsilon, staleness=STALENESS)

    def plain() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def adversarial() -> None:
        optimizer.zero_grad()
        conadv.backward(x, y)
        optimizer.step()

    def perturbation() -> None:
        conadv.perturb(x, y)

    steps = {"plain": plain, "conadv": adversarial, "perturbation": perturbation}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(TIMING_REPEATS + 1):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def run_experiment(config: Config, results: Results, log: Callable[[str], None] = print) -> float:
    """The sweep and the plain rows, then the ConAdv rows at the chosen ε, then the step timing."""
    plain = [Run(label, None, seed) for label in LABELS for seed in config.seeds]
    log("ε sweep (LAMB, seed 0) and the plain rows")
    _run_all(config, results, _sweep_runs() + plain, log)
    epsilon = chosen_epsilon(results)
    assert epsilon is not None
    log(f"ConAdv rows at ε = {epsilon}")
    _run_all(config, results, [Run(label, epsilon, seed) for label in LABELS for seed in config.seeds], log)
    if set(results.timing) != set(LABELS):
        results.timing = {label: _step_timing(config, label, epsilon) for label in LABELS}
        results.save()
    return epsilon


# ----------------------------------------------------------------------------- the report


def _mean_std(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def write_report(config: Config, results: Results, out: Path, seconds: float | None) -> str:
    """``conadv_scaling.md`` in ``out``: the rows, the sweep, the step timing; returns the text."""
    epsilon = chosen_epsilon(results)
    lines = [
        f"# ConAdv on the deep BatchNorm CNN at batch {config.large_batch_size}",
        "",
        "Written by `python -m largebatch.experiments.conadv_scaling` (the module docstring has the setting): "
        f"deep_scaling's data, network, budget ({config.epochs} epochs of {config.train_size} examples), schedule "
        "and large-batch lrs; ConAdv with staleness 1, one L∞ sign step, clean/adversarial ½/½, and auxiliary "
        "BatchNorm (the paper's adv BN: adversarial examples through BatchNorm twins with their own γ, β and "
        f"statistics; clean batches and evaluation through the model's own). Test accuracy (%) after the budget, mean ± std over seeds "
        f"{', '.join(map(str, config.seeds))}."
        + f" The {len(results.runs)} runs in the cache trained for {sum(r['train_seconds'] for r in results.runs.values()) / 60:.1f} "
        "minutes in all (evaluations not counted; a shared 2-core machine)"
        + ("." if seconds is None else f"; this invocation took {seconds / 60:.1f} minutes with {config.workers} worker processes."),
        "",
        "| method | peak lr | ConAdv ε (chosen in bold) | test acc. | val. acc. | training s / run (shared machine) "
        "| step time × plain (interleaved) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in LABELS:
        # The chosen ε, and any other ε whose every seed is in the cache (from an earlier grid, say).
        extra = [e for e in EPSILONS if e != epsilon and all(Run(label, e, s).key in results.runs for s in config.seeds)]
        for eps in [None] + ([] if epsilon is None else [epsilon]) + extra:
            cells = [results.runs.get(Run(label, eps, seed).key) for seed in config.seeds]
            done = [cell for cell in cells if cell is not None]
            if len(done) < len(cells):
                lines.append(f"| {label} | | {eps if eps is not None else '—'} | not run | | | |")
                continue
            train_s = statistics.mean(cell["train_seconds"] for cell in done)
            timing = results.timing.get(label)
            ratio = "1" if eps is None else "" if timing is None else f"{timing['conadv'] / timing['plain']:.2f}"
            lines.append(
                f"| {label} | {done[0]['lr']:.3g} | {'—' if eps is None else f'**{eps}**' if eps == epsilon else eps} "
                f"| {_mean_std([c['test_accuracy'] for c in done])} | {_mean_std([c['val_accuracy'] for c in done])} "
                f"| {train_s:.0f} | {ratio} |"
            )
    sweep = [(run.epsilon, results.runs.get(run.key)) for run in _sweep_runs()]
    lines += [
        "",
        "ε sweep (LAMB, seed 0, validation accuracy %; the chosen one in bold): "
        + ", ".join(
            ("**" if eps == epsilon else "") + f"{eps} → " + ("not run" if r is None else f"{100 * r['val_accuracy']:.1f}")
            + ("**" if eps == epsilon else "")
            for eps, r in sweep
        ),
    ]
    for label, t in results.timing.items():
        lines += [
            "",
            f"{label}, one step at batch {config.large_batch_size}, one process, one thread (median of "
            f"{TIMING_REPEATS}, interleaved): plain {1000 * t['plain']:.0f} ms, ConAdv {1000 * t['conadv']:.0f} ms "
            f"(× {t['conadv'] / t['plain']:.2f}), of which the perturbation pass {1000 * t['perturbation']:.0f} ms "
            f"(× {t['perturbation'] / t['plain']:.2f}); without it (the part left if the perturbation of the next "
            f"batch overlaps this step on another stream or rank) × {(t['conadv'] - t['perturbation']) / t['plain']:.2f}.",
        ]
    lines += [
        "",
        "The perturbation pass needs only the weights of the step before (staleness 1), so with the next batch at "
        "hand it is independent of the current step: the concurrency the paper exploits. This helper runs it in "
        "sequence, so the training times above are the one-device cost.",
    ]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "conadv_scaling.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: run (or resume) the experiment and write its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_experiment_arguments(parser, "conadv_scaling", "conadv_scaling.md and conadv_scaling_runs.json")
    args = parser.parse_args(argv)
    config = experiment_config(parser, args)
    results = Results(args.out / ("conadv_scaling_quick_runs.json" if args.quick else "conadv_scaling_runs.json"))
    started, cached = time.perf_counter(), len(results.runs)
    run_experiment(config, results, lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started if len(results.runs) > cached else None  # None: all from the cache
    print(write_report(config, results, args.out, seconds))


if __name__ == "__main__":
    main()
