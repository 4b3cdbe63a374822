"""largebatch: train with very large batches in PyTorch."""

from .adversarial import ConAdv
from .batching import AdaptiveBatchSize, GrowingBatchSampler
from .factory import create_optimizer
from .interop import load_apex_lamb_state, load_official_adan_state, load_timm_adan_state, load_timm_lamb_state
from .nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, convert_to_ghost_batchnorm
from .optimizers import AGVM, LAMB, LARS, AdaGradNorm, Adan, AGVMCommState, agvm_comm_hook, agvm_param_groups
from .grouping import param_groups
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
    "AGVM",
    "AGVMCommState",
    "agvm_comm_hook",
    "agvm_param_groups",
    # building optimizers and loading foreign states
    "create_optimizer",
    "param_groups",
    "load_timm_lamb_state",
    "load_apex_lamb_state",
    "load_timm_adan_state",
    "load_official_adan_state",
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
    # adversarial training for large batches
    "ConAdv",
]
__version__ = "0.1.0"
