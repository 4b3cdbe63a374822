r"""How far does each optimizer carry a fixed epoch budget from batch 32 to batch 8192?

Run ``python -m largebatch.experiments.batch_scaling``: 452 CPU-seconds (3.8 minutes of 2 idle
cores; 4.5 minutes with 4 workers on a shared machine), nothing downloaded. It writes ``batch_scaling.md`` (tables) and ``batch_scaling.png`` (plot) into ``--out``
(default ``batch_scaling_out/``; ``--out docs`` refreshes the committed copies); ``--no-plot``
skips the plot (and matplotlib), ``--quick`` runs a seconds-long version, ``--tune`` the base-lr grid.

The task (generated on the fly from a fixed seed, the same for every run):

* inputs :math:`x \sim \mathcal N(0, I_{32})`; 100,000 training, 10,000 validation and 10,000
  test examples;
* a fixed random teacher :math:`t(x) = W_2 \tanh(W_1 x)` with 32 hidden units and Gaussian
  weights of variance 1/fan-in; the class is :math:`\arg\max_c t_c(x)`, one of 10;
* label noise: 10 % of the *training* labels are replaced by a uniformly drawn class, so the
  training set is not separable; validation and test labels are the teacher's, so accuracy
  measures how well the student recovered the teacher's decision boundaries.

The student is an MLP 32 → 128 → 128 → 10 with ReLU and no normalisation, trained with
cross-entropy for the same number of epochs (:data:`FULL`: 2) at every batch size, so a batch of
8192 gets 256× fewer steps than a batch of 32. A run's seed sets the student's initialisation and
the shuffling. The test accuracy is evaluated at geometrically spaced steps (ratio
:data:`EVAL_STEP_RATIO`) and at the end; *steps to target* is the first evaluated step with test
accuracy ≥ the target. What it adds to ``deep_scaling``: batch sizes past 2048 (to 256× the
base), seven of them, so the shape of steps-to-target against the batch size; and a network
without normalisation layers.

The methods. Every optimizer comes from ``create_optimizer`` (biases out of weight decay; LARS
and LAMB with their default exclusion recipes: LARS adapts biases, LAMB does not). Learning
rates are per optimizer, tuned once at the base batch of 32 (below); the peak lr at batch
:math:`B` is then either the base one, unchanged, or ``scale_lr(base_lr, B, 32,
suggest_scaling_rule(optimizer))``: linear for SGD and LARS, square root for AdamW, LAMB and Adan.
Every run follows ``WarmupPolynomialDecay``: a linear warmup over :data:`WARMUP_EPOCHS` epochs
from the base lr to the peak (Goyal et al. 2017's gradual warmup; constant when the peak is the
base lr), then poly-2 decay to 0 at the end of the budget. At batch 32 the scaled and unscaled
methods are the same run (run once).

The base-lr grid (``--tune``: final accuracy on the *validation* split at batch 32, seed 0; the
best one is the base lr, :data:`BASE_LRS`):

* SGD: 3e-3 → 79.75, 0.01 → 80.84, **0.03 → 81.46**, 0.1 → 80.18, 0.3 → 78.61
* AdamW: 3e-4 → 79.36, 1e-3 → 80.94, **3e-3 → 81.71**, 1e-2 → 81.32
* LARS: 0.1 → 76.26, 0.3 → 79.63, 1 → 80.83, **3 → 81.60**, 10 → 12.99
* LAMB: 1e-3 → 80.19, 3e-3 → 81.03, **1e-2 → 81.68**, 3e-2 → 78.12
* Adan: 1e-3 → 79.86, 3e-3 → 81.35, **1e-2 → 82.11**, 3e-2 → 81.38

(2026-12-01; 263 CPU-seconds for the 22 runs.) Every best lr is inside its grid.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largebatch import LAMB, LARS, Adan
from largebatch.factory import create_optimizer
from largebatch.schedules import WarmupPolynomialDecay, scale_lr, suggest_scaling_rule

__all__ = [
    "BASE_LRS",
    "FULL",
    "METHODS",
    "QUICK",
    "Cell",
    "ExperimentConfig",
    "Method",
    "RunResult",
    "Task",
    "Training",
    "main",
    "make_task",
    "run_experiment",
    "train",
]

# ----------------------------------------------------------------------------- the task

INPUT_DIM = 32
TEACHER_WIDTH = 32
STUDENT_WIDTH = 128
NUM_CLASSES = 10
LABEL_NOISE = 0.1  # fraction of training labels replaced by a uniformly drawn class
TASK_SEED = 0  # the teacher and the data; the same for every run, whatever its seed


@dataclass(frozen=True)
class Task:
    """The teacher-labelled data set: noisy training labels, clean validation and test labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_task(train_size: int, test_size: int, seed: int = TASK_SEED, *, val_size: int = 0) -> Task:
    r"""Gaussian inputs labelled :math:`\arg\max W_2 \tanh(W_1 x)` by a fixed random teacher.

    A fraction :data:`LABEL_NOISE` of the training labels is replaced by a uniformly drawn
    class (which may be the true one); the validation and test labels are the teacher's own.
    The validation examples are drawn after all the rest, so the training and test splits do
    not depend on ``val_size`` (0: no validation split).

    Raises:
        ValueError: ``train_size`` or ``test_size`` is not positive, or ``val_size`` is negative.
    """
    for name, size in (("train_size", train_size), ("test_size", test_size)):
        if size <= 0:
            raise ValueError(f"{name} must be > 0, got {size}")
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.randn(INPUT_DIM, TEACHER_WIDTH, generator=generator) / math.sqrt(INPUT_DIM)
    w2 = torch.randn(TEACHER_WIDTH, NUM_CLASSES, generator=generator) / math.sqrt(TEACHER_WIDTH)

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ w1) @ w2).argmax(dim=1)

    x = torch.randn(train_size + test_size, INPUT_DIM, generator=generator)
    labels = teacher(x)
    noisy = labels[:train_size].clone()
    flipped = torch.rand(train_size, generator=generator) < LABEL_NOISE
    noisy[flipped] = torch.randint(0, NUM_CLASSES, (int(flipped.sum()),), generator=generator)
    x_val = torch.randn(val_size, INPUT_DIM, generator=generator)
    return Task(x[:train_size], noisy, x_val, teacher(x_val), x[train_size:], labels[train_size:])


