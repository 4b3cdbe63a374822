r"""Which large-batch recipe carries a deep BatchNorm CNN from batch 64 to batch 2048?

Run ``python -m largebatch.experiments.deep_scaling``. Nothing is downloaded: the data are
generated from a fixed seed. It writes ``deep_scaling.md`` (tables), ``deep_scaling.png`` (plot)
and ``deep_scaling_runs.json`` (every run, the cache a re-run resumes from) into ``--out``
(default ``deep_scaling_out/``; ``--out docs`` refreshes the committed results). ``--quick`` is a
seconds-long smoke version; ``--no-plot`` skips the plot (and matplotlib); ``--report-only``
writes the tables and plot from the cache without running anything (for a run cut short: runs
start as soon as their learning rates are known, a setting's large-batch rows before the next
setting's tuning, so what finished is whole rows).

**Data** (:func:`make_data`): a 1-D analogue of MNIST in the spirit of mnist1d (Greydanus 2020),
generated here, vectorised (the ``mnist1d`` package itself is not used: a generator of our own
needs no dependency and has no download path at all). Each of 10 classes has a fixed random smooth template of 12 points;
an example is its class's template stretched by a factor in [0.8, 1.2], shifted by up to ±6
positions inside a window of 40, scaled in amplitude by [0.7, 1.3], sheared by a random linear
ramp, plus correlated (smoothed) and white Gaussian noise. 30,720 training, 4,096 validation and
4,096 test examples.

**Model** (:func:`make_model`): 8 ``Conv1d`` layers (kernel 3, 8 channels, no bias), each
followed by ``BatchNorm1d`` and ReLU; the 2nd, 4th and 6th have stride 2 (the length goes
40 → 20 → 10 → 5); global average pooling and a linear head: about 1.6 k parameters.

**Cost** (the issue's budget is 20 minutes on 2 cores): each run is one thread, two worker
processes by default. A batch-64 run is 4,800 steps whose time is mostly per-operation overhead
(about 6 ms of forward and backward whatever the width), a batch-2048 run 150 steps whose time
is arithmetic; so the cost is set by the number of batch-64 runs, then by the width. The first
version of this experiment (12 channels, max-pooling, the optimizers' per-tensor loops, each LARS
recipe tuned on its own) needed about 29 minutes of 2 idle cores; this one: 8 channels,
stride-2 instead of pooling layers, ``foreach=True``, one LARS tuning for its three recipes, and
an oracle sweep without the exponents that never won there. Each run records its own CPU time;
the report sums it.

**Budget and schedule**: 10 epochs at every batch size, so batch 2048 gets 150 steps and batch 64
4,800. A linear warmup over the first epoch to the peak lr, then poly-2 decay to 0
(``WarmupPolynomialDecay``, counted in samples: the scheduler steps once per 64 samples).

**Methods** (:data:`METHODS`), every optimizer built by ``create_optimizer`` (biases and
BatchNorm parameters out of weight decay): SGD with momentum + the linear rule; LARS under each
exclusion recipe of ``largebatch.factory.EXCLUSION_RECIPES`` (``"exclude"``: excluded tensors
step at the LARS global lr; ``"adapt"``; ``"separate_lr"`` with SGD's tuned lr; ``"clip"``: LARC
with an SGD-sized lr), all with the linear rule; AdamW, LAMB and Adan with the square-root rule;
Ghost BatchNorm (ghost batches of 64) on SGD + linear; AdAdaGrad's batch growth (norm test,
η = 0.1, from 64 up to the column's batch) on AdaGrad-Norm, whose lr is not coupled to the batch.

**Tuning**: the base lr of each optimizer is the best final *validation* accuracy of a grid
(:data:`LR_GRIDS`, ×4 apart) at batch 64, seed 0; the three LARS recipes share one tuning, run
with the default recipe ("adapt"). The rows at the large batch then use

* *rule*: the base lr scaled by the optimizer's rule (``suggest_scaling_rule``);
* *probe*: the peak lr that ``probe_lr`` suggests at the large batch (40 steps from the
  initial state, which it restores);
* *oracle* (labelled as such: it needs a sweep at the large batch): the best validation accuracy
  over :math:`\eta_0 (B/B_0)^k`, :math:`k \in` :data:`ORACLE_EXPONENTS` and the rule's own
  :math:`k`, seed 0; that :math:`k` is the *measured exponent* of the rule.

Every row is run with seeds 0, 1, 2 (initialisation and shuffling); tables give the mean ± std of
the final test accuracy and the mean number of steps to reach :data:`TARGET_ACCURACY` test
accuracy (evaluated every half epoch; "—" if not reached by every seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from largebatch.batching import AdaptiveBatchSize, MicroBatchGradients
from largebatch.factory import create_optimizer
from largebatch.nn.ghost_batchnorm import convert_to_ghost_batchnorm
from largebatch.schedules import WarmupPolynomialDecay, scale_lr, scaling_exponent
from largebatch.schedules.lr_probe import probe_lr

__all__ = [
    "FULL",
    "LR_GRIDS",
    "METHODS",
    "ORACLE_EXPONENTS",
    "QUICK",
    "TARGET_ACCURACY",
    "Config",
    "Data",
    "Method",
    "accuracy",
    "add_experiment_arguments",
    "build_optimizer",
    "experiment_config",
    "main",
    "make_data",
    "make_model",
    "train",
]

NUM_CLASSES = 10
LENGTH = 40  # samples per example
TEMPLATE_POINTS = 12
DATA_SEED = 0  # the templates and the examples; the same for every run


@dataclass(frozen=True)
class Data:
    """Inputs of shape (N, 1, LENGTH) and integer labels, split three ways."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def _smooth(x: Tensor, width: float) -> Tensor:
    """Gaussian smoothing along the last dimension (zero padding), vectorised over the rest."""
    radius = int(3 * width)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / width) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    return nn.functional.conv1d(x.reshape(-1, 1, x.shape[-1]), kernel, padding=radius).reshape(x.shape)


