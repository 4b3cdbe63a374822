"""Adversarial training for large batches: ConAdv (Liu et al., ICLR 2022)."""

from .batchnorm import AuxiliaryBatchNorm, convert_to_auxiliary_batchnorm
from .conadv import BATCHNORMS, NORMS, ConAdv, ConAdvLosses

__all__ = ["BATCHNORMS", "NORMS", "AuxiliaryBatchNorm", "ConAdv", "ConAdvLosses", "convert_to_auxiliary_batchnorm"]