def make_student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(INPUT_DIM, STUDENT_WIDTH),
        nn.ReLU(),
        nn.Linear(STUDENT_WIDTH, STUDENT_WIDTH),
        nn.ReLU(),
        nn.Linear(STUDENT_WIDTH, NUM_CLASSES),
    )


# ----------------------------------------------------------------------------- the methods

BASE_BATCH_SIZE = 32
WARMUP_EPOCHS = 0.5
DECAY_POWER = 2.0  # poly-2 decay to 0 after the warmup, as in the deep experiment
L2_WEIGHT_DECAY = 1e-4  # SGD and LARS: added to the gradient (Goyal et al. 2017's value)
DECOUPLED_WEIGHT_DECAY = 0.01  # AdamW, LAMB, Adan: lr·λ·w, torch's AdamW default

# Found with --tune on the validation split (see the module docstring).
BASE_LRS: dict[str, float] = {"SGD": 0.03, "AdamW": 3e-3, "LARS": 3.0, "LAMB": 1e-2, "Adan": 1e-2}
# ~3× apart; one point above the old constant-lr grids (a decay lets a larger peak lr work), none
# below their best.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "SGD": (3e-3, 0.01, 0.03, 0.1, 0.3),
    "AdamW": (3e-4, 1e-3, 3e-3, 1e-2),
    "LARS": (0.1, 0.3, 1.0, 3.0, 10.0),
    "LAMB": (1e-3, 3e-3, 1e-2, 3e-2),
    "Adan": (1e-3, 3e-3, 1e-2, 3e-2),
}
# The classes give the rule (suggest_scaling_rule); create_optimizer builds them by name.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "SGD": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": L2_WEIGHT_DECAY}),
    "AdamW": (torch.optim.AdamW, {"weight_decay": DECOUPLED_WEIGHT_DECAY}),
    "LARS": (LARS, {"momentum": 0.9, "weight_decay": L2_WEIGHT_DECAY, "trust_coefficient": 1e-3}),
    "LAMB": (LAMB, {"weight_decay": DECOUPLED_WEIGHT_DECAY}),
    "Adan": (Adan, {"weight_decay": DECOUPLED_WEIGHT_DECAY}),
}