def make_data(train_size: int, val_size: int, test_size: int, seed: int = DATA_SEED) -> Data:
    r"""Generate the 1-D digit-like task (module docstring); every split from one seeded generator.

    Raises:
        ValueError: a split size is not positive.
    """
    sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size}
    for name, size in sizes.items():
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    g = torch.Generator().manual_seed(seed)
    templates = _smooth(torch.randn(NUM_CLASSES, 1, TEMPLATE_POINTS * 4, generator=g), 3.0)[:, 0, ::4]
    templates = templates / templates.abs().amax(dim=1, keepdim=True)
    n = train_size + val_size + test_size
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, 1, generator=g)

    # Position u in the window maps to template coordinate (u - start) / stretch; outside it is 0.
    stretch = uniform(0.8, 1.2) * (LENGTH - 16) / (TEMPLATE_POINTS - 1)
    start = (LENGTH - stretch * (TEMPLATE_POINTS - 1)) / 2 + uniform(-6.0, 6.0)
    coord = (torch.arange(LENGTH, dtype=torch.float32) - start) / stretch
    inside = (coord >= 0) & (coord <= TEMPLATE_POINTS - 1)
    left = coord.clamp(0, TEMPLATE_POINTS - 2).floor().long()
    frac = coord.clamp(0, TEMPLATE_POINTS - 1) - left
    rows = templates[labels]
    signal = (rows.gather(1, left) * (1 - frac) + rows.gather(1, left + 1) * frac) * inside
    ramp = torch.linspace(-1.0, 1.0, LENGTH)
    x = signal * uniform(0.7, 1.3) + uniform(-0.4, 0.4) * ramp
    x = x + 0.35 * _smooth(torch.randn(n, LENGTH, generator=g), 2.0) + 0.2 * torch.randn(n, LENGTH, generator=g)
    x = x.unsqueeze(1)
    a, b = train_size, train_size + val_size
    return Data(x[:a], labels[:a], x[a:b], labels[a:b], x[b:], labels[b:])


#: The conv layers (0-based) that halve the length with stride 2: cheaper than max-pooling
#: layers (one kernel less per block, and a conv that computes half the outputs).
DOWNSAMPLING_LAYERS = (1, 3, 5)


