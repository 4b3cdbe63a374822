"""What every largebatch optimizer shares.

* argument validation that names the bad argument (ValueError), for the constructor,
  `add_param_group` and every group of a checkpoint,
* the `torch.optim.Optimizer` plumbing: closure, per-group dispatch, `__setstate__` defaults,
  fused/foreach selection and the GradScaler protocol of torch's fused optimizers,
* `state_dict`/`load_state_dict` in torch's layout and with torch's hooks, the load checked
  whole against this class's state layout before anything changes,
* small tensor helpers used by the per-tensor and foreach bodies alike: fp32 norms, the
  global gradient-clipping coefficient, bias corrections that stay tensors when capturable.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from operator import attrgetter, is_, itemgetter
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach, _use_grad_for_differentiable

from ._kahan import COMPENSATED_DTYPES, KAHAN_KEY, check_kahan_sum
from ._sharding import ShardReduction, complete_squares, is_dtensor, locals_of, shard_reduction, to_local
from ._pooling import pool_states
from ._quantised import EIGHT_BIT, dequantised, new_codes, num_blocks, quantised, scale_key
from ._state_precision import check_state_dtype, is_quantised, loaded_state, new_state

__all__ = [
    "LargeBatchOptimizer",
    "check_beta",
    "check_lr",
    "check_non_negative",
    "check_positive",
    "check_step",
    "check_same_lengths",
    "scalar_lr",
    "fp32_norm",
    "param_norm",
    "foreach_fp32_norms",
    "global_grad_norm",
    "clip_coefficient",
    "debias_factor",
    "debias_factors",
    "resolve_foreach",
]

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; we clip the same way so a
# model moved from `clip_grad_norm_(...)` + optimizer to `max_grad_norm=` trains identically.
CLIP_NORM_EPS = 1e-6
# The step counter's dtype, as torch.optim keeps it (a 0-dim float32 tensor).
STEP_DTYPE = torch.float32
_GRAD = attrgetter("grad")
_IS_SPARSE = attrgetter("is_sparse")
_DTYPE = attrgetter("dtype")


# --------------------------------------------------------------------------- validation

#: The largest hyper-parameter accepted: the step runs in float32 for fp32/bf16/fp16 parameters,
#: so a larger finite value would pass the checks and overflow to inf at step time.
FP32_MAX = torch.finfo(torch.float32).max


def _is_real_number(value: Any) -> bool:
    """A Python or numpy int or float: what torch's ops take as a scalar. Not a bool (True is no
    learning rate), and not a Fraction (torch's ops refuse it at step time)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or not isinstance(value, numbers.Rational)


def _checked_real(name: str, value: Any, condition: str) -> float:
    """`value` as a float if it is a real, finite number of float32 range (see `_is_real_number`),
    else a ValueError naming `name` and the `condition` it must meet."""
    if not _is_real_number(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number {condition})")
    number = float(value)
    if not math.isfinite(number) or abs(number) > FP32_MAX:
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and at most {FP32_MAX:.4g} in magnitude)")
    return number


def check_lr(lr: float | Tensor) -> None:
    """`lr` is a finite non-negative real number, or a one-element real tensor of any shape
    (`()`, `(1,)`, `(1, 1)`, ...: the step squeezes it, see `scalar_lr`)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a Tensor lr must have one element, got shape {tuple(lr.shape)}")
        if lr.is_complex() or lr.dtype == torch.bool:
            raise ValueError(f"Invalid lr: a Tensor lr must be real, got dtype {lr.dtype}")
        value = lr.detach().cpu().item()  # __init__ and load_state_dict only: never inside step()
    else:
        value = lr
    if not _checked_real("lr", value, ">= 0") >= 0.0:
        raise ValueError(f"Invalid lr: {lr!r} (must be >= 0)")


def check_non_negative(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _checked_real(name, value, ">= 0") >= 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a number >= 0)")


def check_positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _checked_real(name, value, "> 0") > 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a number > 0)")


def check_beta(name: str, value: float) -> None:
    if not _is_real_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1))")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be a bool)")


def check_step(value: Any, where: str) -> None:
    """A saved step count is a finite number >= 0: a number or a one-element real tensor."""
    number = value
    if isinstance(value, Tensor) and value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool):
        number = value.detach().cpu().item()
    if not _is_real_number(number) or not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{where}['step'] is {value!r}: a step count must be a finite number >= 0")


def check_same_lengths(**lists: Sequence[Any] | None) -> None:
    """The functional forms' tensor lists (None: not used) have one entry per parameter."""
    lengths = {name: len(values) for name, values in lists.items() if values is not None}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name}: {length}" for name, length in lengths.items())
        raise ValueError(f"the tensor lists must have one entry per parameter, got lengths {listed}")


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """A tensor lr of shape `(1,)` or `(1, 1)` as a 0-dim view, so that it broadcasts like a
    scalar onto any parameter (torch.optim accepts these shapes too); floats are unchanged.
    A view, so a scheduler that fills the caller's tensor in place is still seen."""
    if isinstance(lr, Tensor) and lr.dim() != 0:
        return lr.reshape(())
    return lr


# --------------------------------------------------------------------------- tensor helpers


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in float32 for fp32/bf16/fp16 tensors and in float64 for float64 ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp32_norm(tensor: Tensor) -> Tensor:
    """L2 norm accumulated in (at least) float32 whatever the tensor's dtype; 0 for an empty tensor."""
    return torch.linalg.vector_norm(tensor, dtype=norm_dtype(tensor.dtype))


