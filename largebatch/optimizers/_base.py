"""What every largebatch optimizer shares.

* argument validation that names the bad argument,
* the `torch.optim.Optimizer` plumbing: closure, per-group dispatch, `__setstate__` defaults,
  fused/foreach selection and the GradScaler protocol of torch's fused optimizers,
* small tensor helpers used by the per-tensor and foreach bodies alike: fp32 norms, the
  global gradient-clipping coefficient, bias corrections that stay tensors when capturable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach, _use_grad_for_differentiable

from ._sharding import ShardReduction, complete_squares, shard_reduction, to_local

__all__ = [
    "LargeBatchOptimizer",
    "check_beta",
    "check_lr",
    "check_non_negative",
    "check_positive",
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


# --------------------------------------------------------------------------- validation


def check_lr(lr: float | Tensor) -> None:
    """`lr` is a non-negative float or a one-element tensor."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a Tensor must have one element, got shape {tuple(lr.shape)}")
        value = float(lr.detach().cpu())  # __init__ only: never inside step()
    else:
        value = lr
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid lr: {lr} (must be >= 0)")


def check_non_negative(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a number >= 0)")


def check_positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a number > 0)")


def check_beta(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1))")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be a bool)")


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


class PreparedGroup(NamedTuple):
    """One group's step inputs: [params, grads, *states, steps] as local shards, how its norms are
    completed across shard ranks, and (fused groups) its buckets with current step plans."""

    lists: list[list[Tensor]]
    reduction: ShardReduction | None
    buckets: list[Any] | None


