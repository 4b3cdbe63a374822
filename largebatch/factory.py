"""`create_optimizer`: an optimizer by name, with sensible groups and a batch-size-scaled lr.

Modelled on timm's ``create_optimizer_v2``: name the optimizer, hand over the model, and get
the groups of :func:`largebatch.grouping.param_groups` (biases and normalisation
parameters out of weight decay; for LAMB and LARS, what else they get is the ``exclusion``
recipe, :data:`EXCLUSION_RECIPES`). Given the batch size the lr was tuned at
and the one trained at, the lr is scaled by the rule suited to the optimizer
(:func:`largebatch.schedules.suggest_scaling_rule`: linear for SGD and LARS, square root for
the adaptive ones) and the choice is logged on the ``largebatch.factory`` logger.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from .optimizers import LAMB, LARS, AdaGradNorm, Adan
from .optimizers.agvm import AGVM, MODULE_KEY
from .grouping import ExclusionRule, param_groups
from .schedules import scale_lr, suggest_scaling_rule

__all__ = ["AGVM_PREFIX", "DEFAULT_EXCLUSION", "EXCLUSION_RECIPES", "LARC_TRUST_COEFFICIENT", "OPTIMIZERS", "create_optimizer"]

logger = logging.getLogger(__name__)

#: The names :func:`create_optimizer` accepts (case-insensitive), and each one's class.
OPTIMIZERS: Mapping[str, type[Optimizer]] = {
    "lamb": LAMB,
    "lars": LARS,
    "adan": Adan,
    "adagradnorm": AdaGradNorm,
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}

#: How LAMB and LARS treat the tensors excluded from decay (biases, normalisation parameters):
#:
#: * ``"exclude"``: not decayed and not adapted: plain momentum SGD (LARS) or Adam (LAMB) at the
#:   optimizer's global lr. What the LAMB paper's BERT code, the MLPerf LARS reference, timm and
#:   MAE do. For LARS the global lr is sized for ``lr · trust ratio`` (η = 0.001), so these
#:   tensors step at a rate one or two orders of magnitude above the rest.
#: * ``"adapt"``: not decayed, but adapted by their own trust ratio like every other tensor
#:   (LAMB: ``always_adapt=True``, since a group without decay is otherwise never adapted).
#: * ``"separate_lr"``: not decayed, not adapted, at an lr of their own, ``excluded_lr``
#:   (scaled with ``lr`` by the same batch-size rule).
#: * ``"clip"`` (LARS only): LARC's clip mode (``trust_clip=True``: rate min(η‖w‖/‖g‖, lr)) with
#:   an SGD-sized ``lr``, so the excluded tensors' plain SGD step is SGD-sized too; η defaults to
#:   :data:`LARC_TRUST_COEFFICIENT`, apex LARC's.
EXCLUSION_RECIPES: tuple[str, ...] = ("exclude", "adapt", "separate_lr", "clip")

#: The recipe each layer-adaptive optimizer gets when ``exclusion`` is None, from
#: ``python -m largebatch.experiments.deep_scaling`` (docs/deep_scaling.md).
DEFAULT_EXCLUSION: Mapping[str, str] = {"LARS": "adapt", "LAMB": "exclude"}

#: apex LARC's default trust coefficient, used by the ``"clip"`` recipe unless one is given.
LARC_TRUST_COEFFICIENT = 0.02

#: ``"agvm-<name>"`` wraps the optimizer ``<name>`` of :data:`OPTIMIZERS` in :class:`AGVM`.
AGVM_PREFIX = "agvm-"


def _resolve_name(name: str) -> tuple[type[Optimizer], bool]:
    """The optimizer class a name stands for, and whether it is wrapped in AGVM."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {name!r}")
    key = name.lower()
    wrapped = key.startswith(AGVM_PREFIX)
    base = key[len(AGVM_PREFIX) :] if wrapped else key
    if base not in OPTIMIZERS:
        valid = ", ".join(OPTIMIZERS)
        raise ValueError(
            f"name: unknown optimizer {name!r}; valid names are {valid}, "
            f"and {AGVM_PREFIX}<any of these> (e.g. {AGVM_PREFIX}lamb) for AGVM around it"
        )
    return OPTIMIZERS[base], wrapped