@dataclass(frozen=True)
class Method:
    """An optimizer, and whether its lr follows the batch size (rule + warmup) or stays the base lr."""

    optimizer: str
    scaled: bool

    @property
    def label(self) -> str:
        """The method's row name in the table and plot."""
        if not self.scaled or self.optimizer not in ("SGD", "AdamW"):
            return self.optimizer
        return f"{self.optimizer} + {self.rule} rule + warmup"

    @property
    def rule(self) -> str:
        """The batch-size rule of its optimizer ("linear" or "sqrt")."""
        return suggest_scaling_rule(OPTIMIZERS[self.optimizer][0])

    def peak_lr(self, batch_size: int, base_lr: float) -> float:
        """The lr after warmup at `batch_size`: the base lr, or scaled by the rule when `scaled`."""
        if not self.scaled:
            return base_lr
        return scale_lr(base_lr, batch_size, BASE_BATCH_SIZE, self.rule)


METHODS: tuple[Method, ...] = (
    Method("SGD", scaled=False),
    Method("SGD", scaled=True),
    Method("LARS", scaled=True),
    Method("AdamW", scaled=False),
    Method("AdamW", scaled=True),
    Method("LAMB", scaled=True),
    Method("Adan", scaled=True),
)


# ----------------------------------------------------------------------------- the experiment

# Test accuracy is evaluated at the steps ⌈r^k⌉ (and the last): steps to target is known to
# within a factor r, evenly on the log scale of the plot, at a cost that grows only with log(steps).
EVAL_STEP_RATIO = 1.15


@dataclass(frozen=True)
class ExperimentConfig:
    train_size: int
    val_size: int
    test_size: int
    batch_sizes: tuple[int, ...]
    epochs: int
    seeds: int
    target_accuracy: float

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.seeds <= 0:
            raise ValueError(f"epochs and seeds must be > 0, got {self.epochs} and {self.seeds}")
        if not self.batch_sizes or min(self.batch_sizes) <= 0 or max(self.batch_sizes) > self.train_size:
            raise ValueError(f"batch_sizes must be in [1, train_size={self.train_size}], got {self.batch_sizes}")
        if not 0.0 < self.target_accuracy < 1.0:
            raise ValueError(f"target_accuracy must be in (0, 1), got {self.target_accuracy}")


FULL = ExperimentConfig(
    train_size=100_000,
    val_size=10_000,
    test_size=10_000,
    batch_sizes=(32, 128, 512, 1024, 2048, 4096, 8192),
    epochs=2,
    seeds=3,
    target_accuracy=0.75,
)
# Seconds, for the tests: every method still runs, on a small task and two batch sizes.
QUICK = ExperimentConfig(
    train_size=4096, val_size=1024, test_size=1024, batch_sizes=(32, 256), epochs=1, seeds=2, target_accuracy=0.4
)


@dataclass(frozen=True)
class Training:
    """One training run. Methods that train identically at a batch size share it (it is hashable)."""

    optimizer: str
    batch_size: int
    lr: float
    warmup_start_factor: float  # the warmup starts at this fraction of ``lr``
    seed: int


