r"""An lr range test at the target batch size that suggests the peak learning rate.

Smith 2017 ("Cyclical Learning Rates for Training Neural Networks") raises the lr over a short
run and reads the usable range off the loss. :func:`probe_lr` does so from a copy of the
training state: for :math:`n = 0, \dots, N-1` it trains one step at

.. math::
    \eta_n = \eta_{\min} \left(\frac{\eta_{\max}}{\eta_{\min}}\right)^{n / (N - 1)},

records the loss :math:`\ell_n` of that step's batch and its exponential moving average
:math:`s_n = \beta s_{n-1} + (1 - \beta)\ell_n` (bias-corrected, :math:`\beta` = ``smoothing``),
and stops early once :math:`s_n > \text{diverge\_factor} \cdot \min_{m \le n} s_m` or the loss
is not finite. The suggested peak lr is the lr of the smallest smoothed loss divided by
``safety_factor``: the loss is lowest just before the rate gets too large, and a schedule's peak
must sit below that edge. Afterwards the model's parameters, buffers, gradients and train/eval
modes, the optimizer's state and param groups, and the CPU (and CUDA) random number generators are exactly as they were.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import check_finite_real, check_in_range, check_positive_int

__all__ = ["LRProbeResult", "probe_lr"]


@dataclass(frozen=True)
class LRProbeResult:
    """What :func:`probe_lr` measured: the lrs tried (of the first group), their losses, the suggestion."""

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    best_lr: float
    suggested_lr: float
    diverged: bool


def _check_lr(name: str, value: object) -> float:
    lr = check_finite_real(name, value)
    if lr <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return lr


def _set_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


class _Snapshot:
    """A deep copy of the model, optimizer and RNG state, put back by :meth:`restore`."""

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.model_state = copy.deepcopy(model.state_dict())
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        # The lr objects themselves: a tensor lr may be shared (with other groups, a scheduler).
        self.lr_objects = [group["lr"] for group in optimizer.param_groups]
        self.lrs = [copy.deepcopy(group["lr"]) for group in optimizer.param_groups]
        self.training = [module.training for module in model.modules()]
        self.params = list(model.parameters())
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        self.model.load_state_dict(self.model_state)
        for module, training in zip(self.model.modules(), self.training):
            module.training = training
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        self.optimizer.load_state_dict(self.optimizer_state)
        for group, original, lr in zip(self.optimizer.param_groups, self.lr_objects, self.lrs):
            # load_state_dict puts copies in the groups: put the original objects back, and a
            # tensor lr, filled in place by the probe, gets its old value again.
            if isinstance(original, Tensor):
                original.copy_(lr)
            group["lr"] = original
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def probe_lr(
    model: nn.Module,
    optimizer: Optimizer,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    min_lr: float,
    max_lr: float,
    num_steps: int = 40,
    smoothing: float = 0.9,
    diverge_factor: float = 4.0,
    safety_factor: float = 10.0,
) -> LRProbeResult:
    r"""Run an lr range test from a copy of the training state and suggest a peak lr.

    The lr of the first param group runs from ``min_lr`` to ``max_lr`` geometrically over
    ``num_steps`` steps (the formula in the module docstring); every other group keeps its ratio
    to the first group's lr (so an excluded group's own lr, or AGVM-style per-module rates, scale
    along). Each step is ``zero_grad``, ``loss_fn(model, batch).backward()``, ``optimizer.step()``
    on the next item of ``batches``, at the target batch size. The model and the optimizer are
    restored afterwards, also when a step raises.

    Args:
        model: the model, in the mode it trains in.
        optimizer: its optimizer; its current lrs set the groups' ratios.
        batches: at least ``num_steps`` items (batches at the target batch size), each passed to
            ``loss_fn``; a finite iterable that runs out ends the probe early.
        loss_fn: ``(model, batch) -> loss``, a scalar tensor to minimise.
        min_lr: :math:`\eta_{\min} > 0`, the first group's first lr.
        max_lr: :math:`\eta_{\max} > \eta_{\min}`.
        num_steps: :math:`N \ge 2`.
        smoothing: :math:`\beta \in [0, 1)` of the loss average.
        diverge_factor: stop once the smoothed loss exceeds this multiple (> 1) of its minimum.
        safety_factor: the suggestion is the best lr divided by this (≥ 1).

    Returns:
        :class:`LRProbeResult` (lrs of the first group, raw and smoothed losses, the lr of the
        smallest smoothed loss, the suggested peak lr, whether the probe stopped on divergence).

    Raises:
        ValueError: naming the argument that is out of range, or no step could be run
            (``batches`` was empty).

    Example:
        >>> model = nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> mse = lambda m, batch: nn.functional.mse_loss(m(batch[0]), batch[1])
        >>> result = probe_lr(model, opt, [(x, y)] * 20, mse, min_lr=1e-3, max_lr=10.0, num_steps=20)
        >>> opt.param_groups[0]["lr"]  # restored
        0.1
    """
    low = _check_lr("min_lr", min_lr)
    high = _check_lr("max_lr", max_lr)
    if high <= low:
        raise ValueError(f"max_lr ({max_lr!r}) must exceed min_lr ({min_lr!r})")
    steps = check_positive_int("num_steps", num_steps)
    if steps < 2:
        raise ValueError(f"num_steps must be >= 2 (a range needs two ends), got {num_steps!r}")
    beta = check_in_range("smoothing", smoothing, 0.0, 1.0)
    if beta == 1.0:
        raise ValueError("smoothing must lie in [0, 1), got 1.0 (the average would never move)")
    diverge = check_finite_real("diverge_factor", diverge_factor)
    if diverge <= 1.0:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor!r}")
    safety = check_finite_real("safety_factor", safety_factor)
    if safety < 1.0:
        raise ValueError(f"safety_factor must be >= 1, got {safety_factor!r}")

    reference = float(optimizer.param_groups[0]["lr"])
    if not reference > 0:
        raise ValueError(f"optimizer: the first group's lr must be > 0 to set the groups' ratios, got {reference!r}")
    ratios = [float(group["lr"]) / reference for group in optimizer.param_groups]

    snapshot = _Snapshot(model, optimizer)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    diverged = False
    average = 0.0
    try:
        for n, batch in zip(range(steps), batches):
            lr = low * (high / low) ** (n / (steps - 1))
            for group, ratio in zip(optimizer.param_groups, ratios):
                _set_lr(group, lr * ratio)
            optimizer.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                diverged = True
                smoothed.append(math.inf)
                break
            average = beta * average + (1.0 - beta) * value
            smoothed.append(average / (1.0 - beta ** (n + 1)))
            if smoothed[-1] > diverge * min(smoothed):
                diverged = True
                break
    finally:
        snapshot.restore()
    if not lrs:
        raise ValueError("batches: no batch to probe with (the iterable was empty)")
    best = lrs[min(range(len(lrs)), key=smoothed.__getitem__)]
    return LRProbeResult(lrs, losses, smoothed, best, best / safety, diverged)
