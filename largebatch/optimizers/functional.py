"""Functional forms of the optimizers, as `torch.optim` exposes `adamw(...)`.

Each applies one step, in place, to lists of tensors and their states; the classes call them.
"""

from .adagrad_norm import adagrad_norm
from .adan import adan
from .lamb import lamb
from .lars import lars

__all__ = ["adagrad_norm", "adan", "lamb", "lars"]