def make_model(seed: int, channels: int = 8, ghost_batch_size: int | None = None) -> nn.Module:
    """The 8-layer Conv1d + BatchNorm + ReLU network of the module docstring, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    in_channels = 1
    for i in range(8):
        stride = 2 if i in DOWNSAMPLING_LAYERS else 1
        layers += [nn.Conv1d(in_channels, channels, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm1d(channels), nn.ReLU()]
        in_channels = channels
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES)]
    model = nn.Sequential(*layers)
    return model if ghost_batch_size is None else convert_to_ghost_batchnorm(model, ghost_batch_size)


# ----------------------------------------------------------------------------- the methods

SGD_WEIGHT_DECAY = 5e-4  # SGD and LARS: L2 added to the gradient
DECOUPLED_WEIGHT_DECAY = 0.01  # AdamW, LAMB, Adan

#: Base-lr grids at batch 64, ×4 apart, keyed by the optimizer setting being tuned (seed 0); a
#: run cut short has whole rows for the settings first here. The three LARS recipes share one
#: tuning, run with the default recipe ("adapt"): they differ only on the excluded tensors, and
#: tuned one by one (the first version of this experiment) all three chose the same lr.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "SGD": (0.025, 0.1, 0.4),
    "LARS": (2.0, 8.0, 32.0),
    "LAMB": (0.01, 0.04, 0.16),
    "LARC clip": (0.1, 0.4, 1.6),
    "AdamW": (4e-3, 1.6e-2, 6.4e-2),
    "Adan": (4e-3, 1.6e-2, 6.4e-2),
    "AdaGradNorm": (0.1, 0.4, 1.6),
}
#: The oracle's exponents k of lr = base_lr · (B / 64)^k at the large batch, besides the rule's
#: own k (the rule row, run anyway). k = 1 for the sqrt-rule optimizers is left out: it never won
#: in the first version of this experiment (nor did k = 0.75, kept as the bracket above 0.5).
ORACLE_EXPONENTS: tuple[float, ...] = (0.25, 0.5, 0.75)
#: Steps to target count the steps until the test accuracy first reaches this.
TARGET_ACCURACY = 0.85


@dataclass(frozen=True)
class Method:
    """A row of the table: the optimizer setting it tunes (``tuned``) and how it trains."""

    label: str
    tuned: str
    name: str
    rule: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    exclusion: str | None = None
    ghost_batch_size: int | None = None
    grows_batch: bool = False


def _sgd_like(weight_decay: float = SGD_WEIGHT_DECAY) -> dict[str, Any]:
    return {"momentum": 0.9, "weight_decay": weight_decay}


METHODS: tuple[Method, ...] = (
    Method("SGD + linear", "SGD", "sgd", "linear", _sgd_like()),
    Method("LARS, adapt (excluded adapted, not decayed)", "LARS", "lars", "linear", _sgd_like(), "adapt"),
    Method("LARS, exclude (excluded at the LARS lr)", "LARS", "lars", "linear", _sgd_like(), "exclude"),
    Method("LARS, separate_lr (excluded at SGD's lr)", "LARS", "lars", "linear", _sgd_like(), "separate_lr"),
    Method("LARC, clip (SGD-sized lr)", "LARC clip", "lars", "linear", _sgd_like(), "clip"),
    Method("AdamW + sqrt", "AdamW", "adamw", "sqrt", {"weight_decay": DECOUPLED_WEIGHT_DECAY}),
    Method("LAMB + sqrt", "LAMB", "lamb", "sqrt", {"weight_decay": DECOUPLED_WEIGHT_DECAY}),
    Method("Adan + sqrt", "Adan", "adan", "sqrt", {"weight_decay": DECOUPLED_WEIGHT_DECAY}),
    Method("AdaGrad-Norm (fixed batch)", "AdaGradNorm", "adagradnorm", "sqrt", {}),
    Method("SGD + linear + Ghost BN (64)", "SGD", "sgd", "linear", _sgd_like(), ghost_batch_size=64),
    Method("AdAdaGrad growth on AdaGrad-Norm", "AdaGradNorm", "adagradnorm", "sqrt", {}, grows_batch=True),
)
_BY_LABEL = {method.label: method for method in METHODS}
#: One method per tuned setting: the one its tuning runs are run with (the first in METHODS).
TUNED_METHODS: tuple[Method, ...] = tuple(next(m for m in METHODS if m.tuned == tuned) for tuned in LR_GRIDS)
#: The rows that get probe and oracle rows: every optimizer setting at a fixed batch with plain
#: BatchNorm, but AdaGrad-Norm (there for the batch-growth row).
ORACLE_METHODS: tuple[Method, ...] = tuple(
    m for m in METHODS if m.tuned != "AdaGradNorm" and m.ghost_batch_size is None and not m.grows_batch
)


@dataclass(frozen=True)
class Config:
    """Sizes, budget and seeds of one experiment."""

    train_size: int = 30_720
    val_size: int = 4_096
    test_size: int = 4_096
    epochs: int = 10
    warmup_epochs: float = 1.0
    base_batch_size: int = 64
    large_batch_size: int = 2048
    seeds: tuple[int, ...] = (0, 1, 2)
    #: The seeds of the base-batch reference column: the first seed's runs are the tuning's own;
    #: each further seed costs one batch-64 run per row, about a third of the whole budget for two.
    base_batch_seeds: tuple[int, ...] = (0,)
    channels: int = 8
    #: Points of the test-accuracy curve per epoch; 0: the test set only at the end of the budget.
    evals_per_epoch: int = 2
    probe_steps: int = 40
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not self.base_batch_seeds or self.base_batch_seeds[0] != self.seeds[0] or \
                not set(self.base_batch_seeds) <= set(self.seeds):
            raise ValueError(f"base_batch_seeds must be seeds of {self.seeds} starting with {self.seeds[0]} (the "
                             f"tuning's), got {self.base_batch_seeds}")
        if self.evals_per_epoch < 0:
            raise ValueError(f"evals_per_epoch must be >= 0, got {self.evals_per_epoch}")

    @property
    def total_samples(self) -> int:
        """Samples in the whole budget: ``epochs · train_size`` at every batch size."""
        return self.epochs * self.train_size

    @property
    def eval_interval(self) -> int:
        """Training samples between two points of the test-accuracy curve (the last is at the end)."""
        return self.train_size // self.evals_per_epoch if self.evals_per_epoch else self.total_samples


FULL = Config()
QUICK = Config(train_size=2_048, val_size=512, test_size=512, epochs=2, large_batch_size=512, seeds=(0,), channels=4,
               probe_steps=8)


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Run:
    """One training run: a method at a batch size and peak lr, for one seed."""

    method: str
    batch_size: int
    lr: float
    seed: int
    excluded_lr: float | None = None
    probe: bool = False  # set the peak lr from probe_lr at this batch (then ``lr`` is unused)

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """The fraction of `x` that `model` (in eval mode, back in train mode after) classifies as `y`
    (`x` cast to the dtype of the model's parameters)."""
    model.eval()
    x = x.to(next(model.parameters()).dtype)
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(2048), y.split(2048)))
    model.train()
    return correct / len(y)


def build_optimizer(
    method: Method,
    model: nn.Module,
    lr: float,
    excluded_lr: float | None = None,
    kahan_sum: bool | None = None,
    state_dtype: str | None = None,
) -> torch.optim.Optimizer:
    """`method`'s optimizer for `model` at peak `lr`, as every run here builds it (conadv_scaling
    and bf16_precision too); `kahan_sum` and `state_dtype` are passed on when not None."""
    extra: dict[str, Any] = {} if method.exclusion is None else {"exclusion": method.exclusion}
    if excluded_lr is not None:
        extra["excluded_lr"] = excluded_lr
    if kahan_sum is not None:
        extra["kahan_sum"] = kahan_sum
    if state_dtype is not None:
        extra["state_dtype"] = state_dtype
    # foreach: one kernel per operation for all tensors; this model's ~25 small tensors make the
    # per-tensor loop cost up to half of a batch-64 step.
    return create_optimizer(model, method.name, lr, foreach=True, **method.kwargs, **extra)


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]).float(), batch[1])  # in fp32 whatever the model's dtype


