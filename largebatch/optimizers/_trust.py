"""The layer-wise trust ratio, written once for LAMB and LARS (and the fused kernels' oracle).

    r = coefficient · ‖x‖ / (‖u‖ + weight_decay · ‖x‖ + eps),   r = 1 where ‖x‖ = 0 or ‖u‖ = 0,
    r ← min(r, max_ratio) when max_ratio is given.

LAMB (You et al. 2019): u is the Adam update with decay folded in, coefficient 1, no weight_decay
term, no eps. LARS (You et al. 2017): u is the raw gradient, coefficient η, the weight decay
term and eps in the denominator.

The inputs are fp32 norms (0-dim for one tensor, or a vector for a foreach group); the result is
a tensor of the same shape, computed without any host synchronisation (`torch.where`, not `if`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["trust_ratio"]


def trust_ratio(
    param_norm: Tensor,
    update_norm: Tensor,
    *,
    coefficient: float = 1.0,
    weight_decay: float = 0.0,
    eps: float = 0.0,
    max_ratio: float | None = None,
) -> Tensor:
    """Layer-wise trust ratio r (see the module docstring), elementwise over the given norms.

    Terms that are 0 (or a factor 1) are left out: on one tensor's 0-dim norms each op is a
    dispatch, and a per-tensor step makes this call for every tensor.
    """
    adaptable = torch.minimum(param_norm, update_norm) > 0  # the norms are >= 0 (NaN: not adaptable)
    denominator = update_norm
    if weight_decay != 0:
        denominator = denominator + weight_decay * param_norm
    if eps != 0:
        denominator = denominator + eps
    if torch.is_grad_enabled():
        # A safe denominator where the ratio is not used keeps autograd (differentiable=True) free of 0/0.
        denominator = torch.where(adaptable, denominator, 1.0)
    numerator = param_norm if coefficient == 1 else coefficient * param_norm
    ratio = torch.where(adaptable, numerator / denominator, 1.0)
    if max_ratio is not None:
        ratio = torch.clamp(ratio, max=max_ratio)
    return ratio
