"""Load optimizer states saved by timm, apex and the official Adan into largebatch's optimizers.

A run trained with timm's ``Lamb``, apex's ``FusedLAMB``, or timm's or the official
(sail-sg/Adan) ``Adan`` can be resumed with :class:`~largebatch.optimizers.LAMB` or
:class:`~largebatch.optimizers.Adan`: build ours over the same parameters, in the same groups
and order, then call the loader for the source::

    opt = LAMB(param_groups(model, 0.01))
    load_timm_lamb_state(opt, torch.load("timm_checkpoint.pt")["optimizer"])

Each loader maps the source's group hyper-parameters onto ours (so training continues with the
source's algorithm: lr, betas, eps, weight decay, clipping), keeps the settings the source has
no notion of from ``optimizer`` (``layer_adaptation``, ``maximize``, ``foreach``, ``fused``,
``capturable``, ``differentiable`` and any extra group key), and rewrites the per-parameter
state. It raises ``ValueError`` for a source option we cannot reproduce, a group or parameter
count or shape that does not match ``optimizer``, and a state that is not in the source's
layout (a second moment with negative entries).

Key mapping (the source's layout → ours)
----------------------------------------

All four sources keep one step counter per group (``group["step"]``: a Python int, or a 0-dim
tensor in recent timm ``Lamb``); ours keeps one per parameter, ``state[p]["step"]``, a 0-dim
float32 tensor. Every parameter with state gets its group's count. Parameters without state
(never given a gradient) stay without, and start from zero as they would in the source.

timm ``Lamb`` (``timm/optim/lamb.py``)::

    state  exp_avg, exp_avg_sq               → exp_avg, exp_avg_sq
    group  lr, betas, eps, weight_decay,
           bias_correction, grad_averaging,
           always_adapt, max_grad_norm        → the same keys
           trust_clip (bool: clamp r at 1)    → trust_clip = 1.0 if True else None
           caution / decoupled_decay /
           corrected_weight_decay = True      → ValueError (no equivalent)

apex ``FusedLAMB`` (``apex/optimizers/fused_lamb.py``; ``adam_w_mode`` and ``use_nvlamb`` are
attributes of the optimizer, not in its state_dict, so they are arguments of the loader)::

    state  exp_avg, exp_avg_sq               → exp_avg, exp_avg_sq
    group  lr, betas, eps, weight_decay,
           bias_correction, grad_averaging,
           max_grad_norm                      → the same keys (apex's default clips at 1.0)
    use_nvlamb argument                       → always_adapt
    (no ratio clipping in apex)               → trust_clip = None
    adam_w_mode=False argument                → ValueError (L2 inside the moments: not LAMB's update)

timm ``Adan`` (``timm/optim/adan.py``) and official ``Adan`` (sail-sg/Adan ``adan.py``); both
keep the negated previous gradient in the current layout, a plain copy in older releases::

    state  exp_avg, exp_avg_diff, exp_avg_sq → exp_avg, exp_avg_diff, exp_avg_sq
           neg_pre_grad                       → prev_grad = −neg_pre_grad
           pre_grad (older releases)          → prev_grad = pre_grad
    group  lr, betas, eps, weight_decay,
           no_prox                            → the same keys
    timm:  (no clipping)                      → max_grad_norm = None
           caution = True                     → ValueError (no equivalent)
    official: max_grad_norm (0.0 = off)       → max_grad_norm (None when 0)

Older timm ``Adan`` (the ``pre_grad`` layout) bound its buffers crosswise: the tensor stored
under ``"exp_avg_diff"`` is the second moment n and the one under ``"exp_avg_sq"`` the average
of gradient differences. :func:`load_timm_adan_state` swaps them back for that layout; the
official ``pre_grad`` layout stores them under their own names.

Small differences that remain: global clipping adds 1e-6 to the norm here (as
``torch.nn.utils.clip_grad_norm_``), where timm and apex divide by the bare norm and the
official Adan adds the group's eps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .optimizers import LAMB, Adan
from .optimizers._base import STEP_DTYPE, LargeBatchOptimizer

__all__ = [
    "load_apex_lamb_state",
    "load_official_adan_state",
    "load_timm_adan_state",
    "load_timm_lamb_state",
]

# Per source: the saved group → our hyper-parameters; the saved state of one parameter (and
# its group's step count) → our per-parameter state without "step".
GroupConverter = Callable[[Mapping[str, Any], str], dict[str, Any]]
StateConverter = Callable[[Mapping[str, Any], int, str], dict[str, Tensor]]


def _saved(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise ValueError(f"state_dict {where} has no {key!r}: not the layout this loader reads")
    return mapping[key]


def _owned(tensor: Tensor) -> Tensor:
    """A copy: the source's tensors may still belong to a live optimizer or a loaded checkpoint."""
    return tensor.detach().clone()


