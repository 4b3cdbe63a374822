"""Neural-network layers for large-batch training."""

from .ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, convert_to_ghost_batchnorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "convert_to_ghost_batchnorm"]