class LargeBatchOptimizer(Optimizer):
    """Plumbing shared by LAMB, LARS, Adan and AdaGrad-Norm.

    Subclasses set `_name` and implement `_step_group` (call the functional form for one group)
    and `_init_state` (create a parameter's state at its first step); those with fused kernels
    (`_has_fused`) also implement `_group_lists` and `_fused_layout`, and every step collects all
    their groups' tensors (`_prepare_group`) before it steps any. Group keys that are
    hyper-parameters with a boolean or None default are filled in by `__setstate__`, so states
    saved by an older version load.
    """

    _name: str = "optimizer"
    #: fused kernels exist for this optimizer (the largebatch.fused engine)
    _has_fused: bool = False

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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
            self._check_fused_groups_agree()
        except (ValueError, RuntimeError):
            self.param_groups.pop()  # a rejected group must not stay half-added
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

        Subclasses extend it with their own hyper-parameters.
        """
        check_lr(group["lr"])
        for flag in ("maximize", "capturable", "differentiable"):
            check_bool(flag, group[flag])
        for flag in ("foreach", "fused"):
            if group[flag] is not None:
                check_bool(flag, group[flag])
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._setstate_defaults().items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state:
                    p_state["step"] = self._placed_step(p_state["step"], p, group)

    def _placed_step(self, step: Any, param: Tensor, group: dict[str, Any]) -> Tensor:
        """A loaded step counter where `_new_step` would put it.

        Older or foreign checkpoints store it as an int, a float or an int64 tensor, and
        `map_location` may have moved it to the wrong device; foreach grouping needs float32.
        """
        device = param.device if group["capturable"] or group["fused"] else torch.device("cpu")
        if torch.is_tensor(step) and step.device == device and step.dtype == STEP_DTYPE:
            return step
        return torch.tensor(float(step), dtype=STEP_DTYPE, device=device)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            for key in self._UNSAVED_GROUP_KEYS:
                group.pop(key, None)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        live = [{key: group[key] for key in self._LIVE_GROUP_KEYS} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keep in zip(self.param_groups, live):
            group.update(keep)
            for p in group["params"]:  # counters go where the live group keeps them
                p_state = self.state.get(p, {})
                if "step" in p_state:
                    p_state["step"] = self._placed_step(p_state["step"], p, group)

    def _setstate_defaults(self) -> dict[str, Any]:
        return {
            "shard_group": None,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
        }

    def _new_step(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """A fresh step counter: on the parameter's device when capturable or fused, else on the CPU."""
        on_device = group["capturable"] or group["fused"]
        return torch.zeros((), dtype=STEP_DTYPE, device=param.device if on_device else "cpu")

    def _params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        """The group's parameters that have a gradient, in order; RuntimeError for a sparse
        gradient or a complex parameter. C-level passes over the group: a step runs this for
        every group."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(map(_IS_SPARSE, map(_GRAD, params))):
            raise RuntimeError(f"{self._name} does not support sparse gradients")
        if any(map(torch.is_complex, params)):
            raise RuntimeError(f"{self._name} does not support complex parameters")
        return params

    def _state_lists(self, params: Sequence[Tensor], group: dict[str, Any], keys: Sequence[str]) -> list[list[Tensor]]:
        """Per key, the state tensors of `params` in order, each parameter's missing entries
        created first by `_init_state`. C-level passes over the group (a step runs this for every
        group), and the per-parameter loop only where a state is missing something."""
        states = [self.state[p] for p in params]
        try:
            return [list(map(itemgetter(key), states)) for key in keys]
        except KeyError:
            for p, state in zip(params, states):
                before = set(state)
                self._init_state(p, state, group)
                journal = getattr(self, "_new_state_entries", None)  # set while _prepare_groups runs
                if journal is not None and len(state) != len(before):
                    journal.append((state, set(state) - before))
            return [list(map(itemgetter(key), states)) for key in keys]

    def _init_state(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Create the entries of `param`'s state that are missing (lazily, at its first step)."""
        raise NotImplementedError  # every subclass that uses _state_lists defines it

    def _grad_clip_coefficients(self, prepared: Sequence[PreparedGroup | None] | None = None) -> list[Tensor | None]:
        """Per group, the global-norm clipping multiplier (None where the group sets no max_grad_norm).

        The norm is over every gradient of the optimizer, as apex and timm compute it. Sharded
        groups contribute their squares summed over the shard ranks: one all-reduce per kind of
        sharding for all their tensors together. Prepared fused groups square their gradients
        through their step plans, whose checks already covered them.
        """
        max_norms = [group.get("max_grad_norm") for group in self.param_groups]
        if all(m is None for m in max_norms):
            return [None] * len(max_norms)
        if prepared is None:
            prepared = [self._gradients_of(group) for group in self.param_groups]
        grad_scale = getattr(self, "grad_scale", None)
        local_squares: dict[Any, list[Tensor]] = {}
        for group, ready in zip(self.param_groups, prepared):
            if ready is None:
                continue
            if ready.buckets is not None:
                from largebatch.fused._norms import grad_squares

                device = ready.buckets[0].device
                square = sum(
                    (grad_squares(b.plan, b.plan.pointers[1], b.dtypes[1], grad_scale).to(device) for b in ready.buckets),
                    torch.zeros((), device=device),
                )
            else:
                norm = global_grad_norm(ready.lists[1], foreach=bool(group["foreach"]))
                if grad_scale is not None:
                    norm = norm / grad_scale.to(norm.device)
                square = norm.square()
            local_squares.setdefault(ready.reduction, []).append(square.reshape(1))
        if not local_squares:
            return [None] * len(max_norms)
        device = next(iter(local_squares.values()))[0].device
        total_square = sum(
            (complete_squares(torch.cat([s.to(device) for s in squares]), reduction).sum()
             for reduction, squares in local_squares.items()),
            torch.zeros((), device=device),
        )
        total = total_square.sqrt()
        return [None if m is None else clip_coefficient(total, m) for m in max_norms]

    def _gradients_of(self, group: dict[str, Any]) -> PreparedGroup | None:
        """The [params, grads] (local shards) and shard reduction of a group, for the clipping norm."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        return PreparedGroup([to_local(params), to_local([p.grad for p in params])], shard_reduction(params, group["shard_group"]), None)

    def _prepare_groups(self) -> list[PreparedGroup | None]:
        """`_prepare_group` for every group, all or nothing.

        State entries created for this step are taken back if any group refuses it: a step that
        fails changes nothing (a state made for a meta or float64 parameter would otherwise
        outlive `to_empty` or the dtype fix, and refuse every later step).
        """
        self._new_state_entries: list[tuple[dict[str, Any], set[str]]] = []
        try:
            return [self._prepare_group(index) for index in range(len(self.param_groups))]
        except Exception:
            for state, keys in self._new_state_entries:
                for key in keys:
                    del state[key]
            raise
        finally:
            del self._new_state_entries

    def _prepare_group(self, index: int) -> PreparedGroup | None:
        """Group `index`'s lists and shard reduction and, fused, its buckets with their step plans
        made current (every tensor checked). None when no parameter of the group has a gradient."""
        group = self.param_groups[index]
        params = self._params_with_grad(group)
        if not params:
            return None
        lists = self._group_lists(group, params)
        buckets = None
        if group["fused"]:
            from largebatch.fused._plan import planned_buckets

            buckets = planned_buckets(self._name, lists, **self._fused_layout(group), plans=self._fused_plans(index))
        return PreparedGroup(lists, shard_reduction(params, group["shard_group"]), buckets)

    def _group_lists(self, group: dict[str, Any], params: list[Tensor]) -> list[list[Tensor]]:
        """[params, grads, *states, steps] of a group's parameters with gradients, as local shards
        (what the functional form takes); missing states are created."""
        raise NotImplementedError  # every fused optimizer defines it

    def _fused_layout(self, group: dict[str, Any]) -> dict[str, int]:
        """How the fused kernels walk `_group_lists` (see largebatch.fused._plan.planned_buckets)."""
        raise NotImplementedError  # every fused optimizer defines it

    def _step_group(
        self, group: dict[str, Any], grad_clip_coef: Tensor | None, prepared: PreparedGroup | None = None
    ) -> None:
        """Step one group. Optimizers with a fused implementation get it `prepared`
        (`_prepare_group`); the others (AdaGrad-Norm) collect their tensors themselves."""
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
        if self._has_fused:  # LAMB, LARS, Adan: every group is prepared (and, fused, checked) first
            prepared = self._prepare_groups()
            for group, ready, coef in zip(self.param_groups, prepared, self._grad_clip_coefficients(prepared)):
                if ready is not None:
                    self._step_group(group, coef, ready)
        else:
            for group, coef in zip(self.param_groups, self._grad_clip_coefficients()):
                self._step_group(group, coef)
        return loss

    def _amp_args(self) -> dict[str, Tensor | None]:
        """grad_scale / found_inf that GradScaler sets on a fused optimizer before calling step()."""
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}