@dataclass
class RunResult:
    training: Training
    eval_steps: list[int]
    accuracies: list[float]  # test accuracy at eval_steps
    diverged: bool
    seconds: float
    val_accuracy: float = math.nan  # at the end of the run; what --tune scores

    @property
    def final_accuracy(self) -> float:
        """Test accuracy at the end of the run."""
        return self.accuracies[-1]

    def steps_to(self, target: float) -> int | None:
        """The first evaluated step with test accuracy ≥ ``target``; None if never."""
        return next((step for step, acc in zip(self.eval_steps, self.accuracies) if acc >= target), None)


def build_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``create_optimizer``'s groups: biases out of weight decay; for LARS and LAMB, each one's
    default exclusion recipe (LARS: biases adapted, not decayed; LAMB: biases not adapted)."""
    cls, options = OPTIMIZERS[name]
    # foreach: one C++ loop over the tensors; torch's CPU default, a Python loop, would cost more
    # than the forward and backward passes at batch 32.
    return create_optimizer(model, cls.__name__.lower(), lr, foreach=True, **options)


def training_for(method: Method, batch_size: int, seed: int, base_lrs: dict[str, float]) -> Training:
    """The run of ``method`` at ``batch_size``: its peak lr, reached by a warmup from the base lr."""
    base_lr = base_lrs[method.optimizer]
    lr = method.peak_lr(batch_size, base_lr)
    return Training(method.optimizer, batch_size, lr, base_lr / lr, seed)


def eval_schedule(total_steps: int) -> list[int]:
    """The steps ⌈r^k⌉ < total_steps, then total_steps, in order."""
    steps = {total_steps}
    k = 0
    while (step := math.ceil(EVAL_STEP_RATIO**k)) < total_steps:
        steps.add(step)
        k += 1
    return sorted(steps)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(training: Training, task: Task, epochs: int) -> RunResult:
    """Train the student, evaluating the test accuracy at :func:`eval_schedule`'s steps.

    The last incomplete batch of an epoch is dropped, so that every step sees exactly
    ``batch_size`` examples. A run whose loss stops being finite ends there, marked diverged,
    with the accuracy of the model at that step as its final accuracy.
    """
    start = time.perf_counter()
    model = make_student(training.seed)
    optimizer = build_optimizer(training.optimizer, model, training.lr)
    steps_per_epoch = len(task.x_train) // training.batch_size
    schedule = WarmupPolynomialDecay(optimizer, warmup_epochs=WARMUP_EPOCHS, total_epochs=epochs,
                                     steps_per_epoch=steps_per_epoch, power=DECAY_POWER,
                                     start_factor=training.warmup_start_factor)
    shuffle = torch.Generator().manual_seed(training.seed)
    loss_fn = nn.CrossEntropyLoss()
    to_evaluate = iter(eval_schedule(epochs * steps_per_epoch))
    next_eval = next(to_evaluate)
    eval_steps: list[int] = []
    accuracies: list[float] = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(task.x_train), generator=shuffle)
        for begin in range(0, steps_per_epoch * training.batch_size, training.batch_size):
            index = order[begin : begin + training.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(task.x_train[index]), task.y_train[index])
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            diverged = not math.isfinite(loss.item())
            if step == next_eval or diverged:
                eval_steps.append(step)
                accuracies.append(accuracy(model, task.x_test, task.y_test))
                if diverged:
                    return RunResult(training, eval_steps, accuracies, True, time.perf_counter() - start,
                                     accuracy(model, task.x_val, task.y_val))
                next_eval = next(to_evaluate, 0)
    return RunResult(training, eval_steps, accuracies, False, time.perf_counter() - start,
                     accuracy(model, task.x_val, task.y_val))


# Each worker process builds the task once (it is generated from a seed: cheaper than pickling it).
_worker_task: Task | None = None


def _start_worker(train_size: int, val_size: int, test_size: int) -> None:
    global _worker_task
    # One thread per process: at these sizes two single-threaded runs side by side beat one
    # two-threaded run, whose threads spend the small batches waiting on each other.
    torch.set_num_threads(1)
    _worker_task = make_task(train_size, test_size, val_size=val_size)


def _train_in_worker(job: tuple[Training, int]) -> RunResult:
    training, epochs = job
    assert _worker_task is not None, "_start_worker runs first"
    return train(training, _worker_task, epochs)


def run_trainings(trainings: Iterable[Training], config: ExperimentConfig, workers: int) -> dict[Training, RunResult]:
    """Run each distinct training once, on ``workers`` processes (in this one if 1); print progress."""
    # Most steps first (small batches, slow optimizers last in ties), so that the pool ends together.
    jobs = sorted(set(trainings), key=lambda t: (t.batch_size, t.optimizer, t.lr, t.seed))
    results: dict[Training, RunResult] = {}
    start = time.perf_counter()

    def report(result: RunResult) -> None:
        results[result.training] = result
        t = result.training
        print(
            f"[{len(results)}/{len(jobs)}] {t.optimizer} B={t.batch_size} lr={t.lr:.3g} seed={t.seed}: "
            f"acc {result.final_accuracy:.3f}{' DIVERGED' if result.diverged else ''} "
            f"({result.seconds:.1f} s; {time.perf_counter() - start:.0f} s elapsed)",
            file=sys.stderr,
            flush=True,
        )

    if workers == 1:
        task = make_task(config.train_size, config.test_size, val_size=config.val_size)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers, see _start_worker
        try:
            for training in jobs:
                report(train(training, task, config.epochs))
        finally:
            torch.set_num_threads(threads)
        return results
    # spawn, not fork: forking a process whose torch thread pools have already run can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _start_worker, (config.train_size, config.val_size, config.test_size)) as pool:
        for result in pool.imap_unordered(_train_in_worker, [(t, config.epochs) for t in jobs]):
            report(result)
    return results


# ----------------------------------------------------------------------------- the summary


@dataclass
class Cell:
    """One method at one batch size, over the seeds."""

    method: Method
    batch_size: int
    lr: float
    runs: list[RunResult] = field(default_factory=list)

    def steps_to(self, target: float) -> list[int]:
        """Steps to ``target`` of the runs that reached it."""
        return [s for s in (run.steps_to(target) for run in self.runs) if s is not None]

    @property
    def final_accuracies(self) -> list[float]:
        """Each seed's final test accuracy."""
        return [run.final_accuracy for run in self.runs]

    @property
    def diverged(self) -> int:
        """How many seeds diverged (non-finite loss)."""
        return sum(run.diverged for run in self.runs)


