"""Parameter groups that exclude biases and normalisation parameters from decay and adaptation.

The training code of the LAMB paper (You et al. 2019: ``exclude_from_weight_decay`` and
``exclude_from_layer_adaptation`` of its BERT optimizer, ``["LayerNorm", "layer_norm", "bias"]``)
and of LARS (You, Gitman, Ginsburg 2017; the ResNet-50 recipes of Goyal et al. 2017 and of the
MLPerf LARS reference) take biases and normalisation weights out of both weight decay and the
layer-wise trust ratio: these tensors are small, their norm says little about the layer's scale,
and decaying them only hurts. :func:`param_groups` builds the groups that do so.

What an excluded tensor then gets differs between the papers' code and the implementations in use:

* LARS paper (You, Gitman, Ginsburg 2017): the local lr is defined for every layer; the paper
  does not single out biases or BatchNorm parameters.
* MLPerf reference (mlcommons/training, ResNet-50, TF2 ``LARSOptimizer``): variables whose name
  matches the ``skip_list`` (``batch_normalization``, ``bias``) get neither the trust ratio nor
  weight decay; they take momentum SGD at the global LARS lr.
* timm ``Lars``: the trust ratio is applied only where the group's ``weight_decay != 0`` (or with
  ``always_adapt``); a group without decay takes momentum SGD at the group lr. ``trust_clip`` is
  LARC's clip (ratio / lr, at most 1), ``trust_coeff`` 0.001.
* MAE (``util/lars.py``, from MoCo v3): tensors with ``ndim <= 1`` get neither decay nor the
  ratio, and step at the global lr (``blr · batch/256``, blr 0.1 for linear probing); the probe's
  head is preceded by ``BatchNorm1d(affine=False)``, so only the head's bias is excluded there.
* apex LARC: wraps any optimizer, applies its rate to every parameter with a gradient, no
  exclusion; clip mode with ``trust_coefficient`` 0.02 by default.

With η = 0.001 the LARS global lr is sized for lr · η‖w‖/‖g‖ and so one or two orders of
magnitude above an SGD lr: an excluded tensor that steps at it steps far too far.
:data:`largebatch.factory.EXCLUSION_RECIPES` offers the alternatives (adapt but do not decay; an
lr of their own, ``excluded_lr`` here; LARC's clip with an SGD-sized lr); docs/deep_scaling.md
measures them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["NORM_MODULES", "ExclusionRule", "param_groups"]

#: Module types whose parameters are normalisation parameters (``_NormBase`` covers every
#: BatchNorm, SyncBatchNorm and InstanceNorm, largebatch's GhostBatchNorm included).
NORM_MODULES: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)

#: Which parameters a rule excludes: shell-style patterns (``fnmatch``) matched against the full
#: parameter name (``"encoder.layer.0.attention.LayerNorm.weight"``), or ``(name, param) -> bool``.
ExclusionRule = Union[Sequence[str], Callable[[str, Tensor], bool]]


def _matcher(argument: str, rule: ExclusionRule | None, norm_params: set[Tensor]) -> Callable[[str, Tensor], bool]:
    """The rule as a predicate; None is the default rule (ndim ≤ 1 or a normalisation module's)."""
    if rule is None:
        return lambda name, p: p.ndim <= 1 or p in norm_params
    if callable(rule):
        return rule
    if isinstance(rule, str) or not all(isinstance(pattern, str) for pattern in rule):
        raise ValueError(
            f"{argument} must be a sequence of name patterns or a callable (name, param) -> bool, got {rule!r}"
        )
    patterns = tuple(rule)
    return lambda name, p: any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay: ExclusionRule | None = None,
    no_adaptation: ExclusionRule | None = None,
    layer_adaptation: bool = True,
    excluded_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into groups by weight decay and layer adaptation.

    A parameter that a rule excludes gets ``weight_decay=0.0`` (``no_decay``) or
    ``layer_adaptation=False`` (``no_adaptation``); every other parameter gets ``weight_decay``
    and ``layer_adaptation=True``. The default rule excludes what the LAMB and LARS papers'
    training code excludes: parameters with ``ndim <= 1`` (biases, norm scales and shifts) and
    every parameter of a normalisation module (:data:`NORM_MODULES`, e.g. a ``LayerNorm`` over a
    2-d shape). ``no_adaptation=None`` follows ``no_decay`` (as TF-Addons' LAMB does).

    Every trainable parameter lands in exactly one group; a parameter shared by two modules
    (tied weights) counts once, and parameters with ``requires_grad=False`` are left out. Groups
    are returned in the order decay+adapt, decay only, adapt only, neither, empty ones omitted;
    inside a group parameters keep ``model.named_parameters()`` order.

    Args:
        model: the model whose parameters are grouped.
        weight_decay: the decay of the non-excluded parameters (≥ 0).
        no_decay: which parameters get ``weight_decay=0.0``: ``None`` for the default rule,
            name patterns such as ``["*.bias", "*LayerNorm*"]``, or ``(name, param) -> bool``.
        no_adaptation: which parameters get ``layer_adaptation=False``; ``None`` follows
            ``no_decay``.
        layer_adaptation: set False for optimizers without layer-wise adaptation (SGD, AdamW,
            Adan, AdaGradNorm): groups then carry no ``layer_adaptation`` key and split by decay only.
        excluded_lr: an lr of their own for the groups excluded from adaptation (their ``"lr"``
            key; the other groups take the optimizer's): excluded tensors then take plain
            momentum SGD (LARS) or Adam (LAMB) at an SGD- or Adam-sized rate instead of the LARS
            global rate, which is sized for ``lr · trust ratio``. None (default) sets no lr.

    Returns:
        Param-group dicts for any ``torch.optim.Optimizer``: ``{"params", "weight_decay"}`` and,
        with ``layer_adaptation=True``, ``"layer_adaptation"`` (read by LAMB and LARS).

    Raises:
        ValueError: ``weight_decay`` is negative, a rule is neither patterns nor a callable,
            ``no_adaptation`` or ``excluded_lr`` is given with ``layer_adaptation=False``,
            ``excluded_lr`` is not a finite number ≥ 0, or ``model`` has no trainable parameter.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> [(len(g["params"]), g["weight_decay"], g["layer_adaptation"]) for g in param_groups(model, 0.01)]
        [(2, 0.01, True), (4, 0.0, False)]
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if not layer_adaptation and no_adaptation is not None:
        raise ValueError("no_adaptation is given but layer_adaptation=False: the groups carry no adaptation flag")
    if excluded_lr is not None:
        if not layer_adaptation:
            raise ValueError("excluded_lr is given but layer_adaptation=False: no group is excluded from adaptation")
        if isinstance(excluded_lr, bool) or not isinstance(excluded_lr, (int, float)) or not 0.0 <= excluded_lr < math.inf:
            raise ValueError(f"excluded_lr must be a finite number >= 0, got {excluded_lr!r}")

    norm_params = {
        p for module in model.modules() if isinstance(module, NORM_MODULES) for p in module.parameters(recurse=False)
    }
    skips_decay = _matcher("no_decay", no_decay, norm_params)
    skips_adaptation = skips_decay if no_adaptation is None else _matcher("no_adaptation", no_adaptation, norm_params)

    # (decays, adapts) -> params; the key order is the order of the returned groups.
    buckets: dict[tuple[bool, bool], list[Tensor]] = {
        (True, True): [],
        (True, False): [],
        (False, True): [],
        (False, False): [],
    }
    for name, p in model.named_parameters():  # named_parameters() yields a tied parameter once
        if not p.requires_grad:
            continue
        adapts = layer_adaptation and not skips_adaptation(name, p)
        buckets[(not skips_decay(name, p), adapts)].append(p)

    groups = []
    for (decays, adapts), params in buckets.items():
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "weight_decay": float(weight_decay) if decays else 0.0}
        if layer_adaptation:
            group["layer_adaptation"] = adapts
        if excluded_lr is not None and not adapts:
            group["lr"] = float(excluded_lr)
        groups.append(group)
    if not groups:
        raise ValueError("model has no trainable parameter (all have requires_grad=False, or there are none)")
    return groups