def param_norm(param: Tensor) -> Tensor:
    """`fp32_norm` of a parameter that is about to be updated in place.

    Under autograd (``differentiable=True``) the norm's backward needs the values from before
    the update, so it is taken on a copy; otherwise no copy is made.
    """
    return fp32_norm(param.clone() if torch.is_grad_enabled() and param.requires_grad else param)


def foreach_fp32_norms(tensors: Sequence[Tensor]) -> Tensor:
    """`fp32_norm` of each tensor (one device and dtype), stacked into one vector."""
    tensors = list(tensors)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=norm_dtype(tensors[0].dtype)))


def global_grad_norm(grads: Sequence[Tensor], *, foreach: bool) -> Tensor:
    """L2 norm of all `grads` together, as one 0-dim tensor on the first grad's device.

    Per device the squares are summed locally; only the partial sums cross devices. Accumulates
    in float32 (float64 when any gradient is float64).
    """
    device = grads[0].device
    dtype = norm_dtype(torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32)
    if not foreach:
        squares = [fp32_norm(g).to(device=device, dtype=dtype).square() for g in grads]
        return torch.stack(squares).sum().sqrt()
    grouped = Optimizer._group_tensors_by_device_and_dtype([list(grads)])  # type: ignore[arg-type]
    partial = [
        foreach_fp32_norms(device_grads).to(dtype).square().sum().to(device)
        for (device_grads,), _ in grouped.values()
    ]
    return torch.stack(partial).sum().sqrt()


def _sum_of(tensors: Sequence[Tensor]) -> Tensor:
    """The sum of 0-dim tensors on one device; the tensor itself when there is one (the usual
    case of one group, whose step then launches nothing more)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(list(tensors)).sum()


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (total_norm + 1e-6)): the multiplier torch's `clip_grad_norm_` applies."""
    return torch.clamp(max_norm / (total_norm + CLIP_NORM_EPS), max=1.0)


def debias_factor(beta: float, step: Tensor, capturable: bool) -> float | Tensor:
    """1 − beta^t for one step counter.

    Capturable: a tensor on the counter's device (CUDA-graph safe). Otherwise the counter lives on
    the CPU, as torch.optim keeps it, so reading it is not a device synchronisation; a plain float
    is returned, which every op (foreach included) accepts whatever device the parameters are on.
    """
    if capturable:
        return 1 - beta**step
    return 1 - beta ** step.item()


def debias_factors(beta: float, steps: Sequence[Tensor], capturable: bool) -> list[Any]:
    """`debias_factor` for each counter of a foreach group (one fused pow when capturable)."""
    if capturable:
        return [1 - power for power in torch._foreach_pow(beta, list(steps))]
    return [debias_factor(beta, step, capturable) for step in steps]


def resolve_foreach(params: Sequence[Tensor], foreach: bool | None, differentiable: bool) -> bool:
    """torch's default: foreach on CUDA (and other native foreach devices), per-tensor elsewhere."""
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(list(params), differentiable, use_fused=False)
    if foreach and differentiable:
        raise RuntimeError("foreach=True does not support differentiable=True: torch._foreach ops have no autograd")
    return bool(foreach)


# --------------------------------------------------------------------------- the base class


#: Where a state saved by another optimizer goes instead of load_state_dict (named in its errors).
FOREIGN_STATES = (
    "A state saved by another optimizer loads only through largebatch.interop's loaders "
    "(load_timm_lamb_state, load_apex_lamb_state, load_timm_adan_state, load_official_adan_state), "
    "which map its layout onto this one."
)


class PreparedGroup(NamedTuple):
    """One group's step inputs: its parameters with a gradient, [params, grads, *states, steps]
    as local shards (what the functional form takes), how its norms are completed across shard
    ranks, (fused groups) its buckets with current step plans, and the parameters' Kahan
    compensation buffers (None entries for parameters without one; None when the group
    compensates none: see `_kahan_comps`)."""

    params: list[Tensor]
    lists: list[list[Tensor]]
    reduction: ShardReduction | None
    buckets: list[Any] | None
    kahan_comps: list[Tensor | None] | None = None


