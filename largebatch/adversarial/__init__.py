"""Adversarial training for large batches: ConAdv (Liu et al., ICLR 2022)."""

from .conadv import NORMS, ConAdv, ConAdvLosses

__all__ = ["NORMS", "ConAdv", "ConAdvLosses"]