def _constructor_default(cls: type[Optimizer], argument: str) -> Any:
    return inspect.signature(cls).parameters[argument].default


def _has_layer_adaptation(cls: type[Optimizer]) -> bool:
    return "layer_adaptation" in inspect.signature(cls).parameters


def _split_by_top_level_module(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split each group by the top-level child of ``model`` its parameters belong to.

    AGVM measures one gradient variance per module (backbone, neck, heads: the model's
    top-level children); each resulting group carries that child's name under AGVM's module
    key. Modules come in registration order, so the first (the reference) is the first child.
    A parameter registered on ``model`` itself is a module of its own, named after it.
    """
    owner: dict[nn.Parameter, str] = {}
    for name, p in model.named_parameters():
        owner.setdefault(p, name.split(".", 1)[0])
    split = []
    for module in dict.fromkeys(owner.values()):
        for group in groups:
            params = [p for p in group["params"] if owner[p] == module]
            if params:
                split.append({**group, "params": params, MODULE_KEY: module})
    return split


def _resolve_exclusion(
    cls: type[Optimizer],
    adapts: bool,
    exclusion: str | None,
    excluded_lr: float | None,
    exclude_from_adaptation: ExclusionRule | None,
    model_or_params: Any,
) -> str | None:
    """The exclusion recipe to apply (None for an optimizer without layer adaptation), checked."""
    if not adapts:
        if exclusion is not None or excluded_lr is not None:
            argument = "exclusion" if exclusion is not None else "excluded_lr"
            raise ValueError(f"{argument}: {cls.__name__} has no layer-wise adaptation, so nothing is excluded from it")
        return None
    if exclusion is not None and exclusion not in EXCLUSION_RECIPES:
        raise ValueError(f"exclusion must be one of {', '.join(EXCLUSION_RECIPES)}, got {exclusion!r}")
    given = exclusion is not None
    recipe = exclusion if given else DEFAULT_EXCLUSION.get(cls.__name__, "exclude")
    if not isinstance(model_or_params, nn.Module):
        if given or excluded_lr is not None:
            raise ValueError(
                "exclusion/excluded_lr need an nn.Module (names to match); with parameters or groups, "
                "set layer_adaptation, weight_decay and lr per group yourself"
            )
        return None
    if recipe == "clip" and cls is LAMB:
        raise ValueError("exclusion='clip' is LARC's clip mode, for LARS only; LAMB's trust_clip bounds r instead")
    if recipe == "adapt" and given and exclude_from_adaptation is not None:
        raise ValueError("exclude_from_adaptation is given with exclusion='adapt', which adapts every tensor")
    if recipe == "separate_lr" and excluded_lr is None:
        raise ValueError("excluded_lr: exclusion='separate_lr' needs the excluded tensors' own lr")
    if recipe != "separate_lr" and excluded_lr is not None:
        raise ValueError(f"excluded_lr is given but exclusion is {recipe!r}; it is used by 'separate_lr' only")
    if recipe == "adapt" and exclude_from_adaptation is not None:
        return "exclude"  # the default recipe gives way to the user's own adaptation rule
    return recipe


def create_optimizer(
    model_or_params: nn.Module | ParamsT,
    name: str,
    lr: float | None = None,
    *,
    batch_size: int | None = None,
    base_batch_size: int | None = None,
    scaling_rule: str | float | None = None,
    weight_decay: float | None = None,
    exclude_from_decay: ExclusionRule | None = None,
    exclude_from_adaptation: ExclusionRule | None = None,
    exclusion: str | None = None,
    excluded_lr: float | None = None,
    agvm_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Optimizer:
    r"""Create an optimizer by name.

    With batch sizes given, the lr tuned at ``base_batch_size`` is scaled to ``batch_size``:

    .. math::
        \text{lr} = \text{lr}_0 \cdot (B / B_0)^k, \qquad k = 1 \text{ (linear) or } 1/2 \text{ (sqrt)},

    the rule being ``scaling_rule`` or, if None, the one
    :func:`~largebatch.schedules.suggest_scaling_rule` suggests for the optimizer (linear for SGD
    and LARS: Goyal et al. 2017; square root for AdamW, LAMB, Adan, AdaGradNorm: Krizhevsky 2014,
    You et al. 2019). The scaled lr and the rule are logged at INFO level.

    Given an ``nn.Module``, its trainable parameters are grouped by
    :func:`~largebatch.grouping.param_groups`: parameters with ``ndim <= 1`` and those of
    normalisation layers get ``weight_decay=0`` and, for LAMB and LARS, what ``exclusion`` says
    (``"exclude"``: ``layer_adaptation=False``; ``"adapt"``: their own trust ratio; ...).
    For ``"agvm-<name>"`` the groups are further split by the model's top-level children, the
    modules whose learning rates AGVM modulates (the first child is its reference).

    Args:
        model_or_params: an ``nn.Module``, or what any ``torch.optim`` optimizer accepts (tensors,
            named parameters, group dicts), passed on unchanged.
        name: ``"lamb"``, ``"lars"``, ``"adan"``, ``"adagradnorm"``, ``"sgd"``, ``"adamw"``
            (case-insensitive), or ``"agvm-<one of these>"``.
        lr: the learning rate (at ``base_batch_size`` when batch sizes are given); None keeps the
            optimizer's default.
        batch_size: the batch size trained at; give it with ``base_batch_size``.
        base_batch_size: the batch size ``lr`` was tuned at.
        scaling_rule: ``"linear"``, ``"sqrt"``, an exponent, or ``"measured"`` (the optimizer's
            exponent in :data:`~largebatch.schedules.MEASURED_EXPONENTS`); None picks the
            optimizer's rule from its paper.
        weight_decay: the decay of the decayed parameters; None keeps the optimizer's default.
        exclude_from_decay: which parameters of a model skip decay (see ``param_groups``'s
            ``no_decay``); None is the default rule, ``()`` excludes nothing.
        exclude_from_adaptation: which skip layer adaptation (LAMB, LARS only); None follows
            ``exclude_from_decay`` (recipes ``"exclude"``, ``"separate_lr"``, ``"clip"``) or
            excludes nothing (``"adapt"``).
        exclusion: LAMB and LARS only: how the tensors excluded from decay are trained, one of
            :data:`EXCLUSION_RECIPES` (``"exclude"``, ``"adapt"``, ``"separate_lr"``,
            ``"clip"``); None is :data:`DEFAULT_EXCLUSION` for the optimizer (LARS ``"adapt"``,
            LAMB ``"exclude"``). Needs an ``nn.Module``.
        excluded_lr: the excluded tensors' own lr for ``exclusion="separate_lr"`` (at
            ``base_batch_size`` when batch sizes are given, then scaled like ``lr``).
        agvm_kwargs: keyword arguments of :class:`~largebatch.optimizers.agvm.AGVM` (``interval``,
            ``start_step``, ...) for ``"agvm-<name>"``; kept apart because AGVM and the base
            optimizer share argument names (``momentum``, ``eps``).
        **kwargs: further arguments of the optimizer (``betas``, ``momentum``, ``fused``, ...).

    Returns:
        The optimizer (an :class:`AGVM` around it for ``"agvm-<name>"``).

    Raises:
        ValueError: an unknown ``name`` (the message lists the valid ones); only one of
            ``batch_size``/``base_batch_size``; batch sizes without ``lr``; ``scaling_rule``
            without batch sizes; exclusions with plain parameters, or adaptation exclusions for
            an optimizer without layer adaptation; ``agvm_kwargs`` for a name without AGVM; an
            unknown ``exclusion``, one for an optimizer without layer adaptation or with plain
            parameters, ``"clip"`` for LAMB, ``"adapt"`` with ``exclude_from_adaptation``;
            ``excluded_lr`` missing for ``"separate_lr"`` or given for another recipe.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> opt = create_optimizer(model, "lamb", lr=1e-3, batch_size=4096, base_batch_size=256)
        >>> opt.param_groups[0]["lr"]  # 1e-3 * sqrt(4096 / 256)
        0.004
    """
    cls, wrapped = _resolve_name(name)
    if agvm_kwargs is not None and not wrapped:
        raise ValueError(f"agvm_kwargs is given but name {name!r} does not start with {AGVM_PREFIX!r}")

    adapts = _has_layer_adaptation(cls)
    if exclude_from_adaptation is not None and not adapts:
        raise ValueError(f"exclude_from_adaptation: {cls.__name__} has no layer-wise adaptation to exclude from")
    recipe = _resolve_exclusion(cls, adapts, exclusion, excluded_lr, exclude_from_adaptation, model_or_params)

    if (batch_size is None) != (base_batch_size is None):
        raise ValueError("batch_size and base_batch_size must be given together (or neither)")
    if batch_size is not None:
        if lr is None:
            raise ValueError("lr: give the learning rate tuned at base_batch_size for it to be scaled to batch_size")
        if scaling_rule == "measured":
            rule = suggest_scaling_rule(cls, source="measured")
        else:
            rule = scaling_rule if scaling_rule is not None else suggest_scaling_rule(cls)
        scaled = scale_lr(lr, batch_size, base_batch_size, rule)
        logger.info(
            "create_optimizer(%r): lr %g at batch %d scaled to %g at batch %d by the %s rule%s",
            name,
            lr,
            base_batch_size,
            scaled,
            batch_size,
            rule,
            " (given)" if scaling_rule is not None else f" (suggested for {cls.__name__})",
        )
        lr = scaled
        if excluded_lr is not None:
            excluded_lr = scale_lr(excluded_lr, batch_size, base_batch_size, rule)
    elif scaling_rule is not None:
        raise ValueError("scaling_rule is given without batch_size and base_batch_size")

    if recipe == "adapt":
        exclude_from_adaptation = ()
        if cls is LAMB:  # LAMB adapts a group without decay only with always_adapt
            kwargs.setdefault("always_adapt", True)
    elif recipe == "clip":
        kwargs["trust_clip"] = True
        kwargs.setdefault("trust_coefficient", LARC_TRUST_COEFFICIENT)
    if isinstance(model_or_params, nn.Module):
        decay = weight_decay if weight_decay is not None else _constructor_default(cls, "weight_decay")
        params: Any = param_groups(
            model_or_params,
            decay,
            no_decay=exclude_from_decay,
            no_adaptation=exclude_from_adaptation,
            layer_adaptation=adapts,
            excluded_lr=excluded_lr,
        )
        if wrapped:
            params = _split_by_top_level_module(model_or_params, params)
    else:
        if exclude_from_decay is not None or exclude_from_adaptation is not None:
            raise ValueError(
                "exclude_from_decay/exclude_from_adaptation need an nn.Module (names to match); "
                "with parameters or groups, set weight_decay and layer_adaptation per group yourself"
            )
        params = model_or_params
        if weight_decay is not None:
            kwargs["weight_decay"] = weight_decay

    if lr is not None:
        kwargs["lr"] = lr
    optimizer = cls(params, **kwargs)
    if wrapped:
        return AGVM(optimizer, **(agvm_kwargs or {}))
    return optimizer