class LargeBatchOptimizer(Optimizer):
    """Plumbing shared by LAMB, LARS, Adan and AdaGrad-Norm.

    Subclasses set `_name` and their state layout (the `_*STATE_KEYS` below), and implement
    `_step_group` (call the functional form for one group), `_validate_group` (their
    hyper-parameters) and, where `_STATE_KEYS` does not say it all, `_init_state` (create a parameter's
    state at its first step). Those with fused kernels (`_has_fused`) also implement
    `_group_lists` and `_fused_layout`. Every step collects all groups' tensors
    (`_prepare_group`: for fused groups, every tensor checked) before it steps any. Group keys
    that are hyper-parameters with a boolean or None default are filled in by `__setstate__`, so
    pickled optimizers of an older version load.
    """

    _name: str = "optimizer"
    #: fused kernels exist for this optimizer (the largebatch.fused engine)
    _has_fused: bool = False
    #: the `kahan_sum` option exists (a KAHAN_KEY state for bf16/fp16 parameters; see `_kahan.py`)
    _has_kahan: bool = False
    #: Group keys added after checkpoints were first written: a checkpoint's group without one
    #: loads with the live group's value (a state saved before `kahan_sum` existed keeps the
    #: constructor's choice, and its parameters start with zero compensation).
    _NEWER_GROUP_KEYS: tuple[str, ...] = ("kahan_sum",)

    #: The per-parameter state `_step_group` creates: keys every non-empty state holds, keys it may
    #: hold, keys that are 0-dim (the others have the parameter's shape), and keys that are sums of
    #: squares (never negative). load_state_dict refuses anything else.
    _STATE_KEYS: tuple[str, ...] = ("step",)
    _OPTIONAL_STATE_KEYS: tuple[str, ...] = ()
    _SCALAR_STATE_KEYS: tuple[str, ...] = ("step",)
    _SQUARED_STATE_KEYS: tuple[str, ...] = ()
    #: The moment states kept in the group's ``state_dtype`` (see `_state_precision`); optimizers
    #: that have the option list them, and their groups then hold a validated ``state_dtype``.
    _PRECISION_STATE_KEYS: tuple[str, ...] = ()
    #: Those of them kept block-quantised under ``state_dtype="8bit"`` (see `_quantised`): codes
    #: under the key, scales under `scale_key(key)`; int8 codes, uint8 for `_SQUARED_STATE_KEYS`.
    _QUANTISED_STATE_KEYS: tuple[str, ...] = ()
    #: How many parameters' states `_fill_states` has added entries to (a fused group pools its
    #: states when a step made some: `largebatch.optimizers._pooling`).
    _states_created: int = 0
    #: LAMB and LARS: why no group is adapted and what to do, when that is the case (warned once,
    #: at construction); None for optimizers without layer adaptation.
    _NO_ADAPTATION_ADVICE: str | None = None

    #: Group keys that describe this run's process setup, not the optimisation: a ProcessGroup
    #: cannot be pickled and is different in the next run. Left out of state_dict().
    _UNSAVED_GROUP_KEYS = ("shard_group",)
    #: Group keys that choose how this optimizer runs (which implementation, where the step
    #: counters live): load_state_dict() keeps the live values rather than the checkpoint's, so a
    #: checkpoint written by a fused optimizer does not silently make a plain one fused.
    _LIVE_GROUP_KEYS = ("shard_group", "fused", "foreach", "capturable", "differentiable")

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        # shard_group: set per group to a ProcessGroup when the group's tensors are flat shards
        # (see _sharding.py); DTensor parameters need nothing.
        defaults = {**defaults, "shard_group": None}
        # Optimizer.__init__ sends every group through add_param_group, which validates it.
        super().__init__(params, defaults)
        if any(group["fused"] for group in self.param_groups):
            # GradScaler hands us grad_scale/found_inf instead of unscaling first (torch's protocol).
            self._step_supports_amp_scaling = True
        self._warn_if_no_group_adapts()

    def _group_adapts(self, group: dict[str, Any]) -> bool:
        """Whether the group's step uses the layer-wise trust ratio (LAMB and LARS override it)."""
        return True

    def _warn_if_no_group_adapts(self) -> None:
        if self._NO_ADAPTATION_ADVICE is not None and not any(map(self._group_adapts, self.param_groups)):
            warnings.warn(f"{self._name} adapts no param group: {self._NO_ADAPTATION_ADVICE}", UserWarning, stacklevel=4)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
            self._check_fused_groups_agree()
        except BaseException:
            self.param_groups.pop()  # a rejected group is never kept, whatever the error
            raise

    def _check_fused_groups_agree(self) -> None:
        """Refuse fused and non-fused groups in one optimizer.

        GradScaler asks the optimizer as a whole whether it unscales in its step
        (`_step_supports_amp_scaling`, true when a group is fused): it then hands grad_scale and
        found_inf to every group, which only the fused kernels can apply, so a mixed optimizer
        would update its fused groups and then fail in the others, half a step.
        """
        kinds = {bool(group["fused"]) for group in self.param_groups}
        if len(kinds) > 1:
            raise ValueError(
                f"{self._name}: fused=True and fused=False/None param groups cannot share one optimizer (under "
                "GradScaler a fused optimizer unscales inside its step, which only the fused groups can do); set "
                "fused the same way for every group, or use two optimizers"
            )

    def _fused_plans(self, index: int) -> Any:
        """The fused step plans of param group `index` (a largebatch.fused PlanCache).

        They live with the optimizer, one cache per group, and survive `load_state_dict` and
        `add_param_group`: a plan's layout depends only on the parameters' sizes, and its checks
        at every step see loaded state tensors as moved rows to upload (or refuse them).
        `copy.deepcopy` and pickling leave them out (torch's __getstate__ keeps only defaults,
        state and param_groups), so a copy builds its own.
        """
        from largebatch.fused._plan import PlanCache

        caches = self.__dict__.setdefault("_fused_plan_caches", [])
        while len(caches) <= index:
            caches.append(PlanCache())
        return caches[index]

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming any bad hyper-parameter of a (defaults-merged) group.

        Subclasses extend it with their own hyper-parameters. Called for every group added and
        for every group of a checkpoint being loaded.
        """
        check_lr(group["lr"])
        if self._has_kahan:
            check_kahan_sum(group["kahan_sum"])
        for flag in ("maximize", "capturable", "differentiable"):
            check_bool(flag, group[flag])
        for flag in ("foreach", "fused"):
            if group[flag] is not None:
                check_bool(flag, group[flag])
        if "max_grad_norm" not in self.defaults and group.get("max_grad_norm") is not None:
            raise ValueError(
                f"Invalid max_grad_norm: {self._name} does not clip gradients (only LAMB and Adan do); "
                "call torch.nn.utils.clip_grad_norm_ before step() instead"
            )
        if self._PRECISION_STATE_KEYS:
            group["state_dtype"] = check_state_dtype(group["state_dtype"])  # a name becomes its dtype
            self._check_quantised_group(group)
        shard_group = group["shard_group"]
        if shard_group is not None and not (dist.is_available() and isinstance(shard_group, dist.ProcessGroup)):
            raise ValueError(f"Invalid shard_group: {shard_group!r} (must be a torch.distributed ProcessGroup or None)")
        if group["fused"]:
            if not self._has_fused:
                raise RuntimeError(f"{self._name} has no fused implementation; use fused=None or False")
            if group["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot both be True")
            if group["differentiable"]:
                raise RuntimeError("`fused` does not support `differentiable`")
            from largebatch.fused import check_fused_supported

            # Meta parameters (deferred initialisation, then `model.to_empty(...)`) are accepted
            # here, as torch's fused optimizers accept them; step() checks the real tensors.
            check_fused_supported([p for p in group["params"] if not p.is_meta])

    def _check_quantised_group(self, group: dict[str, Any]) -> None:
        """8-bit states go with unsharded parameters only, and not with ``differentiable``:
        autograd has no derivative through the rounding, and a block of a shard is not a block
        of its parameter."""
        if not is_quantised(group):
            return
        if group["differentiable"]:
            raise ValueError(
                f"Invalid state_dtype={EIGHT_BIT!r} with differentiable=True: rounding to 8-bit codes has no derivative; "
                "use differentiable=False, or state_dtype=torch.bfloat16 / torch.float32 / None"
            )
        if group["shard_group"] is not None:
            raise ValueError(
                f"Invalid state_dtype={EIGHT_BIT!r} with a shard_group: the blocks of a flat shard are not "
                "those of its parameter; use state_dtype=torch.bfloat16 for sharded parameters"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._setstate_defaults().items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state:
                    p_state["step"] = self._placed_step(p_state["step"], p, group)

    def __deepcopy__(self, memo: dict[int, Any]) -> LargeBatchOptimizer:
        """The default deepcopy (through `__getstate__`/`__setstate__`), except that a group's
        ProcessGroup is shared, not copied: it is a handle to the job's communicator (and cannot
        be pickled)."""
        for group in self.param_groups:
            for key in self._UNSAVED_GROUP_KEYS:
                if group.get(key) is not None:
                    memo[id(group[key])] = group[key]
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def _placed_step(self, step: Any, param: Tensor, group: dict[str, Any]) -> Tensor:
        """A loaded step counter where `_new_step` would put it.

        Older or foreign checkpoints store it as an int, a float or an int64 tensor, and
        `map_location` may have moved it to the wrong device; foreach grouping needs float32.
        """
        device = param.device if group["capturable"] or group["fused"] else torch.device("cpu")
        if torch.is_tensor(step) and step.device == device and step.dtype == STEP_DTYPE:
            return step
        return torch.tensor(float(step), dtype=STEP_DTYPE, device=device)

    # ----------------------------------------------------------------------- checkpoints

    @torch._disable_dynamo  # as torch.optim's: bookkeeping, never traced
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's `state_dict`, without the group keys of this process's setup (`shard_group`).

        They are left out before the post-hooks run, so a hook sees (and can `torch.save`)
        exactly what is returned.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._packed_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _packed_state_dict(self) -> dict[str, Any]:
        """torch's layout: parameters numbered in group order, state keyed by those numbers."""
        numbers_by_id: dict[int, int] = {}
        groups, start = [], 0
        for group in self.param_groups:
            for offset, p in enumerate(group["params"]):
                numbers_by_id.setdefault(id(p), start + offset)
            start += len(group["params"])
            packed = {k: v for k, v in group.items() if k != "params" and k not in self._UNSAVED_GROUP_KEYS}
            packed["params"] = [numbers_by_id[id(p)] for p in group["params"]]
            groups.append(packed)
        state = {(numbers_by_id[id(k)] if isinstance(k, Tensor) else k): v for k, v in self.state.items()}
        return {"state": state, "param_groups": groups}

    @torch._disable_dynamo  # as torch.optim's: bookkeeping, never traced
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """torch's `load_state_dict`, with the whole checkpoint checked before anything changes.

        Runs the load pre-hooks, checks what they return (group and parameter counts, this
        class's state keys, state shapes equal to the parameters', step counts finite and >= 0,
        sums of squares >= 0, every group's hyper-parameters through the constructor's checks),
        then replaces the state and groups at once and runs the post-hooks. The live groups keep
        their `_LIVE_GROUP_KEYS`. State tensors are copied onto the parameter's device, floating
        ones in its dtype (torch's policy; `_loaded_value` says where a subclass differs).

        Raises:
            ValueError: saying what is wrong; the optimizer is then unchanged. A state saved by
                another optimizer is refused: see `largebatch.interop`.
        """
        state_dict = dict(state_dict)  # the pre-hooks may edit it: not the caller's dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups = self._loaded(state_dict)
        for group in groups:
            if group["fused"]:
                with_state = [p for p in group["params"] if state.get(p)]
                pool_states(with_state, [state[p] for p in with_state])
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded(self, state_dict: Mapping[str, Any]) -> tuple[defaultdict[Tensor, dict[str, Any]], list[dict[str, Any]]]:
        """The state and param groups `state_dict` gives this optimizer, checked and built
        without touching it (see `load_state_dict`)."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (an optimizer's state_dict())")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this {self._name} {len(self.param_groups)}"
            )
        groups = []
        owners: dict[Any, tuple[Tensor, dict[str, Any]]] = {}
        for index, (saved, live) in enumerate(zip(saved_groups, self.param_groups)):
            group = self._loaded_group(saved, live, f"state_dict param_groups[{index}]")
            owners.update((saved_id, (param, group)) for saved_id, param in zip(saved["params"], group["params"]))
            groups.append(group)
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for saved_id, saved_param_state in saved_state.items():
            if saved_id not in owners:
                raise ValueError(f"state_dict state has an entry for parameter {saved_id!r}, which no param group lists")
            param, group = owners[saved_id]
            self._check_param_state(saved_param_state, param, group, f"state_dict state[{saved_id!r}]")
            state[param] = self._loaded_param_state(saved_param_state, param, group)
        return state, groups

    def _loaded_group(self, saved: Any, live: dict[str, Any], where: str) -> dict[str, Any]:
        """A saved group made into a live one: its hyper-parameters (copied, and checked as the
        constructor checks them) with the live group's params and `_LIVE_GROUP_KEYS`."""
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise ValueError(f"{where} is not a param group (a dict with 'params')")
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(
                f"{where} has {len(saved['params'])} parameters, this {self._name}'s group {len(live['params'])}"
            )
        missing = [
            key for key in self.defaults
            if key not in saved and key not in self._LIVE_GROUP_KEYS and key not in self._NEWER_GROUP_KEYS
        ]  # fmt: skip
        if missing:
            raise ValueError(
                f"{where} has no {', '.join(map(repr, missing))}: it was not saved by {self._name}. {FOREIGN_STATES}"
            )
        group = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params" and k not in self._LIVE_GROUP_KEYS}
        group.update({key: live[key] for key in self._LIVE_GROUP_KEYS}, params=live["params"])
        for key in self._NEWER_GROUP_KEYS:
            if key in self.defaults and key not in saved:
                group[key] = live[key]
        if "param_names" in live and "param_names" not in group:
            group["param_names"] = live["param_names"]
        try:
            self._validate_group(group)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        return group

    def _check_param_state(self, saved: Any, param: Tensor, group: dict[str, Any], where: str) -> None:
        """One parameter's saved state has this class's layout (see `_STATE_KEYS`) and sane values."""
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where} is a {type(saved).__name__}, not a dict of state")
        if not saved:
            return  # a parameter that never had a gradient
        allowed = self._STATE_KEYS + self._OPTIONAL_STATE_KEYS + tuple(map(scale_key, self._QUANTISED_STATE_KEYS))
        unknown = [key for key in saved if key not in allowed]
        missing = [key for key in self._STATE_KEYS if key not in saved]
        if unknown or missing:
            found = ", ".join(f"{kind} {keys}" for kind, keys in (("unknown keys", unknown), ("no", missing)) if keys)
            raise ValueError(
                f"{where} has {found}: a {self._name} state holds {list(allowed)}, so it was not saved by "
                f"{self._name}. {FOREIGN_STATES}"
            )
        for key, value in saved.items():
            if key == "step":
                check_step(value, where)
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}[{key!r}] is a {type(value).__name__}, not a tensor")
            if key in self._scale_keys():
                self._check_scales(saved, key, value, param, where)
                continue
            if key in self._QUANTISED_STATE_KEYS:
                self._check_codes(saved, key, value, where)
            expected = () if key in self._SCALAR_STATE_KEYS else tuple(param.shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"{where}[{key!r}] has shape {tuple(value.shape)}, its parameter needs {expected}")
            if key in self._SQUARED_STATE_KEYS and not bool((to_local([value])[0] >= 0).all()):
                raise ValueError(f"{where}[{key!r}] has negative or NaN entries: a sum of squares is >= 0")

    def _scale_keys(self) -> dict[str, str]:
        """The state keys of per-block scales, and the key of the codes each belongs to."""
        return {scale_key(key): key for key in self._QUANTISED_STATE_KEYS}

    def _check_codes(self, saved: Mapping[str, Any], key: str, value: Tensor, where: str) -> None:
        """A quantised state's codes come with their scales, in the dtype of their code map; an
        unquantised state is floating-point."""
        signed_dtype = torch.uint8 if key in self._SQUARED_STATE_KEYS else torch.int8
        if scale_key(key) in saved and value.dtype != signed_dtype:
            raise ValueError(f"{where}[{key!r}] has 8-bit scales but dtype {value.dtype}: its codes must be {signed_dtype}")
        if scale_key(key) not in saved and not value.is_floating_point():
            raise ValueError(
                f"{where}[{key!r}] has dtype {value.dtype} without {scale_key(key)!r}: a state is floating-point, "
                "or 8-bit codes with their per-block scales"
            )

    def _check_scales(self, saved: Mapping[str, Any], key: str, value: Tensor, param: Tensor, where: str) -> None:
        """A quantised state's scales: float32, one per block of its parameter, finite and >= 0."""
        codes_key = self._scale_keys()[key]
        if codes_key not in saved:
            raise ValueError(f"{where} has {key!r} but no {codes_key!r}: scales without their codes")
        expected = (num_blocks(param.numel()),)
        if value.dtype != torch.float32 or tuple(value.shape) != expected:
            raise ValueError(
                f"{where}[{key!r}] is {value.dtype} of shape {tuple(value.shape)}: the scales of an 8-bit "
                f"state are float32, one per block, shape {expected}"
            )
        if not bool(torch.isfinite(value).all() and (value >= 0).all()):
            raise ValueError(f"{where}[{key!r}] has negative or non-finite entries: a scale is a block's absmax")

    def _loaded_param_state(self, saved: Mapping[str, Any], param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """One parameter's checked saved state, copied (`_loaded_value`), its quantised states
        converted to the group's option: 8-bit codes and scales copied as they are, or
        dequantised for an fp32/bf16 group; floating states of another option quantised for an
        8-bit group."""
        scale_keys = self._scale_keys()
        loaded: dict[str, Any] = {}
        for key, value in saved.items():
            if key in scale_keys:
                continue
            if key not in self._QUANTISED_STATE_KEYS:
                loaded[key] = self._loaded_value(key, value, param, group)
                continue
            scales = saved.get(scale_key(key))
            if is_quantised(group) and scales is not None:
                codes = torch.empty(value.shape, dtype=value.dtype, device=param.device)  # contiguous
                loaded[key], loaded[scale_key(key)] = codes.copy_(value), scales.to(param.device, copy=True)
            elif is_quantised(group):
                signed = key not in self._SQUARED_STATE_KEYS
                loaded[key], loaded[scale_key(key)] = quantised(value.to(param.device), signed)
            elif scales is not None:
                loaded[key] = loaded_state(dequantised(value, scales), param, group)
            else:
                loaded[key] = loaded_state(value, param, group)
        return loaded

    def _loaded_value(self, key: str, value: Any, param: Tensor, group: dict[str, Any]) -> Tensor:
        """A checked state entry, copied where this optimizer keeps it: the step counter where
        `_new_step` puts it, other tensors on the parameter's device, in its dtype when it is
        floating-point (torch's policy; the moments of `_PRECISION_STATE_KEYS` in the group's
        ``state_dtype``, which converts a checkpoint of another option). Never the checkpoint's
        own tensor: states are updated in place."""
        if key == "step":
            step = self._placed_step(value, param, group)
            return step.clone() if step is value else step
        if key in self._PRECISION_STATE_KEYS:
            return loaded_state(value, param, group)
        dtype = param.dtype if param.is_floating_point() else value.dtype
        return value.to(device=param.device, dtype=dtype, copy=True)

    def _setstate_defaults(self) -> dict[str, Any]:
        defaults = {
            "shard_group": None,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
        }
        if self._has_kahan:
            defaults["kahan_sum"] = None
        return defaults

    def _new_step(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """A fresh step counter: on the parameter's device when capturable or fused, else on the CPU."""
        on_device = group["capturable"] or group["fused"]
        return torch.zeros((), dtype=STEP_DTYPE, device=param.device if on_device else "cpu")

    def _params_with_grad(self, group: dict[str, Any], *, check: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have a gradient, in order, and those gradients; with
        `check`, `_check_params_and_grads` of them. C-level passes over the group (a step runs
        this for every group; `.grad` of a Parameter is read once)."""
        all_params = group["params"]
        all_grads = list(map(_GRAD, all_params))
        if any(map(is_, all_grads, repeat(None))):
            params = [p for p, g in zip(all_params, all_grads) if g is not None]
            grads = [g for g in all_grads if g is not None]
        else:  # the usual case: every parameter has a gradient
            params, grads = list(all_params), all_grads
        if check:
            self._check_params_and_grads(params, grads)
        return params, grads

    def _check_params_and_grads(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """RuntimeError for a sparse gradient or a complex parameter."""
        if any(map(_IS_SPARSE, grads)):
            raise RuntimeError(f"{self._name} does not support sparse gradients")
        if any(dtype.is_complex for dtype in set(map(_DTYPE, params))):
            raise RuntimeError(f"{self._name} does not support complex parameters")

    def _prepared(self, group: dict[str, Any], plans: Any) -> PreparedGroup | None:
        """The PreparedGroup of `group`'s parameters with a gradient (None when it has none):
        `_group_lists`, the Kahan buffers and, for a fused group, its buckets with their step
        plans made current (every tensor checked; `plans` the owner's PlanCache, None to plan
        for this call only).

        A fused group's plan checks every tensor's dtype and layout, and refuses a sparse gradient
        (no data pointer) or a complex parameter (no kernel dtype), so their passes run only
        when the plan refuses something: then they come first, for the same error as the other
        paths."""
        fused = group["fused"]
        params, grads = self._params_with_grad(group, check=not fused)
        if not params:
            return None
        try:
            created = self._states_created
            lists = self._group_lists(group, params, grads)
            comps = self._kahan_comps(params, group)
            if fused and self._states_created != created:  # new states: pooled, then gathered again
                pool_states(params, list(map(self.state.__getitem__, params)))
                lists = self._group_lists(group, params, grads)
                comps = self._kahan_comps(params, group)
            buckets = None
            if fused:
                from largebatch.fused._blockwise import quantised_lists
                from largebatch.fused._compensated import compensated_buckets

                scales = list(self._scale_lists(params).values()) if is_quantised(group) else []
                bucket_lists, layout = quantised_lists(lists, self._fused_layout(group), scales)
                buckets = compensated_buckets(self._name, bucket_lists, comps, **layout, plans=plans)
        except Exception:
            if fused:
                self._check_params_and_grads(params, grads)
            raise
        return PreparedGroup(params, lists, shard_reduction(params, group["shard_group"]), buckets, comps)

    def _state_lists(self, params: Sequence[Tensor], group: dict[str, Any], keys: Sequence[str]) -> list[list[Tensor]]:
        """Per key, the state tensors of `params` in order, each parameter's missing entries
        created first by `_init_state`. C-level passes over the group (a step runs this for every
        group), and the per-parameter loop only where a state is missing something."""
        states = list(map(self.state.__getitem__, params))
        try:
            lists = [list(map(itemgetter(key), states)) for key in keys]
        except KeyError:
            self._fill_states(params, states, group)
            lists = [list(map(itemgetter(key), states)) for key in keys]
        if self._QUANTISED_STATE_KEYS and not (group["fused"] and not is_quantised(group)):
            self._check_states_match_option(group, keys, lists)
        return lists

    def _check_states_match_option(self, group: dict[str, Any], keys: Sequence[str], lists: list[list[Tensor]]) -> None:
        """The quantised keys' states are 8-bit codes exactly when the group's option is "8bit":
        a group whose ``state_dtype`` was edited in place to or from "8bit" still holds the
        other kind, which only load_state_dict converts (ValueError, before anything steps).

        A fused group that is not 8-bit skips this (its step plan refuses integer states with
        the fused dtype error, and it runs every step: one C-level pass per key otherwise)."""
        quantised_group = is_quantised(group)
        for key, values in zip(keys, lists):
            if key not in self._QUANTISED_STATE_KEYS:
                continue
            floating = list(map(Tensor.is_floating_point, values))
            if any(floating) if quantised_group else not all(floating):
                raise ValueError(
                    f"Invalid state_dtype={group['state_dtype']!r} for states {key!r} kept "
                    f"{'in floating point' if quantised_group else 'as 8-bit codes'}: the option of a group with states "
                    "was changed in place; to convert them, load a state_dict after the change "
                    "(optimizer.load_state_dict(optimizer.state_dict()))"
                )

    def _fill_states(self, params: Sequence[Tensor], states: Sequence[dict[str, Any]], group: dict[str, Any]) -> None:
        """`_init_state` for each parameter, the entries it creates noted in the journal of
        `_prepare_groups` (taken back if the step is refused)."""
        journal = getattr(self, "_new_state_entries", None)  # set while _prepare_groups runs
        for p, state in zip(params, states):
            before = set(state)
            self._init_state(p, state, group)
            if len(state) != len(before):
                self._states_created += 1
                if journal is not None:
                    journal.append((p, state, set(state) - before))

    def _compensates(self, param: Tensor, group: dict[str, Any]) -> bool:
        """Whether `param` has a Kahan compensation buffer: a bf16/fp16 parameter of a group whose
        kahan_sum is not False (see largebatch.optimizers._kahan)."""
        return self._has_kahan and group["kahan_sum"] is not False and param.dtype in COMPENSATED_DTYPES

    def _init_state(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Create the entries of `param`'s state that are missing (lazily, at its first step):
        here the step counter and, for every other key of `_STATE_KEYS`, zeros like the parameter
        (in the group's ``state_dtype`` for `_PRECISION_STATE_KEYS`); and its zero compensation
        buffer where it has one (`_compensates`)."""
        if "step" not in state:
            state["step"] = self._new_step(param, group)
        for key in self._STATE_KEYS:
            if key in self._QUANTISED_STATE_KEYS and key not in state and is_quantised(group):
                self._init_quantised(param, state, key)
            elif key in self._PRECISION_STATE_KEYS and key not in state:
                state[key] = new_state(param, group)  # zeros in the group's state_dtype
            elif key not in state:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if KAHAN_KEY not in state and self._compensates(param, group):
            state[KAHAN_KEY] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _init_quantised(self, param: Tensor, state: dict[str, Any], key: str) -> None:
        """Zero 8-bit codes and scales for state `key` of `param` (see `_quantised`)."""
        if is_dtensor(param):
            raise ValueError(
                f"Invalid state_dtype={EIGHT_BIT!r} for a DTensor parameter: the blocks of a local shard are not "
                "those of its parameter; use state_dtype=torch.bfloat16 for sharded parameters"
            )
        state[key], state[scale_key(key)] = new_codes(param, signed=key not in self._SQUARED_STATE_KEYS)

    def _state_scales(self, group: dict[str, Any], params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """For an 8-bit group that is not fused, the functional form's ``<key>_scales`` lists of
        `params` (in the state since `_group_lists`); nothing otherwise (a fused group's buckets
        carry its scales: `_prepared`)."""
        if group["fused"] or not is_quantised(group):
            return {}
        return self._scale_lists(params)

    def _scale_lists(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """``<key>_scales``: the scales of each quantised state `params` have, in
        `_QUANTISED_STATE_KEYS` order."""
        states = list(map(self.state.__getitem__, params))
        keys = [key for key in self._QUANTISED_STATE_KEYS if key in states[0]]
        return {f"{key}_scales": list(map(itemgetter(scale_key(key)), states)) for key in keys}

    def _kahan_comps(self, params: list[Tensor], group: dict[str, Any]) -> list[Tensor | None] | None:
        """Per parameter its compensation buffer (local shard), None for those without one; None
        when the group compensates no parameter. Missing buffers are created (zeros: a state
        loaded from a checkpoint saved before kahan_sum existed starts uncompensated)."""
        if not self._has_kahan or group["kahan_sum"] is False:
            return None
        dtypes = set(map(_DTYPE, params))
        if dtypes.isdisjoint(COMPENSATED_DTYPES):
            return None
        states = list(map(self.state.__getitem__, params))
        if dtypes.issubset(COMPENSATED_DTYPES):
            try:
                return to_local(list(map(itemgetter(KAHAN_KEY), states)))
            except KeyError:
                pass
        self._fill_states(params, states, group)
        return to_local([state.get(KAHAN_KEY) if p.dtype in COMPENSATED_DTYPES else None for p, state in zip(params, states)])

    def _grad_clip_coefficients(self, prepared: Sequence[PreparedGroup | None]) -> list[Tensor | None]:
        """Per group, the global-norm clipping multiplier (None where the group sets no max_grad_norm).

        The norm is over every gradient of the optimizer (`prepared`: per group, its gradients,
        None where it has none), as apex and timm compute it. Sharded groups contribute their
        squares summed over the shard ranks: one all-reduce per kind of sharding for all their
        tensors together. Fused groups square their gradients through their step plans, whose
        checks already covered them; when none is sharded, the coefficients come from one launch
        each (`largebatch.fused._norms.clip_coefficients`).
        """
        max_norms = [group.get("max_grad_norm") for group in self.param_groups]
        if all(m is None for m in max_norms):
            return [None] * len(max_norms)
        grad_scale = getattr(self, "grad_scale", None)
        ready_groups = [ready for ready in prepared if ready is not None]
        if not ready_groups:
            return [None] * len(max_norms)
        if all(ready.buckets is not None and ready.reduction is None for ready in ready_groups):
            from largebatch.fused._norms import clip_coefficients

            buckets = [None if ready is None else ready.buckets for ready in prepared]
            return clip_coefficients(buckets, max_norms, grad_scale, CLIP_NORM_EPS)
        local_squares: dict[Any, list[Tensor]] = {}
        for group, ready in zip(self.param_groups, prepared):
            if ready is None:
                continue
            if ready.buckets is not None:
                from largebatch.fused._norms import grad_squares

                device = ready.buckets[0].device
                square = _sum_of([
                    grad_squares(b.plan, b.plan.pointers[1], b.dtypes[1], grad_scale).sum().to(device)
                    for b in ready.buckets
                ])  # fmt: skip
            else:
                norm = global_grad_norm(ready.lists[1], foreach=bool(group["foreach"]))
                if grad_scale is not None:
                    norm = norm / grad_scale.to(norm.device)
                square = norm.square()
            local_squares.setdefault(ready.reduction, []).append(square)
        device = next(iter(local_squares.values()))[0].device
        total_square = _sum_of([
            squares[0].to(device) if reduction is None and len(squares) == 1
            else complete_squares(torch.stack([s.to(device) for s in squares]), reduction).sum()
            for reduction, squares in local_squares.items()
        ])  # fmt: skip
        total = total_square.sqrt()
        return [None if m is None else clip_coefficient(total, m) for m in max_norms]

    def _prepare_groups(self) -> list[PreparedGroup | None]:
        """`_prepare_group` for every group, all or nothing.

        State entries created for this step are taken back if any group refuses it: a step that
        fails changes nothing (a state made for a meta or float64 parameter would otherwise
        outlive `to_empty` or the dtype fix, and refuse every later step).
        """
        self._new_state_entries: list[tuple[Tensor, dict[str, Any], set[str]]] = []
        try:
            return [self._prepare_group(index) for index in range(len(self.param_groups))]
        except Exception:
            for param, state, keys in self._new_state_entries:
                for key in keys:
                    del state[key]
                if not state:  # made empty by this step's lookup: no entry, as before it
                    self.state.pop(param, None)
            raise
        finally:
            del self._new_state_entries

    def _prepare_group(self, index: int) -> PreparedGroup | None:
        """Group `index`'s lists and shard reduction and, fused, its buckets with their step plans
        made current (every tensor checked). None when no parameter of the group has a gradient."""
        group = self.param_groups[index]
        return self._prepared(group, self._fused_plans(index) if group["fused"] else None)

    def _group_lists(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[list[Tensor]]:
        """[params, grads, *states, steps] of a group's parameters with gradients, as local shards
        (what the functional form takes); missing states are created. Here [params, grads]: what
        the clipping norm needs, for optimizers that collect their states in `_step_group`."""
        return locals_of(params, grads)

    def _fused_layout(self, group: dict[str, Any]) -> dict[str, int]:
        """How the fused kernels walk `_group_lists` (see largebatch.fused._plan.planned_buckets)."""
        raise NotImplementedError  # every fused optimizer defines it

    def _step_group(self, group: dict[str, Any], prepared: PreparedGroup, grad_clip_coef: Tensor | None) -> None:
        """Step one group, `prepared` by `_prepare_group` (its parameters with a gradient: never none)."""
        raise NotImplementedError  # every subclass defines it

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        An optimizer with a fused implementation collects every group's tensors first and, when
        fused, checks every tensor of every group before it changes any (a refused step raises and
        changes nothing, step counters included), then steps each group.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is collected, and its gradients checked (sparse, complex; for fused groups
        # every tensor), before the global clipping norm reads them and before any group steps.
        prepared = self._prepare_groups()
        for group, ready, coef in zip(self.param_groups, prepared, self._grad_clip_coefficients(prepared)):
            if ready is not None:
                self._step_group(group, ready, coef)
        return loss

    def _amp_args(self) -> dict[str, Tensor | None]:
        """grad_scale / found_inf that GradScaler sets on a fused optimizer before calling step()."""
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}

    # ----------------------------------------------------------------------- one parameter alone

    def _step_param_alone(self, index: int, param: Tensor, plans: Any = None) -> bool:
        """Step `param` of param group `index` by itself, as `step()` steps it; False (and nothing
        changed) when it has no gradient. For largebatch.memory's gradient release.

        The group's own `_step_group` runs on a copy of the group whose params are `[param]`:
        the group's hyper-parameters as they are now (so LR schedulers' edits are seen) and its
        per-tensor, foreach or fused body (`plans`: this parameter's fused PlanCache, None to
        plan for this call only). The same update as a whole step only for optimizers whose
        update of one tensor needs nothing from the others, and without global clipping: the
        caller refuses the rest (no clipping coefficient is passed).
        """
        alone = {**self.param_groups[index], "params": [param]}
        prepared = self._prepared(alone, plans)
        if prepared is None:
            return False
        self._step_group(alone, prepared, None)
        return True
