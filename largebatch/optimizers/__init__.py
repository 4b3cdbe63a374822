"""Large-batch optimizers, each a `torch.optim.Optimizer` subclass with a functional form."""

from .adagrad_norm import AdaGradNorm
from .adan import Adan
from .lamb import LAMB
from .lars import LARS

__all__ = ["LAMB", "LARS", "Adan", "AdaGradNorm"]
