r"""Batch-size warmup from the gradient noise scale, against a fixed small and a fixed large batch.

Run ``python -m largebatch.experiments.noise_scale --out docs``: a few minutes on two shared CPU
cores, nothing downloaded. It writes ``noise_scale.md`` (the table) and ``noise_scale.png`` (the
B_simple curves) into ``--out`` (default ``noise_scale_out/``, so the committed ``docs/`` files are
only replaced on purpose); ``--quick`` runs a seconds-long version, ``--no-plot`` skips matplotlib.

The task is the batch-scaling experiment's (`largebatch.experiments.batch_scaling.make_task`): a
fixed random teacher labels Gaussian inputs, 10 % of the training labels are noise, and an MLP
32 → 128 → 128 → 10 learns it with AdamW (lr 1e-3 at batch 32, weight decay 0.01). Three runs from
the same initialisation and shuffling seed, until the test accuracy reaches the target:

* **warmup**: `AdaptiveBatchSize(32, 4096, test="noise_scale")`: every :data:`INTERVAL` steps the
  batch becomes clamp(k·B_simple, 32, 4096), never smaller, a multiple of :data:`RANKS`;
* **fixed small**: batch 32 throughout;
* **fixed large**: batch 4096 throughout.

The warmup waits for :data:`MIN_UPDATES` measurements before its first decision and at most
doubles the batch per decision (:data:`MAX_GROWTH`): B_simple is several hundred here from the
start, and measured from a batch of 32 (eight units of four samples) its |G|² estimate is mostly
noise — often <= 0, i.e. B_simple = +inf — so without the cap one bad estimate jumps to 4096.

In every run the learning rate follows the batch by `BatchSizeCoupledLR`'s square-root rule
(lr = 1e-3·√(B/32)), and B_simple is measured every :data:`INTERVAL` steps the same way: the
batch is split into :data:`RANKS` equal micro-batches — simulated data-parallel ranks, the units
a DDP run's `gradient_statistics_hook` would reduce — whose gradients `MicroBatchGradients`
records while they accumulate into the batch gradient (the same backward work as one backward of
the batch). Their statistics feed `GradientNoiseScale` (EMA decay :data:`BETA`).

*Steps* and *samples* to target are counted at the first evaluation at or above the target; the
test accuracy is evaluated whenever another :data:`EVALUATE_EVERY_SAMPLES` samples have been
processed, so small-batch counts are known to that many samples.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from largebatch.batching import AdaptiveBatchSize, GradientNoiseScale, GrowingBatchSampler, MicroBatchGradients
from largebatch.experiments.batch_scaling import Task, make_student, make_task
from largebatch.schedules import BatchSizeCoupledLR

__all__ = ["RunLog", "Setting", "main", "run"]

INITIAL_BATCH, MAX_BATCH = 32, 4096
RANKS = 8  # simulated data-parallel ranks: micro-batches per measured step
INTERVAL = 10  # steps between B_simple measurements (and warmup decisions)
BETA = 0.9  # EMA decay of the noise-scale monitor
NOISE_SCALE_FACTOR = 1.0  # k in batch = clamp(k·B_simple, b0, b_max)
MIN_UPDATES = 3  # measurements the warmup waits for before its first decision
MAX_GROWTH = 2.0  # at most double per decision: small-batch estimates of B_simple are noisy
BASE_LR, WEIGHT_DECAY, LR_RULE = 1e-3, 0.01, "sqrt"
EVALUATE_EVERY_SAMPLES = 2048


@dataclass(frozen=True)
class Setting:
    """The size of the run: the full one, or a seconds-long one for tests."""

    train_size: int
    test_size: int
    target: float
    max_samples: int


FULL = Setting(train_size=100_000, test_size=10_000, target=0.80, max_samples=1_500_000)
QUICK = Setting(train_size=4_000, test_size=1_000, target=0.40, max_samples=40_000)


@dataclass
class RunLog:
    """What one run measured."""

    name: str
    steps_to_target: int | None = None
    samples_to_target: int | None = None
    final_batch: int = 0
    seconds: float = 0.0
    # (step, samples so far, batch size, B_simple) at every measurement
    noise_scale: list[tuple[int, int, int, float]] = field(default_factory=list)
    # (step, samples so far, test accuracy) at every evaluation
    accuracy: list[tuple[int, int, float]] = field(default_factory=list)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


def test_accuracy(model: nn.Module, task: Task) -> float:
    with torch.no_grad():
        return float((model(task.x_test).argmax(1) == task.y_test).float().mean())


def measured_backward(model: nn.Module, recorder: MicroBatchGradients, x: torch.Tensor, y: torch.Tensor):
    """The batch gradient, accumulated from RANKS equal micro-batches whose gradients are recorded."""
    recorder.clear()
    for xs, ys in zip(x.chunk(RANKS), y.chunk(RANKS)):
        share = len(xs) / len(x)  # the micro-batch means, weighted, add up to the batch mean
        (cross_entropy(model(xs), ys) * share).backward()
        recorder.record(len(xs), loss_scale=share)
    return recorder.statistics()


def run(name: str, initial: int, maximum: int, task: Task, setting: Setting, seed: int = 0) -> RunLog:
    """Train until the target accuracy (or `setting.max_samples`) with the batch in [initial, maximum]."""
    started = time.perf_counter()
    model = make_student(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=WEIGHT_DECAY)
    coupled = BatchSizeCoupledLR(optimizer, base_batch_size=INITIAL_BATCH, rule=LR_RULE, batch_size=initial)
    controller = AdaptiveBatchSize(
        initial,
        maximum,
        test="noise_scale",
        noise_scale=GradientNoiseScale(beta=BETA),
        noise_scale_factor=NOISE_SCALE_FACTOR,
        noise_scale_min_updates=MIN_UPDATES,
        noise_scale_max_growth=MAX_GROWTH,
        interval=INTERVAL,
        multiple=RANKS,
        lr_coupling=coupled,
    )
    sampler = GrowingBatchSampler(len(task.y_train), controller, seed=seed)
    recorder = MicroBatchGradients(model.parameters())
    log = RunLog(name)
    step = samples = 0
    next_evaluation = EVALUATE_EVERY_SAMPLES
    while samples < setting.max_samples and log.steps_to_target is None:
        for batch in sampler:
            x, y = task.x_train[batch], task.y_train[batch]
            optimizer.zero_grad()
            statistics = None
            if controller.needs_statistics:
                statistics = measured_backward(model, recorder, x, y)
            else:
                cross_entropy(model(x), y).backward()
            optimizer.step()
            batch_size = len(batch)
            controller.step(statistics)
            step, samples = step + 1, samples + batch_size
            if statistics is not None:
                log.noise_scale.append((step, samples, batch_size, controller.noise_scale.b_simple))
            if samples >= next_evaluation:
                while next_evaluation <= samples:
                    next_evaluation += EVALUATE_EVERY_SAMPLES
                accuracy = test_accuracy(model, task)
                log.accuracy.append((step, samples, accuracy))
                if accuracy >= setting.target:
                    log.steps_to_target, log.samples_to_target = step, samples
                    break
            if samples >= setting.max_samples:
                break
    log.final_batch = controller.batch_size
    log.seconds = time.perf_counter() - started
    return log


def _mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:,.0f}"
    return f"{statistics.mean(values):,.0f} ± {statistics.stdev(values):,.0f}"


def markdown(runs: dict[str, list[RunLog]], setting: Setting, command: str, seconds: float) -> str:
    seeds = len(next(iter(runs.values())))
    lines = [
        "# Batch-size warmup from the gradient noise scale",
        "",
        f"Made by `{command}` in {seconds / 60:.1f} min (one process, one torch thread). The setup: the "
        "docstring of `largebatch/experiments/noise_scale.py`. "
        f"{setting.train_size:,} training and {setting.test_size:,} test examples; target {setting.target:.0%} "
        f"test accuracy, evaluated every {EVALUATE_EVERY_SAMPLES:,} samples; AdamW, lr {BASE_LR:g}·√(B/{INITIAL_BATCH}); "
        f"{seeds} seed(s), mean ± sample standard deviation over those that reached the target.",
        "",
        "| run | steps to target | samples to target | final batch | reached |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, logs in runs.items():
        reached = [log for log in logs if log.steps_to_target is not None]
        steps = _mean_std([log.steps_to_target for log in reached]) if reached else "—"
        samples = _mean_std([log.samples_to_target for log in reached]) if reached else "—"
        finals = sorted({log.final_batch for log in logs})
        lines.append(f"| {name} | {steps} | {samples} | {', '.join(f'{b:,}' for b in finals)} | {len(reached)}/{len(logs)} |")
    lines += ["", "Per seed (steps / samples to target):", ""]
    for name, logs in runs.items():
        per_seed = ", ".join(
            f"{log.steps_to_target:,} / {log.samples_to_target:,}" if log.steps_to_target is not None else "—"
            for log in logs
        )
        lines.append(f"* {name}: {per_seed}")
    lines += ["", "B_simple at each run's last measurement, per seed:", ""]
    for name, logs in runs.items():
        lines.append(f"* {name}: " + ", ".join(f"{log.noise_scale[-1][3]:,.0f}" for log in logs if log.noise_scale))
    lines += ["", "![B_simple over training](noise_scale.png)", ""]
    return "\n".join(lines)


def plot(logs: Sequence[RunLog], path: Path) -> None:
    """B_simple (and the warmup's batch size) against samples, and test accuracy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for log in logs:
        samples = [s for _, s, _, _ in log.noise_scale]
        (line,) = left.plot(samples, [b for _, _, _, b in log.noise_scale], label=f"B_simple, {log.name}")
        if log.name == "warmup":
            left.plot(samples, [size for _, _, size, _ in log.noise_scale], color=line.get_color(), linestyle="--",
                      label="batch size, warmup")
        right.plot([s for s, _, _ in log.accuracy], [a for _, _, a in log.accuracy], label=log.name)
    left.set(xlabel="samples processed", ylabel="B_simple (EMA) / batch size", yscale="log",
             title="gradient noise scale B_simple = tr(Σ)/|G|²")
    right.set(xlabel="optimizer steps", ylabel="test accuracy", xscale="log", title="test accuracy")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m largebatch.experiments.noise_scale",
        description="Batch-size warmup from the gradient noise scale vs fixed small and large batches.",
    )
    parser.add_argument("--quick", action="store_true", help="a seconds-long run on a small task (for tests)")
    parser.add_argument("--out", type=Path, default=Path("noise_scale_out"),
                        help="folder for noise_scale.md and noise_scale.png (default noise_scale_out/)")
    parser.add_argument("--no-plot", action="store_true", help="write the table only (no matplotlib needed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="initialisation and shuffling seeds (default 0 1 2); the plot shows the first")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, list[RunLog]]:
    """Run the three settings for every seed; write the table (and plot) into ``--out``."""
    args = parse_args(argv)
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of training, not after)
        except ModuleNotFoundError:
            sys.exit('the plot needs matplotlib: pip install "largebatch[demo]", or pass --no-plot')
    torch.set_num_threads(1)
    setting = QUICK if args.quick else FULL
    started = time.perf_counter()
    task = make_task(setting.train_size, setting.test_size)
    runs: dict[str, list[RunLog]] = {}
    for name, initial, maximum in (
        ("warmup", INITIAL_BATCH, MAX_BATCH),
        (f"fixed {INITIAL_BATCH}", INITIAL_BATCH, INITIAL_BATCH),
        (f"fixed {MAX_BATCH}", MAX_BATCH, MAX_BATCH),
    ):
        for seed in args.seeds:
            log = run(name, initial, maximum, task, setting, seed)
            print(f"{name}, seed {seed}: steps {log.steps_to_target}, samples {log.samples_to_target}, "
                  f"final batch {log.final_batch}, {log.seconds:.0f} s", flush=True)
            runs.setdefault(name, []).append(log)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m largebatch.experiments.noise_scale", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "noise_scale.md").write_text(markdown(runs, setting, command, time.perf_counter() - started))
    if not args.no_plot:
        plot([logs[0] for logs in runs.values()], args.out / "noise_scale.png")
    return runs


if __name__ == "__main__":
    main()