def run_experiment(config: ExperimentConfig, workers: int, base_lrs: dict[str, float] = BASE_LRS) -> list[Cell]:
    """Train every method at every batch size and seed; one :class:`Cell` per (method, batch size)."""
    cells = []
    for method in METHODS:
        for batch_size in config.batch_sizes:
            trainings = [training_for(method, batch_size, seed, base_lrs) for seed in range(config.seeds)]
            cells.append((Cell(method, batch_size, trainings[0].lr), trainings))
    results = run_trainings((t for _, trainings in cells for t in trainings), config, workers)
    for cell, trainings in cells:
        cell.runs = [results[t] for t in trainings]
    return [cell for cell, _ in cells]


def mean_std(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` (sample std; the mean alone for one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(cells: list[Cell], batch_sizes: Sequence[int], entry: Callable[[Cell], str]) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"B={b}" for b in batch_sizes) + " |",
        "|---|" + "---:|" * len(batch_sizes),
    ]
    for method in dict.fromkeys(cell.method for cell in cells):
        row = {cell.batch_size: entry(cell) for cell in cells if cell.method == method}
        lines.append(f"| {method.label} | " + " | ".join(row[b] for b in batch_sizes) + " |")
    return lines


def markdown_report(cells: list[Cell], config: ExperimentConfig, command: str, seconds: float, workers: int) -> str:
    seeds = config.seeds
    target = config.target_accuracy

    def steps_entry(cell: Cell) -> str:
        reached = cell.steps_to(target)
        if not reached:
            return f"— (0/{seeds})"
        text = mean_std(reached, 0)
        return text if len(reached) == seeds else f"{text} ({len(reached)}/{seeds})"

    def accuracy_entry(cell: Cell) -> str:
        text = mean_std([100 * a for a in cell.final_accuracies], 1)
        return text if not cell.diverged else f"{text} ({cell.diverged}/{seeds} diverged)"

    lines = [
        "# Batch-size scaling: steps to a target accuracy, and final accuracy",
        "",
        f"Made by `{command}` in {seconds / 60:.1f} min with {workers} worker process(es) of one thread. "
        f"The task, the methods and how their base learning rates were chosen: the docstring of "
        f"`largebatch/experiments/batch_scaling.py`. {config.train_size:,} training, "
        f"{config.val_size:,} validation (for the tuning) and {config.test_size:,} test examples; "
        f"{config.epochs} epochs at every batch size; "
        f"{seeds} seeds; mean ± sample standard deviation over the seeds.",
        "",
        f"## Steps to {100 * target:g} % test accuracy",
        "",
        f"Over the seeds that reached it; (k/{seeds}) when only k did, — when none did within the budget. "
        f"Evaluated every {100 * (EVAL_STEP_RATIO - 1):.0f} % of steps, so each value is known to that precision.",
        "",
        *_table(cells, config.batch_sizes, steps_entry),
        "",
        f"## Test accuracy after {config.epochs} epochs (%)",
        "",
        *_table(cells, config.batch_sizes, accuracy_entry),
        "",
        "## Peak learning rate",
        "",
        *_table(cells, config.batch_sizes, lambda cell: f"{cell.lr:.3g}"),
        "",
        "![steps to target and final accuracy against batch size](batch_scaling.png)",
        "",
    ]
    return "\n".join(lines)


def plot(cells: list[Cell], config: ExperimentConfig, path: Path) -> None:
    """Steps to target and final accuracy against the batch size; accuracy curves at the largest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(cell.method for cell in cells))
    colors = dict(zip(methods, plt.get_cmap("tab10").colors))
    largest = max(config.batch_sizes)
    fig, (ax_steps, ax_acc, ax_curve) = plt.subplots(1, 3, figsize=(16, 4.8))
    for method in methods:
        mine = [cell for cell in cells if cell.method == method]
        style = {"color": colors[method], "linestyle": "-" if method.scaled else "--", "marker": "o"}
        reached = [(c.batch_size, statistics.mean(s)) for c in mine if (s := c.steps_to(config.target_accuracy))]
        if reached:
            ax_steps.plot(*zip(*reached), label=method.label, **style)
        means = [100 * statistics.mean(c.final_accuracies) for c in mine]
        stds = [100 * statistics.stdev(c.final_accuracies) if len(c.runs) > 1 else 0.0 for c in mine]
        ax_acc.errorbar([c.batch_size for c in mine], means, yerr=stds, capsize=3, label=method.label, **style)
        run = next(c for c in mine if c.batch_size == largest).runs[0]
        ax_curve.plot(run.eval_steps, [100 * a for a in run.accuracies], color=colors[method],
                      linestyle=style["linestyle"], label=method.label)
    base_steps = [statistics.mean(c.steps_to(config.target_accuracy)) for c in cells
                  if c.batch_size == min(config.batch_sizes) and c.steps_to(config.target_accuracy)]
    if base_steps:
        b0, s0 = min(config.batch_sizes), min(base_steps)
        ax_steps.plot(config.batch_sizes, [s0 * b0 / b for b in config.batch_sizes], ":", color="grey",
                      label="perfect scaling (steps ∝ 1/B)")
    ax_steps.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps",
                 title=f"steps to {100 * config.target_accuracy:g} % test accuracy (mean of seeds that reach it)")
    ax_acc.axhline(100 * config.target_accuracy, color="grey", linestyle=":", label="target")
    ax_acc.set(xscale="log", xlabel="batch size", ylabel="test accuracy (%)",
               title=f"test accuracy after {config.epochs} epochs (mean ± std)")
    ax_curve.axhline(100 * config.target_accuracy, color="grey", linestyle=":")
    ax_curve.set(xlabel="step", ylabel="test accuracy (%)", title=f"batch {largest}, seed 0")
    for ax in (ax_steps, ax_acc):
        ax.set_xticks(config.batch_sizes, [str(b) for b in config.batch_sizes])
        ax.minorticks_off()
    for ax in (ax_steps, ax_acc, ax_curve):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    ax_steps.legend(fontsize=8)  # names the grey dotted "perfect scaling" line too
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- tuning and the command


def tune(config: ExperimentConfig, workers: int) -> dict[str, list[tuple[float, float]]]:
    """Final *validation* accuracy at the base batch, seed 0, for each lr of each optimizer's grid."""
    trainings = {
        name: [Training(name, BASE_BATCH_SIZE, lr, 1.0, 0) for lr in grid] for name, grid in LR_GRIDS.items()
    }
    results = run_trainings((t for ts in trainings.values() for t in ts), config, workers)
    return {name: [(t.lr, results[t].val_accuracy) for t in ts] for name, ts in trainings.items()}


def pick_base_lr(scores: Sequence[tuple[float, float]]) -> float:
    """The lr of the best validation accuracy (the larger lr on a tie), from (lr, accuracy) pairs."""
    return max(scores, key=lambda score: (score[1], score[0]))[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m largebatch.experiments.batch_scaling",
        description="Steps to a target test accuracy and final accuracy from batch 32 to 8192 for SGD, AdamW "
        "(with and without their lr rule + warmup), LARS, LAMB and Adan, on a synthetic teacher-student task.",
    )
    parser.add_argument("--quick", action="store_true", help="a seconds-long run on a small task (for tests)")
    parser.add_argument("--tune", action="store_true", help="print the base-lr grid at batch 32 instead")
    parser.add_argument("--workers", type=int, default=2, help="processes, one torch thread each (default 2)")
    parser.add_argument("--out", type=Path, default=Path("batch_scaling_out"),
                        help="folder for batch_scaling.md and batch_scaling.png (default batch_scaling_out; "
                        "--out docs refreshes the committed copies)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (matplotlib not needed)")
    args = parser.parse_args(argv)
    if args.workers <= 0:
        parser.error("--workers must be > 0")
    if not args.no_plot and not args.tune:
        try:  # checked before minutes of training, not at the plot
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error('the plot needs matplotlib: pip install "largebatch[demo]", or pass --no-plot')
    return args


def main(argv: Sequence[str] | None = None) -> list[Cell]:
    """Run the experiment (see the module docstring), write the table and plot, return the cells."""
    args = parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.tune:
        for name, scores in tune(config, args.workers).items():
            scores_text = ", ".join(f"lr {lr:g} → {100 * acc:.2f} %" for lr, acc in scores)
            print(f"{name}: {scores_text}; base lr {pick_base_lr(scores):g}")
        return []
    start = time.perf_counter()
    cells = run_experiment(config, args.workers)
    seconds = time.perf_counter() - start
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(["python -m largebatch.experiments.batch_scaling", *given])
    report = markdown_report(cells, config, command, seconds, args.workers)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_scaling.md").write_text(report)
    written = [args.out / "batch_scaling.md"]
    if not args.no_plot:
        plot(cells, config, args.out / "batch_scaling.png")
        written.append(args.out / "batch_scaling.png")
    print(f"wrote {' and '.join(map(str, written))}", file=sys.stderr)
    return cells


if __name__ == "__main__":
    main()
