"""Large-batch optimizers, each a `torch.optim.Optimizer` subclass with a functional form, and AGVM."""

from .adagrad_norm import AdaGradNorm
from .adan import Adan
from .agvm import AGVM, AGVMCommState, agvm_comm_hook, agvm_param_groups
from .lamb import LAMB
from .lars import LARS

__all__ = ["LAMB", "LARS", "Adan", "AdaGradNorm", "AGVM", "AGVMCommState", "agvm_comm_hook", "agvm_param_groups"]