def _check_second_moment(tensor: Tensor, where: str) -> None:
    if bool((tensor < 0).any()):
        raise ValueError(
            f"state_dict {where}: the second moment has negative entries, so the state is not in "
            "this source's layout (e.g. an official Adan state given to the timm loader)"
        )


def _group_step(group: Mapping[str, Any]) -> int:
    """The group's step count (int or 0-dim tensor in the sources; 0 before the first step)."""
    step = group.get("step", 0)
    return int(step.item()) if isinstance(step, Tensor) else int(step)


def _load(
    optimizer: LargeBatchOptimizer,
    state_dict: Mapping[str, Any],
    convert_group: GroupConverter,
    convert_state: StateConverter,
) -> None:
    saved_groups = _saved(state_dict, "param_groups", "")
    saved_state = _saved(state_dict, "state", "")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups, the optimizer {len(optimizer.param_groups)}: "
            "build the optimizer with the same groups, in the same order, as the source"
        )
    groups, state = [], {}
    for index, (saved, current) in enumerate(zip(saved_groups, optimizer.param_groups)):
        where = f"param_groups[{index}]"
        saved_ids = _saved(saved, "params", where)
        if len(saved_ids) != len(current["params"]):
            raise ValueError(
                f"{where} has {len(saved_ids)} parameters in state_dict and {len(current['params'])} in the optimizer"
            )
        group = {key: value for key, value in current.items() if key != "params"}
        group.update(convert_group(saved, where))
        optimizer._validate_group({**group, "params": current["params"]})
        groups.append({**group, "params": list(saved_ids)})
        step = _group_step(saved)
        for position, (param_id, param) in enumerate(zip(saved_ids, current["params"])):
            if param_id not in saved_state or not saved_state[param_id]:
                continue
            param_where = f"state of {where}['params'][{position}]"
            converted = convert_state(saved_state[param_id], step, param_where)
            for key, tensor in converted.items():
                if tensor.shape != param.shape:
                    raise ValueError(
                        f"{param_where}: {key} has shape {tuple(tensor.shape)}, the parameter "
                        f"{tuple(param.shape)}: the groups or their order differ from the source's"
                    )
            _check_second_moment(converted["exp_avg_sq"], param_where)
            state[param_id] = {"step": torch.tensor(float(step), dtype=STEP_DTYPE), **converted}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _require_type(optimizer: Any, expected: type, loader: str) -> None:
    if not isinstance(optimizer, expected):
        raise TypeError(f"{loader}: optimizer must be a largebatch {expected.__name__}, got {type(optimizer).__name__}")


def _refuse_flags(saved: Mapping[str, Any], flags: tuple[str, ...], source: str, where: str) -> None:
    for flag in flags:
        if saved.get(flag, False):
            raise ValueError(f"{where}: {source}'s {flag}=True has no equivalent in largebatch")


def _betas(saved: Mapping[str, Any], where: str) -> tuple[float, ...]:
    return tuple(float(beta) for beta in _saved(saved, "betas", where))


