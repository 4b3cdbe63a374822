"""largebatch: train with very large batches in PyTorch."""

from .optimizers import LAMB, LARS, AdaGradNorm, Adan

__all__ = ["LAMB", "LARS", "Adan", "AdaGradNorm"]
__version__ = "0.1.0"
