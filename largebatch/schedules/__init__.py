"""Batch-size-aware learning rates: scaling rules, warmup and decay schedules, regime adaptation.

* :func:`scale_lr`, :func:`suggest_scaling_rule`: the linear (Goyal et al. 2017) and square-root
  (Krizhevsky 2014) rules.
* :class:`BatchSizeCoupledLR`: rescales the lr whenever the batch size changes.
* :class:`LinearWarmup`, :class:`WarmupPolynomialDecay`, :class:`WarmupCosineDecay`,
  :class:`WarmupStableDecay`, :class:`PowerScheduler`: chainable ``LRScheduler`` subclasses.
* :func:`probe_lr`: an lr range test at the target batch that suggests the peak lr.
* :func:`adapt_regime`: Hoffer et al. 2017's "train longer" adaptation of a step regime.
"""

from .batch_coupled import BatchSizeCoupledLR
from .regime import Regime, adapt_regime
from .lr_probe import LRProbeResult, probe_lr
from .rules import MEASURED_EXPONENTS, SCALING_RULES, scale_lr, scaling_exponent, suggest_scaling_rule
from .schedulers import (
    DECAY_SHAPES,
    LinearWarmup,
    PowerScheduler,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    WarmupStableDecay,
)

__all__ = [
    "DECAY_SHAPES",
    "MEASURED_EXPONENTS",
    "SCALING_RULES",
    "BatchSizeCoupledLR",
    "LRProbeResult",
    "LinearWarmup",
    "PowerScheduler",
    "Regime",
    "WarmupCosineDecay",
    "WarmupPolynomialDecay",
    "WarmupStableDecay",
    "adapt_regime",
    "probe_lr",
    "scale_lr",
    "scaling_exponent",
    "suggest_scaling_rule",
]