def _lamb_group(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The hyper-parameters timm's Lamb and apex's FusedLAMB share with LAMB, under the same names."""
    return {
        "lr": _saved(saved, "lr", where),
        "betas": _betas(saved, where),
        "eps": _saved(saved, "eps", where),
        "weight_decay": _saved(saved, "weight_decay", where),
        # Both read these flags by truthiness (apex passes them to its kernel as 0/1).
        "bias_correction": bool(_saved(saved, "bias_correction", where)),
        "grad_averaging": bool(_saved(saved, "grad_averaging", where)),
        "max_grad_norm": saved.get("max_grad_norm"),
    }


def _lamb_state(saved: Mapping[str, Any], step: int, where: str) -> dict[str, Tensor]:
    return {key: _owned(_saved(saved, key, where)) for key in ("exp_avg", "exp_avg_sq")}


def load_timm_lamb_state(optimizer: LAMB, state_dict: Mapping[str, Any]) -> None:
    """Load a state_dict of timm's ``Lamb`` into a largebatch :class:`LAMB` (see the module docstring).

    ``optimizer`` must hold the source's parameters in the same groups and order.

    Raises:
        TypeError: ``optimizer`` is not a LAMB.
        ValueError: group/parameter counts or shapes differ, the state is not timm's layout, or
            it uses ``caution``, ``decoupled_decay`` or ``corrected_weight_decay``.
    """
    _require_type(optimizer, LAMB, "load_timm_lamb_state")

    def convert_group(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
        _refuse_flags(saved, ("caution", "decoupled_decay", "corrected_weight_decay"), "timm Lamb", where)
        return {
            **_lamb_group(saved, where),
            "always_adapt": bool(saved.get("always_adapt", False)),
            # timm's trust_clip is LAMBC's clamp of the ratio at 1.
            "trust_clip": 1.0 if saved.get("trust_clip", False) else None,
        }

    _load(optimizer, state_dict, convert_group, _lamb_state)


def load_apex_lamb_state(
    optimizer: LAMB,
    state_dict: Mapping[str, Any],
    *,
    use_nvlamb: bool = False,
    adam_w_mode: bool = True,
) -> None:
    """Load a state_dict of apex's ``FusedLAMB`` into a largebatch :class:`LAMB` (see the module docstring).

    Args:
        optimizer: a LAMB over the source's parameters, in the same groups and order.
        state_dict: ``FusedLAMB.state_dict()``.
        use_nvlamb: the value ``FusedLAMB`` was built with (it is not in the state_dict);
            True adapts groups with ``weight_decay=0`` too (``always_adapt=True``).
        adam_w_mode: the value ``FusedLAMB`` was built with; False (L2 added to the gradient
            before the moments) has no equivalent here and raises.

    Raises:
        TypeError: ``optimizer`` is not a LAMB.
        ValueError: ``adam_w_mode=False``, or group/parameter counts or shapes differ, or the
            state is not apex's layout.
    """
    _require_type(optimizer, LAMB, "load_apex_lamb_state")
    if not adam_w_mode:
        raise ValueError("adam_w_mode=False: FusedLAMB's L2 mode has no equivalent in largebatch's LAMB")

    def convert_group(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {**_lamb_group(saved, where), "always_adapt": bool(use_nvlamb), "trust_clip": None}

    _load(optimizer, state_dict, convert_group, _lamb_state)


def _adan_group(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The hyper-parameters timm's and the official Adan share with ours, under the same names."""
    return {
        "lr": _saved(saved, "lr", where),
        "betas": _betas(saved, where),
        "eps": _saved(saved, "eps", where),
        "weight_decay": _saved(saved, "weight_decay", where),
        "no_prox": bool(saved.get("no_prox", False)),
    }


def _adan_state(saved: Mapping[str, Any], step: int, where: str, *, crossed_pre_grad_layout: bool) -> dict[str, Tensor]:
    exp_avg = _owned(_saved(saved, "exp_avg", where))
    exp_avg_diff = _owned(_saved(saved, "exp_avg_diff", where))
    exp_avg_sq = _owned(_saved(saved, "exp_avg_sq", where))
    if "neg_pre_grad" in saved:
        prev_grad = -saved["neg_pre_grad"].detach()
    elif "pre_grad" in saved:
        prev_grad = _owned(saved["pre_grad"])
        if crossed_pre_grad_layout:
            exp_avg_diff, exp_avg_sq = exp_avg_sq, exp_avg_diff
    elif step == 0:  # buffers reset by restart_opt() and not stepped since: Δ is masked at step 1
        prev_grad = torch.zeros_like(exp_avg)
    else:
        raise ValueError(f"state_dict {where} has neither 'neg_pre_grad' nor 'pre_grad' after {step} steps")
    return {"exp_avg": exp_avg, "exp_avg_diff": exp_avg_diff, "exp_avg_sq": exp_avg_sq, "prev_grad": prev_grad}


def load_timm_adan_state(optimizer: Adan, state_dict: Mapping[str, Any]) -> None:
    """Load a state_dict of timm's ``Adan`` (current or older layout) into a largebatch :class:`Adan`.

    See the module docstring for the key mapping, including the crossed buffers of timm's
    older ``pre_grad`` layout. ``optimizer`` must hold the source's parameters in the same
    groups and order.

    Raises:
        TypeError: ``optimizer`` is not an Adan.
        ValueError: group/parameter counts or shapes differ, the state is not timm's layout, or
            it uses ``caution``.
    """
    _require_type(optimizer, Adan, "load_timm_adan_state")

    def convert_group(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
        _refuse_flags(saved, ("caution",), "timm Adan", where)
        return {**_adan_group(saved, where), "max_grad_norm": None}

    def convert_state(saved: Mapping[str, Any], step: int, where: str) -> dict[str, Tensor]:
        return _adan_state(saved, step, where, crossed_pre_grad_layout=True)

    _load(optimizer, state_dict, convert_group, convert_state)


def load_official_adan_state(optimizer: Adan, state_dict: Mapping[str, Any]) -> None:
    """Load a state_dict of the official Adan (sail-sg/Adan, current or older layout) into a largebatch :class:`Adan`.

    See the module docstring for the key mapping. ``optimizer`` must hold the source's
    parameters in the same groups and order.

    Raises:
        TypeError: ``optimizer`` is not an Adan.
        ValueError: group/parameter counts or shapes differ, or the state is not the official layout.
    """
    _require_type(optimizer, Adan, "load_official_adan_state")

    def convert_group(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
        max_grad_norm = saved.get("max_grad_norm", 0.0)
        return {**_adan_group(saved, where), "max_grad_norm": max_grad_norm if max_grad_norm > 0 else None}

    def convert_state(saved: Mapping[str, Any], step: int, where: str) -> dict[str, Tensor]:
        return _adan_state(saved, step, where, crossed_pre_grad_layout=False)

    _load(optimizer, state_dict, convert_group, convert_state)