def _micro_batch_step(model: nn.Module, x: Tensor, y: Tensor, parts: int = 8) -> Any:
    """The batch's gradient as the mean of ``parts`` micro-batch gradients, and their statistics."""
    recorder = MicroBatchGradients(model.parameters())
    for xb, yb in zip(x.chunk(parts), y.chunk(parts)):
        (_loss(model, (xb, yb)) / parts).backward()
        recorder.record(len(xb), loss_scale=1.0 / parts)
    stats = recorder.statistics()
    recorder.write_mean_gradient(stats)
    return stats


def train(
    config: Config,
    data: Data,
    run: Run,
    *,
    dtype: torch.dtype = torch.float32,
    kahan_sum: bool | None = None,
    state_dtype: str | None = None,
    fp32_test: bool = False,
    autocast: bool = False,
    fp32_norms: bool = False,
) -> dict[str, Any]:
    """Train one run; return its curve (steps, samples, test accuracy), final accuracies and lr.

    `dtype`: of the parameters and the inputs, so bfloat16 trains without fp32 master weights (the
    loss is taken in fp32); `kahan_sum`, `state_dtype`: the optimizer's, when not None
    (bf16_precision's rows); `fp32_test`: also the final test accuracy of a float32 copy of the
    trained model (``"test_accuracy_fp32"``); `autocast`: each training step's forward pass under
    ``torch.autocast("cpu", torch.bfloat16)`` (mixed precision: bf16 compute, `dtype` weights),
    the tests without it; `fp32_norms`: the BatchNorm layers (weights, biases, running statistics
    and their arithmetic) kept in float32 in a model of another `dtype`.
    """
    if autocast and _BY_LABEL[run.method].grows_batch:
        raise ValueError(f"autocast is for fixed-batch methods; {run.method!r} grows its batch")
    method = _BY_LABEL[run.method]
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    model = make_model(run.seed, config.channels, method.ghost_batch_size).to(dtype)
    if fp32_norms:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.float()
    optimizer = build_optimizer(method, model, run.lr, run.excluded_lr, kahan_sum, state_dtype)
    n = config.train_size
    order = torch.Generator().manual_seed(1000 + run.seed)
    peak_lr = run.lr
    probe_result = None
    if run.probe:
        epochs = math.ceil(config.probe_steps * run.batch_size / n)
        probe_order = torch.cat([torch.randperm(n, generator=order) for _ in range(epochs)])
        probe_batches = (
            (data.x_train[idx].to(dtype), data.y_train[idx])
            for idx in probe_order[: config.probe_steps * run.batch_size].split(run.batch_size)
        )
        probe_result = probe_lr(model, optimizer, probe_batches, _loss, min_lr=run.lr * 1e-3, max_lr=run.lr * 1e2,
                                num_steps=config.probe_steps)
        peak_lr = probe_result.suggested_lr
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * peak_lr / run.lr
    unit = config.base_batch_size
    scheduler = WarmupPolynomialDecay(
        optimizer, warmup_steps=round(config.warmup_epochs * n / unit), total_steps=config.total_samples // unit, power=2.0
    )
    controller = AdaptiveBatchSize(
        config.base_batch_size, run.batch_size, test="norm", eta=0.1, interval=5, multiple=config.base_batch_size
    ) if method.grows_batch else None
    eval_every = config.eval_interval
    curve: list[tuple[int, int, float]] = []
    batch_sizes: list[int] = []
    seen = steps = 0
    epoch_order = torch.randperm(n, generator=order)
    position = 0
    last_loss = math.nan
    while seen < config.total_samples:
        batch_size = controller.batch_size if controller is not None else run.batch_size
        batch_size = min(batch_size, config.total_samples - seen)
        if position + batch_size > n:  # a new epoch: reshuffle, drop the short tail
            epoch_order = torch.randperm(n, generator=order)
            position = 0
        idx = epoch_order[position : position + batch_size]
        position += batch_size
        x, y = data.x_train[idx].to(dtype), data.y_train[idx]
        optimizer.zero_grad()
        if controller is not None and controller.needs_statistics:
            stats = _micro_batch_step(model, x, y)
            optimizer.step()
            controller.step(stats)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(model, (x, y))
            loss.backward()
            last_loss = float(loss.detach())
            optimizer.step()
            if controller is not None:
                controller.step()
        for _ in range(batch_size // unit):
            scheduler.step()
        steps += 1
        batch_sizes.append(batch_size)
        before, seen = seen, seen + batch_size
        if seen // eval_every > before // eval_every or seen >= config.total_samples:
            curve.append((steps, seen, accuracy(model, data.x_test, data.y_test)))
    extra = {"test_accuracy_fp32": accuracy(copy.deepcopy(model).float(), data.x_test, data.y_test)} if fp32_test else {}
    return {
        **extra,
        "curve": curve,
        "test_accuracy": curve[-1][2],
        "val_accuracy": accuracy(model, data.x_val, data.y_val),
        "train_loss": last_loss,
        "steps": steps,
        "peak_lr": peak_lr,
        "final_batch_size": batch_sizes[-1],
        "probe_best_lr": None if probe_result is None else probe_result.best_lr,
        "seconds": time.perf_counter() - started,
        # One thread: the run's own CPU time, whatever else shares the machine (the budget's measure).
        "cpu_seconds": time.process_time() - cpu_started,
    }


# ----------------------------------------------------------------------------- the experiment

_DATA: Data | None = None  # each worker process builds the data once (set by _init_worker)


def _init_worker(config: Config) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = make_data(config.train_size, config.val_size, config.test_size)


def _run_in_worker(args: tuple[Config, Run]) -> tuple[str, dict[str, Any]]:
    config, run = args
    assert _DATA is not None
    return run.key, train(config, _DATA, run)


class Results:
    """The runs done so far, keyed by :attr:`Run.key`, saved to a JSON cache after every run."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            self.runs = json.loads(path.read_text())["runs"]

    def get(self, run: Run) -> dict[str, Any] | None:
        return self.runs.get(run.key)

    def add(self, key: str, result: dict[str, Any]) -> None:
        self.runs[key] = result
        if self.path is not None:
            self.path.write_text(json.dumps({"runs": self.runs}, indent=0))


@dataclass
class Plan:
    """The lrs the experiment settles on: tuned base lrs, oracle exponents."""

    base_lr: dict[str, float] = field(default_factory=dict)
    base_grid: dict[str, dict[float, float]] = field(default_factory=dict)
    oracle_exponent: dict[str, float] = field(default_factory=dict)  # keyed by method label
    oracle_grid: dict[str, dict[float, float]] = field(default_factory=dict)  # keyed by method label


def _excluded_lr(method: Method, plan: Plan, batch_size: int, config: Config) -> float | None:
    """The separate_lr recipe's excluded lr: SGD's tuned base lr, scaled linearly like SGD's."""
    if method.exclusion != "separate_lr":
        return None
    return scale_lr(plan.base_lr["SGD"], batch_size, config.base_batch_size, "linear")


def _base_run(method: Method, plan: Plan, config: Config, lr: float, seed: int, batch_size: int | None = None,
              probe: bool = False) -> Run:
    batch = config.base_batch_size if batch_size is None else batch_size
    return Run(method.label, batch, lr, seed, _excluded_lr(method, plan, batch, config), probe)


def _rule_lr(method: Method, plan: Plan, config: Config) -> float:
    """The peak lr at the large batch by the rule (the base lr for batch growth, which keeps it)."""
    base = plan.base_lr[method.tuned]
    return base if method.grows_batch else scale_lr(base, config.large_batch_size, config.base_batch_size, method.rule)


def _small_batch_method(method: Method) -> Method:
    """The method whose runs stand for ``method`` at the base batch: there Ghost BN of 64 is BatchNorm
    and batch growth has not started, so they are the runs of SGD and fixed-batch AdaGrad-Norm."""
    if method.ghost_batch_size is not None:
        return _BY_LABEL["SGD + linear"]
    if method.grows_batch:
        return _BY_LABEL["AdaGrad-Norm (fixed batch)"]
    return method


def _lrs_known(method: Method, plan: Plan) -> bool:
    """Whether ``method``'s runs can start: its base lr is tuned (and, for separate_lr, SGD's)."""
    return method.tuned in plan.base_lr and (method.exclusion != "separate_lr" or "SGD" in plan.base_lr)


def _oracle_exponents(method: Method) -> tuple[float, ...]:
    """The oracle's exponents for ``method``: :data:`ORACLE_EXPONENTS` and its rule's own k."""
    return tuple(sorted({*ORACLE_EXPONENTS, scaling_exponent(method.rule)}))


def _scaled_lr(method: Method, plan: Plan, config: Config, exponent: float) -> float:
    return scale_lr(plan.base_lr[method.tuned], config.large_batch_size, config.base_batch_size, exponent)


def _oracle_runs(method: Method, plan: Plan, config: Config, seed: int) -> list[Run]:
    return [_base_run(method, plan, config, _scaled_lr(method, plan, config, k), seed, config.large_batch_size)
            for k in _oracle_exponents(method)]


def _oracle_lr(method: Method, plan: Plan, config: Config) -> float:
    return _scaled_lr(method, plan, config, plan.oracle_exponent[method.label])


def _log_result(log: Callable[[str], None], key: str, result: dict[str, Any]) -> None:
    run = json.loads(key)
    log(f"    {run['method']:<45} B={run['batch_size']:<5} lr={result['peak_lr']:<9.3g} seed={run['seed']} "
        f"probe={run['probe']!s:<5} test={100 * result['test_accuracy']:.1f}% ({result['seconds']:.0f}s, "
        f"{result['cpu_seconds']:.0f} CPU-s)")


def run_experiment(config: Config, results: Results, log: Callable[[str], None] = print) -> Plan:
    """Tune, then run every row (rule, probe, oracle), as soon as what a run needs is known.

    Runs are started in order of :func:`_ready_runs`: a setting's large-batch rows (seed 0) as soon
    as its base lr is tuned, before the tuning of later settings, then the other seeds; so a run
    cut short holds whole rows for the settings first in :data:`LR_GRIDS`, with every cell kept
    in the cache.
    """
    plan = Plan()
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(config.workers, _init_worker, (config,)) if config.workers > 1 else None
    if pool is None:
        _init_worker(config)
    pending: dict[Run, Any] = {}
    try:
        while True:
            for run in _ready_runs(config, results, plan):
                if len(pending) >= config.workers:
                    break
                if run in pending:
                    continue
                if pool is None:
                    key, result = _run_in_worker((config, run))
                    results.add(key, result)
                    _log_result(log, key, result)
                    break  # the plan may have changed: look again
                pending[run] = pool.apply_async(_run_in_worker, ((config, run),))
            else:
                if not pending:
                    break
            if pool is None:
                continue
            done = [run for run, handle in pending.items() if handle.ready()]
            if not done:
                time.sleep(0.2)
            for run in done:
                key, result = pending.pop(run).get()
                results.add(key, result)
                _log_result(log, key, result)
    finally:
        if pool is not None:
            if pending:  # interrupted: do not wait for the runs in flight
                pool.terminate()
            else:
                pool.close()
            pool.join()
    return plan


def _settle(config: Config, results: Results, plan: Plan) -> None:
    """Fix every base lr and oracle exponent whose sweep is complete."""
    first = config.seeds[0]
    for m in TUNED_METHODS:
        if m.tuned not in plan.base_lr:
            runs = [_base_run(m, plan, config, lr, first) for lr in LR_GRIDS[m.tuned]]
            if all(results.get(r) is not None for r in runs):
                plan.base_grid[m.tuned] = {r.lr: results.get(r)["val_accuracy"] for r in runs}
                plan.base_lr[m.tuned] = max(plan.base_grid[m.tuned], key=plan.base_grid[m.tuned].get)
    for m in ORACLE_METHODS:
        if _lrs_known(m, plan) and m.label not in plan.oracle_exponent:
            runs = _oracle_runs(m, plan, config, first)
            if all(results.get(r) is not None for r in runs):
                grid = {k: results.get(r)["val_accuracy"] for k, r in zip(_oracle_exponents(m), runs)}
                plan.oracle_grid[m.label] = grid
                plan.oracle_exponent[m.label] = max(grid, key=grid.get)


def _ready_runs(config: Config, results: Results, plan: Plan) -> list[Run]:
    """The runs not yet in the cache whose lrs are known, most wanted first.

    Seed 0 first: for each tuned setting (in :data:`LR_GRIDS` order), its rows' rule, probe and
    oracle runs at the large batch and the base-batch runs of the rows that are not the tuned
    one; then the tuning runs still to do; after that the other seeds: large batch (rule,
    oracle, probe), then the base batch (:attr:`Config.base_batch_seeds`).
    """
    _settle(config, results, plan)
    first, rest, big = config.seeds[0], config.seeds[1:], config.large_batch_size
    rows = [m for m in METHODS if _lrs_known(m, plan)]
    runs: list[Run] = []
    for tuned in LR_GRIDS:
        for m in (r for r in rows if r.tuned == tuned):
            runs.append(_base_run(m, plan, config, _rule_lr(m, plan, config), first, big))
            if m in ORACLE_METHODS:
                runs.append(_base_run(m, plan, config, plan.base_lr[m.tuned], first, big, probe=True))
                runs += _oracle_runs(m, plan, config, first)
            if _small_batch_method(m) is m:
                runs.append(_base_run(m, plan, config, plan.base_lr[m.tuned], first))
    for m in TUNED_METHODS:
        if m.tuned not in plan.base_lr:
            runs += [_base_run(m, plan, config, lr, first) for lr in LR_GRIDS[m.tuned]]
    oracle_rows = [m for m in ORACLE_METHODS if m.label in plan.oracle_exponent]
    for s in rest:
        runs += [_base_run(m, plan, config, _rule_lr(m, plan, config), s, big) for m in rows]
        runs += [_base_run(m, plan, config, _oracle_lr(m, plan, config), s, big) for m in oracle_rows]
        runs += [_base_run(m, plan, config, plan.base_lr[m.tuned], s, big, probe=True)
                 for m in ORACLE_METHODS if m in rows]
    for s in config.base_batch_seeds[1:]:
        runs += [_base_run(m, plan, config, plan.base_lr[m.tuned], s) for m in rows if _small_batch_method(m) is m]
    return [run for run in dict.fromkeys(runs) if results.get(run) is None]


# ----------------------------------------------------------------------------- the report


def _cells(results: Results, runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [r for r in (results.get(run) for run in runs) if r is not None]


def _steps_to_target(result: dict[str, Any]) -> int | None:
    return next((steps for steps, _, accuracy in result["curve"] if accuracy >= TARGET_ACCURACY), None)


def _summary(cells: list[dict[str, Any]], seeds: int) -> tuple[str, str]:
    """'mean ± std' of the final test accuracy (%), and the mean steps to target ('—' if any seed misses)."""
    if not cells:
        return "not run", "not run"
    accuracies = [100 * c["test_accuracy"] for c in cells]
    spread = f" ± {statistics.stdev(accuracies):.1f}" if len(accuracies) > 1 else ""
    partial = f" ({len(cells)} of {seeds} seeds)" if len(cells) < seeds else ""
    mean_accuracy = f"{statistics.fmean(accuracies):.1f}{spread}{partial}"
    reached = [_steps_to_target(c) for c in cells]
    steps = "—" if None in reached else f"{statistics.fmean(reached):.0f}"
    return mean_accuracy, steps


def _lr(value: float) -> str:
    return f"{value:.3g}"


def write_report(config: Config, results: Results, plan: Plan, out: Path, seconds: float | None,
                 cpu_seconds: float | None = None, runs_run: int | None = None) -> str:
    """The markdown tables of the experiment; written to ``out/deep_scaling.md`` and returned.

    ``seconds`` is the run's wall time, ``cpu_seconds`` the CPU time of it and its workers and
    ``runs_run`` how many runs it did (the rest came from the cache); None: not timed.
    """
    b0, big = config.base_batch_size, config.large_batch_size
    ratio = big / b0
    n_seeds = len(config.seeds)
    lines = [
        "# Deep 1-D CNN with BatchNorm: batch 64 → 2048 at a fixed epoch budget",
        "",
        "Written by `python -m largebatch.experiments.deep_scaling` (the module docstring has the setting).",
        f"{config.epochs} epochs of {config.train_size} examples: {config.total_samples // b0} steps at batch {b0}, "
        f"{config.total_samples // big} at batch {big}. Test accuracy (%) after the budget, mean ± std over seeds "
        f"{', '.join(map(str, config.seeds))}; steps to {100 * TARGET_ACCURACY:.0f} % test accuracy (mean; — if a seed "
        "never got there).",
    ]
    if seconds is not None:
        cpu = "" if cpu_seconds is None else (
            f", {cpu_seconds:.0f} CPU-seconds in all ({cpu_seconds / 120:.1f} minutes on 2 idle cores)")
        lines.append(f"This run took {seconds / 60:.1f} minutes wall time with {config.workers} worker processes{cpu}"
                     + ("." if runs_run is None else f"; it ran {runs_run} of the {len(results.runs)} runs."))
    run_cpu = [r["cpu_seconds"] for r in results.runs.values() if "cpu_seconds" in r]
    if run_cpu:
        lines.append(f"The runs' own CPU time (each run is one thread) sums to {sum(run_cpu):.0f} s over "
                     f"{len(run_cpu)} runs: {sum(run_cpu) / 120:.1f} minutes of 2 idle cores, whatever else shared "
                     "the machine.")
    if _ready_runs(config, results, plan) or len(plan.base_lr) < len(LR_GRIDS):
        lines += ["", f"**Incomplete run**: {len(results.runs)} runs are in the cache; settings not tuned yet: "
                  f"{', '.join(k for k in LR_GRIDS if k not in plan.base_lr) or 'none'}; cells marked "
                  "'not run' (and seed counts below 3) are missing."]
    small_seeds = ", ".join(map(str, config.base_batch_seeds))
    lines += ["", f"## Rule rows: the base lr tuned at batch {b0}, scaled by the optimizer's rule", "",
              f"At batch {b0}, seed{'s' if len(config.base_batch_seeds) > 1 else ''} {small_seeds} (the tuning's "
              f"runs{'' if len(config.base_batch_seeds) > 1 else '; a reference, not a comparison'}); at batch {big}, "
              f"seeds {', '.join(map(str, config.seeds))}.", "",
              f"| method | rule | lr at {b0} | acc. at {b0} | steps to target | lr at {big} | acc. at {big} | "
              "steps to target |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        if not _lrs_known(m, plan):
            continue
        base = plan.base_lr[m.tuned]
        stand_in = _small_batch_method(m)
        small = _summary(_cells(results, [_base_run(stand_in, plan, config, base, s) for s in config.base_batch_seeds]),
                         len(config.base_batch_seeds))
        rule_lr = _rule_lr(m, plan, config)
        large_cells = _cells(results, [_base_run(m, plan, config, rule_lr, s, big) for s in config.seeds])
        large = _summary(large_cells, n_seeds)
        rule = "none (grows 64 → " + str(big) + ")" if m.grows_batch else m.rule
        if m.grows_batch and large_cells:
            rule += f", {statistics.fmean(c['steps'] for c in large_cells):.0f} steps"
        lines.append(f"| {m.label} | {rule} | {_lr(base)} | {small[0]} | {small[1]} | {_lr(rule_lr)} | {large[0]} | "
                     f"{large[1]} |")

    lines += ["", f"## At batch {big}: rule vs probe vs oracle", "",
              f"The probe row's lr is `probe_lr`'s suggestion ({config.probe_steps} steps at the large batch from the "
              "initial state, "
              "restored afterwards; the lr of the lowest smoothed loss / 10), one probe per seed. "
              f"**Oracle** rows re-tune the lr at batch {big} (seed 0, validation split, lr = base · "
              f"{int(ratio)}^k for k in {', '.join(map(str, ORACLE_EXPONENTS))} and the rule's own k): a sweep at the "
              "large batch that a rule is meant to save; k is the measured exponent.", "",
              "| method | rule lr | rule acc. | probe lr (mean) | probe acc. | measured k | **oracle** lr | "
              "**oracle** acc. | oracle steps to target |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in ORACLE_METHODS:
        if not _lrs_known(m, plan):
            continue
        base = plan.base_lr[m.tuned]
        rule_lr = _rule_lr(m, plan, config)
        rule = _summary(_cells(results, [_base_run(m, plan, config, rule_lr, s, big) for s in config.seeds]), n_seeds)
        probe_cells = _cells(results, [_base_run(m, plan, config, base, s, big, probe=True) for s in config.seeds])
        probe = _summary(probe_cells, n_seeds)
        probe_lr_mean = _lr(statistics.fmean(c["peak_lr"] for c in probe_cells)) if probe_cells else "not run"
        k = plan.oracle_exponent.get(m.label)
        if k is None:
            oracle, oracle_lr, k_text = ("not run", "not run"), "not run", "not run"
        else:
            oracle_lr = _oracle_lr(m, plan, config)
            oracle = _summary(_cells(results, [_base_run(m, plan, config, oracle_lr, s, big) for s in config.seeds]),
                              n_seeds)
            oracle_lr, k_text = _lr(oracle_lr), f"{k:g}"
        lines.append(f"| {m.label} | {_lr(rule_lr)} | {rule[0]} | {probe_lr_mean} | {probe[0]} | {k_text} | "
                     f"{oracle_lr} | {oracle[0]} | {oracle[1]} |")

    lines += ["", "## The sweeps (validation accuracy %, seed 0)", "",
              f"Base lr at batch {b0} (the chosen one in bold):", ""]
    for tuned, grid in plan.base_grid.items():
        cells = ", ".join(("**" if lr == plan.base_lr[tuned] else "") + f"{_lr(lr)} → {100 * acc:.1f}"
                          + ("**" if lr == plan.base_lr[tuned] else "") for lr, acc in grid.items())
        lines.append(f"* {tuned}: {cells}")
    if plan.oracle_grid:
        lines += ["", f"Exponent k at batch {big} (lr = base · {int(ratio)}^k):", ""]
        for label, grid in plan.oracle_grid.items():
            cells = ", ".join(f"k={k:g} → {100 * acc:.1f}" for k, acc in grid.items())
            lines.append(f"* {label}: {cells}")
    text = "\n".join(lines) + "\n"
    (out / "deep_scaling.md").write_text(text)
    return text


def write_plot(config: Config, results: Results, plan: Plan, path: Path) -> None:
    """Test accuracy against epochs at the large batch (rule rows), with SGD at the base batch for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b0, big = config.base_batch_size, config.large_batch_size
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, oracle in zip(axes, (False, True)):
        sgd = _BY_LABEL["SGD + linear"]
        reference = _cells(results, [_base_run(sgd, plan, config, plan.base_lr.get("SGD", 0.0), s) for s in config.seeds])
        for c in reference[:1]:
            ax.plot([s / config.train_size for _, s, _ in c["curve"]], [100 * a for *_, a in c["curve"]], "k--",
                    label=f"SGD at batch {b0} (seed {config.seeds[0]})")
        for m in METHODS if not oracle else ORACLE_METHODS:
            if not _lrs_known(m, plan) or (oracle and m.label not in plan.oracle_exponent):
                continue
            lr = _oracle_lr(m, plan, config) if oracle else _rule_lr(m, plan, config)
            cells = _cells(results, [_base_run(m, plan, config, lr, s, big) for s in config.seeds])
            if not cells:
                continue
            epochs = [s / config.train_size for _, s, _ in cells[0]["curve"]]
            mean = [100 * statistics.fmean(c["curve"][i][2] for c in cells) for i in range(len(epochs))]
            # One colour per method: tab20 has enough for every method (the default cycle has 10).
            ax.plot(epochs, mean, label=m.label, color=plt.get_cmap("tab20")(METHODS.index(m) % 20))
        ax.axhline(100 * TARGET_ACCURACY, color="grey", linestyle=":", label=f"target {100 * TARGET_ACCURACY:.0f} %")
        ax.set_xlabel("epoch")
        ax.set_title(f"batch {big}: " + ("ORACLE lr (re-tuned at this batch)" if oracle else "lr from the rule"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test accuracy (%), mean over seeds")
    axes[0].set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def add_experiment_arguments(parser: argparse.ArgumentParser, name: str, files: str) -> None:
    """--out (default ``{name}_out``, holding `files`), --quick and --workers: the options this
    experiment shares with the ones built on it (conadv_scaling, bf16_precision)."""
    parser.add_argument("--out", type=Path, default=Path(f"{name}_out"),
                        help=f"folder for {files} (default {name}_out; --out docs refreshes the committed results)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke version")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 2)")


def experiment_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """QUICK or FULL as --quick says, with --workers (at least 1: a usage error otherwise); makes --out."""
    config = QUICK if args.quick else FULL
    if args.workers is not None:
        if args.workers < 1:
            parser.error(f"--workers must be >= 1, got {args.workers}")
        config = replace(config, workers=args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: run (or resume) the experiment, write the tables and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_experiment_arguments(parser, "deep_scaling", "deep_scaling.md/.png/_runs.json")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables and plot from the runs in --out's cache, running nothing "
                             "(cells not run yet read 'not run')")
    args = parser.parse_args(argv)
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit('the plot needs matplotlib: pip install "largebatch[demo]", or pass --no-plot')
    config = experiment_config(parser, args)
    cache = args.out / ("deep_scaling_quick_runs.json" if args.quick else "deep_scaling_runs.json")
    results = Results(cache)
    seconds = cpu_seconds = runs_run = None
    if args.report_only:
        plan = Plan()
        _settle(config, results, plan)
    else:
        started, cpu_started, cached = time.perf_counter(), _cpu_seconds(), len(results.runs)
        plan = run_experiment(config, results, lambda line: print(line, flush=True))
        seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
        runs_run = len(results.runs) - cached
    print(write_report(config, results, plan, args.out, seconds, cpu_seconds, runs_run))
    if not args.no_plot:
        write_plot(config, results, plan, args.out / "deep_scaling.png")


if __name__ == "__main__":
    main()
