"""largebatch: train with very large batches in PyTorch."""

from .batching import AdaptiveBatchSize, GrowingBatchSampler
from .nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, convert_to_ghost_batchnorm
from .optimizers import LAMB, LARS, AdaGradNorm, Adan
from .schedules import (
    BatchSizeCoupledLR,
    LinearWarmup,
    PowerScheduler,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    WarmupStableDecay,
    adapt_regime,
    scale_lr,
    suggest_scaling_rule,
)

__all__ = [
    # optimizers
    "LAMB",
    "LARS",
    "Adan",
    "AdaGradNorm",
    # batch-size rules and schedules
    "scale_lr",
    "suggest_scaling_rule",
    "adapt_regime",
    "BatchSizeCoupledLR",
    "LinearWarmup",
    "WarmupPolynomialDecay",
    "WarmupCosineDecay",
    "WarmupStableDecay",
    "PowerScheduler",
    # adaptive batch size (AdAdaGrad)
    "AdaptiveBatchSize",
    "GrowingBatchSampler",
    # Ghost BatchNorm
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "convert_to_ghost_batchnorm",
]
__version__ = "0.1.0"
