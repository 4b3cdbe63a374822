r"""AGVM: adaptive gradient variance modulation around any optimizer.

Xue et al., "Large-batch Optimization for Dense Visual Predictions" (NeurIPS 2022); the
official code is the mmcv hook ``AgvmOptimizerHook`` of Sense-X/AGVM (multi-GPU only).

Detectors and segmenters are built of modules (backbone, neck, heads) whose gradient
variances differ widely; at large batch one learning rate destabilises some of them. AGVM
gives module :math:`i` a learning-rate multiplier :math:`s_i` from the variance of its
gradient relative to a reference module (the backbone). With two independent estimates
:math:`g_{A,i}, g_{B,i}` of module :math:`i`'s gradient (means over two disjoint halves of
the batch), flattened over all of the module's parameters:

.. math::
    d_i &= 1 - \cos(g_{A,i}, g_{B,i}) \\
    r_i &= \sqrt{\operatorname{clamp}\!\left(
           \frac{d_\text{ref} + \epsilon}{d_i + \epsilon}, c_\text{lo}, c_\text{hi}\right)} \\
    s_i &\leftarrow \mu\, s_i + (1 - \mu)\, r_i, \qquad s_i^{(0)} = 1

and the base optimizer steps with every group's ``lr`` multiplied by its module's
:math:`s_i`; the ``lr`` values are restored afterwards, so LR schedulers see their own values.
With ``use_adam`` (Adam-family base optimizers) each gradient is first divided elementwise
by :math:`\sqrt{\beta_2 v + (1 - \beta_2) g^2} + \text{eps}`, with :math:`v` the base
optimizer's ``exp_avg_sq`` state and eps the group's ``eps``, as the official hook does.

Defaults follow the official hook: ``interval=5`` (``lr_update_interval``),
``start_step=500`` (``lr_update_start_iter``, after warmup), ``momentum=0.97``,
``clamp=(0.5, 10.0)``, ``eps=1e-6``, the first module (``param_groups[0]``) as reference.
Differences from the official code, each deliberate:

- the normaliser under ``use_adam`` uses the step's global mean gradient :math:`g` (the one
  the base optimizer's own update divides by) for both halves; the official hook uses each
  half's own gradient. This keeps :math:`d_i` independent of a common gradient scale, so
  gradients still scaled by a ``GradScaler`` give the same factors as unscaled ones.
- measurements happen at steps ``start_step + k·interval`` (the official hook: multiples of
  ``interval`` at or after ``start_step``; the same steps with the defaults).
- after ``stop_step`` the factors stay frozen and keep applying; the official hook returns
  to the plain learning rates there, a jump in every module's rate.
- ``static=True`` freezes the factors but keeps applying them (e.g. factors loaded from a
  checkpoint); the official ``static_lr`` switches AGVM off.
- one process is supported, with :meth:`AGVM.backward_halves`.

Before ``start_step`` the base optimizer steps with its own learning rates.

AGVM's own state lives in the base optimizer's param groups, the one place besides the
per-parameter state that every checkpoint route keeps, ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (flattened or not) included: each
group carries its module's name (``"agvm_module"``), the module's factor :math:`s_i`
(``"agvm_scale_factor"``) and AGVM's step count (``"agvm_num_steps"``).
"""

import fnmatch
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._agvm_comm import AGVMCommState, agvm_comm_hook
from ._sharding import shard_reduction, to_local

__all__ = [
    "AGVM",
    "AGVMCommState",
    "agvm_comm_hook",
    "agvm_param_groups",
    "agvm_scale_targets",
]

MODULE_KEY = "agvm_module"
"""Param-group key naming the module a group belongs to (groups sharing it share one s_i)."""

SCALE_KEY = "agvm_scale_factor"
"""Param-group key holding the factor s_i of the group's module (equal in all its groups)."""

STEPS_KEY = "agvm_num_steps"
"""Param-group key holding how many steps AGVM has taken (equal in every group)."""

_MEASURE_DTYPE = torch.float64

# torch.nn.functional.cosine_similarity's default eps: a module whose half gradient is zero
# gets cosine 0 (d = 1) rather than a division by zero.
_COSINE_EPS = 1e-8


def agvm_scale_targets(
    disagreements: Sequence[float],
    reference: int,
    eps: float = 1e-6,
    clamp: tuple[float, float] = (0.5, 10.0),
) -> list[float]:
    r"""The target factors :math:`r_i = \sqrt{\mathrm{clamp}((d_\text{ref}+\epsilon)/(d_i+\epsilon))}`.

    A NaN :math:`d_i` (a module without gradient on this step) gives a NaN :math:`r_i`.
    """
    low, high = clamp
    d_ref = disagreements[reference]
    return [math.sqrt(min(max((d_ref + eps) / (d + eps), low), high)) for d in disagreements]


def agvm_param_groups(
    model: nn.Module,
    patterns: Mapping[str, str | Sequence[str]] | None = None,
    *,
    weight_decay: float | None = None,
    no_decay: Callable[[str, Tensor], bool] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for AGVM, one module per top-level child or per name pattern.

    Each group carries ``"agvm_module": name``; AGVM gives all groups of one module a single
    factor. Parameters with ``requires_grad=False`` are left out.

    Args:
        model: the model.
        patterns: module name → shell-style pattern(s) (``fnmatch``) matched against full
            parameter names, e.g. ``{"backbone": "backbone.*", "heads": ["cls.*", "box.*"]}``.
            The first module is AGVM's default reference. ``None``: one module per top-level
            child of ``model`` that has trainable parameters, in registration order.
        weight_decay: if given, each module is split into a decay group with this
            ``weight_decay`` and a no-decay group with ``weight_decay=0.0``; ``None`` leaves
            ``weight_decay`` to the optimizer's default.
        no_decay: ``(name, param) -> bool``, which parameters skip decay; default: those with
            ``ndim <= 1`` (biases and normalisation weights).

    Raises:
        ValueError: a parameter matching two modules or none, a module matching no
            parameter, or (without ``patterns``) a parameter registered on ``model`` itself.
    """
    if weight_decay is not None and weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if patterns is None:
        # Children without trainable parameters (activations, pooling) are not modules here.
        children = [
            name for name, child in model.named_children() if any(p.requires_grad for p in child.parameters())
        ]
        patterns = {child: f"{child}.*" for child in children}
    patterns = {
        module: [pats] if isinstance(pats, str) else list(pats) for module, pats in patterns.items()
    }
    if not patterns:
        raise ValueError("patterns is empty (or model has no children): no module to build")

    members: dict[str, list[tuple[str, Tensor]]] = {module: [] for module in patterns}
    for name, p in named:
        matches = [
            module
            for module, pats in patterns.items()
            if any(fnmatch.fnmatchcase(name, pat) for pat in pats)
        ]
        if len(matches) > 1:
            raise ValueError(f"parameter {name!r} matches several modules: {matches}")
        if not matches:
            raise ValueError(f"parameter {name!r} matches no module in patterns")
        members[matches[0]].append((name, p))
    empty = [module for module, params in members.items() if not params]
    if empty:
        raise ValueError(f"modules {empty} match no trainable parameter")

    skips_decay = no_decay if no_decay is not None else (lambda name, p: p.ndim <= 1)
    groups: list[dict[str, Any]] = []
    for module, params in members.items():
        if weight_decay is None:
            groups.append({"params": [p for _, p in params], MODULE_KEY: module})
            continue
        decay = [p for name, p in params if not skips_decay(name, p)]
        plain = [p for name, p in params if skips_decay(name, p)]
        for chosen, wd in ((decay, weight_decay), (plain, 0.0)):
            if chosen:
                groups.append({"params": chosen, "weight_decay": wd, MODULE_KEY: module})
    return groups


def _second_moment_beta(group: Mapping[str, Any]) -> float:
    """The β of the ``exp_avg_sq`` update, read from the group's ``betas``.

    Adam-family groups hold ``(β1, β2)``: β2. Adan holds ``(β1, β2, β3)`` for its moment,
    gradient-difference and second-moment averages: β3.
    """
    betas = group["betas"]
    if len(betas) == 2:
        return float(betas[1])
    if len(betas) == 3:
        return float(betas[2])
    raise ValueError(f"use_adam: cannot read the second-moment beta from betas={betas}")


class AGVM(Optimizer):
    r"""Adaptive gradient variance modulation wrapping any optimizer (SGD, AdamW, LAMB, …).

    See the module docstring for the equations. ``param_groups`` and ``state`` are the base
    optimizer's own (live), so LR schedulers, ``GradScaler`` and ``zero_grad`` act on it.

    Each module is one or more param groups of the base optimizer, all sharing one factor:

    - ``modules=None``: groups carrying an ``"agvm_module"`` key (see
      :func:`agvm_param_groups`) form the module that key names; every other group is a
      module of its own, named ``"param_groups[i]"``. Modules are ordered by first group.
    - ``modules={name: params}``: the modules in that order; every base parameter must be in
      exactly one module and every group's parameters in a single module.

    A group added later with :meth:`add_param_group` joins the module its ``"agvm_module"``
    key names, or becomes a new module; a new module starts at factor 1.

    Two gradient estimates per measuring step come from one of:

    - DDP: ``comm_state`` shared with :func:`agvm_comm_hook` (two halves of the ranks);
    - one process: :meth:`backward_halves` with two losses over two halves of the batch.

    Under ``GradScaler``: ``scaler.step(agvm)`` unscales the grads and calls :meth:`step`
    only when they are finite, so a skipped step neither counts nor changes the factors.

    Checkpoints: every param group carries ``"agvm_module"``, ``"agvm_scale_factor"`` (its
    module's :math:`s_i`) and ``"agvm_num_steps"``, so ``state_dict()`` is the base's own and
    ``torch.distributed.checkpoint`` keeps AGVM's state with it; a base optimizer loaded from
    such a checkpoint continues it when wrapped again. A step at lr 0 with all-zero gradients
    and no base state yet, how ``torch.distributed.checkpoint`` creates a fresh optimizer's
    state, is passed to the base but not counted.

    Args:
        base_optimizer: the optimizer to wrap.
        modules: optional mapping module name → parameters (see above).
        interval: measure every ``interval`` steps (official default 5).
        start_step: first step (0-based count of ``step()`` calls) that measures and applies
            the factors (official default 500, after warmup).
        stop_step: last step that may measure (inclusive); later steps apply the factors as
            they are then. ``None``: measure to the end.
        momentum: μ of the factors' moving average (official 0.97).
        clamp: bounds of the variance ratio before the square root (official (0.5, 10)).
        eps: added to both :math:`d_\text{ref}` and :math:`d_i` (official 1e-6).
        use_adam: normalise gradients by the base's second moment first; ``None`` infers it:
            True when every group has ``betas`` (and any existing state has ``exp_avg_sq``).
        reference: the reference module, by index or name (default: the first).
        static: never measure; the factors stay as they are (1, or as loaded) and still apply.
        comm_state: the :class:`AGVMCommState` of :func:`agvm_comm_hook`, under DDP.
    """

    # GradScaler must unscale the grads itself and skip step() on inf/NaN (see class doc).
    _step_supports_amp_scaling = False

    def __init__(
        self,
        base_optimizer: Optimizer,
        modules: Mapping[str, Iterable[Tensor]] | None = None,
        interval: int = 5,
        start_step: int = 500,
        stop_step: int | None = None,
        momentum: float = 0.97,
        clamp: tuple[float, float] = (0.5, 10.0),
        eps: float = 1e-6,
        use_adam: bool | None = None,
        *,
        reference: int | str = 0,
        static: bool = False,
        comm_state: AGVMCommState | None = None,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)}")
        if isinstance(base_optimizer, AGVM):
            raise ValueError("base_optimizer is already an AGVM")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step}")
        if stop_step is not None and (not isinstance(stop_step, int) or stop_step < start_step):
            raise ValueError(f"stop_step must be None or an int >= start_step, got {stop_step}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if len(clamp) != 2 or not 0.0 < clamp[0] <= clamp[1]:
            raise ValueError(f"clamp must be (low, high) with 0 < low <= high, got {clamp}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        for i, group in enumerate(base_optimizer.param_groups):
            # Flat shards stepped by hand: AGVM never sees how their gradients were made, so it
            # cannot obtain two halves of them. Refuse rather than measure shards as if whole.
            if group.get("shard_group") is not None:
                raise ValueError(
                    f"base_optimizer.param_groups[{i}] sets shard_group: AGVM supports one process, DDP "
                    "(agvm_comm_hook) and FSDP2 (DTensor parameters), not hand-made flat shards"
                )
        all_params = [p for group in base_optimizer.param_groups for p in group["params"]]
        # FSDP2 (DTensor parameters): the cosine sums are completed across the shard ranks.
        self._shard_reduction = shard_reduction(all_params)
        if self._shard_reduction is not None and comm_state is not None:
            raise ValueError("comm_state (the DDP comm hook) does not apply to FSDP2/DTensor parameters")

        # Not Optimizer.__init__: it would build new param groups and a new state, while the
        # wrapper's are the base's. These are the attributes Optimizer's methods rely on.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self.base_optimizer = base_optimizer
        self.interval = interval
        self.start_step = start_step
        self.stop_step = stop_step
        self.momentum = momentum
        self.clamp = (float(clamp[0]), float(clamp[1]))
        self.eps = eps
        self.static = static
        self.use_adam = self._infer_use_adam() if use_adam is None else bool(use_adam)
        if self.use_adam:
            for i, group in enumerate(self.param_groups):
                if "betas" not in group or "eps" not in group:
                    raise ValueError(f"use_adam needs 'betas' and 'eps' in every group; param_groups[{i}] lacks them")
                _second_moment_beta(group)

        self._module_names: list[str] = []
        self._group_modules: list[int] = []
        if modules is None:
            for group in self.param_groups:
                self._assign_group(group)
        else:
            self._assign_groups_by_mapping(modules)
        if isinstance(reference, str):
            if reference not in self._module_names:
                raise ValueError(f"reference {reference!r} is not a module; modules: {self._module_names}")
            self._reference = self._module_names.index(reference)
        elif 0 <= reference < len(self._module_names):
            self._reference = reference
        else:
            raise ValueError(f"reference index {reference} out of range for {len(self._module_names)} modules")

        # A base loaded from an AGVM checkpoint carries AGVM's state in its groups: continue it.
        # Checked (and written) last, so that a refused construction leaves the base untouched.
        carried = any(SCALE_KEY in group or STEPS_KEY in group for group in self.param_groups)
        if carried:
            entries = self._checked_group_entries(self.param_groups, "base_optimizer.param_groups")
        else:
            entries = [(self._module_names[m], 1.0, 0) for m in self._group_modules]
        for group, entry in zip(self.param_groups, entries):
            group[MODULE_KEY], group[SCALE_KEY], group[STEPS_KEY] = entry
        self._comm = comm_state
        # param -> (g_A, g_B) of the coming measuring step; under DDP the hook fills it.
        self._halves: dict[Tensor, tuple[Tensor, Tensor]] = {} if comm_state is None else comm_state.halves
        if comm_state is not None:
            comm_state.bind(lambda: self.measures_next_step)

    # --- the base optimizer's live containers ------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's live param groups (schedulers edit them directly)."""
        # A property, not a copy of the list: base.load_state_dict replaces the base's list.
        return self.base_optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The base optimizer's per-parameter state."""
        return self.base_optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's defaults."""
        return self.base_optimizer.defaults

    # --- modules -------------------------------------------------------------------------
    def _assign_group(self, group: Mapping[str, Any]) -> None:
        name = group.get(MODULE_KEY, f"param_groups[{len(self._group_modules)}]")
        if name not in self._module_names:
            self._module_names.append(name)
        self._group_modules.append(self._module_names.index(name))

    def _assign_groups_by_mapping(self, modules: Mapping[str, Iterable[Tensor]]) -> None:
        owner: dict[Tensor, str] = {}
        for name, params in modules.items():
            params = list(params)
            if not params:
                raise ValueError(f"modules[{name!r}] has no parameters")
            for p in params:
                if p in owner:
                    raise ValueError(f"modules overlap: a parameter is in both {owner[p]!r} and {name!r}")
                owner[p] = name
        self._module_names = list(modules)
        base_params: set[Tensor] = set()
        for i, group in enumerate(self.param_groups):
            names = set()
            for p in group["params"]:
                if p not in owner:
                    raise ValueError(f"modules miss a parameter of param_groups[{i}] (shape {tuple(p.shape)})")
                names.add(owner[p])
                base_params.add(p)
            if len(names) != 1:
                raise ValueError(f"param_groups[{i}] spans modules {sorted(names)}: a group needs one module")
            (name,) = names
            if group.get(MODULE_KEY, name) != name:
                raise ValueError(f"param_groups[{i}] has {MODULE_KEY}={group[MODULE_KEY]!r} but modules put it in {name!r}")
            self._group_modules.append(self._module_names.index(name))
        stray = [name for p, name in owner.items() if p not in base_params]
        if stray:
            raise ValueError(f"modules {sorted(set(stray))} hold parameters the base optimizer does not optimise")
        unused = set(self._module_names) - {self._module_names[m] for m in self._group_modules}
        if unused:
            raise ValueError(f"modules {sorted(unused)} hold no parameter of the base optimizer")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; it joins the module its ``agvm_module`` names
        (and takes that module's factor), or starts a new module at factor 1."""
        for key in (SCALE_KEY, STEPS_KEY):
            if key in param_group:
                raise ValueError(f"param_group sets {key!r}: AGVM sets it (the module's factor, its step count)")
        factors, num_steps = self._factors(), self.num_steps
        self.base_optimizer.add_param_group(param_group)
        group = self.param_groups[-1]
        self._assign_group(group)
        module = self._group_modules[-1]
        group[MODULE_KEY] = self._module_names[module]
        group[SCALE_KEY] = factors[module] if module < len(factors) else 1.0
        group[STEPS_KEY] = num_steps

    def _factors(self) -> list[float]:
        """:math:`s_i` per module, read from the first group of each module."""
        first_group = {}
        for group, module in zip(self.param_groups, self._group_modules):
            first_group.setdefault(module, group)
        return [float(first_group[m][SCALE_KEY]) for m in range(len(self._module_names))]

    def _checked_group_entries(self, groups: Sequence[Mapping[str, Any]], where: str) -> list[tuple[str, float, int]]:
        """(module name, factor, step count) of each group in ``groups``, checked against this
        AGVM's modules; ValueError naming what is wrong, before anything is changed."""
        if len(groups) != len(self._group_modules):
            raise ValueError(f"{where} has {len(groups)} groups, this AGVM {len(self._group_modules)}")
        entries, factors, steps = [], {}, set()
        for i, (group, module) in enumerate(zip(groups, self._group_modules)):
            name = self._module_names[module]
            for key in (MODULE_KEY, SCALE_KEY, STEPS_KEY):
                if key not in group:
                    raise ValueError(f"{where}[{i}] has no {key!r}: not saved by AGVM")
            if group[MODULE_KEY] != name:
                raise ValueError(f"{where}[{i}] belongs to module {group[MODULE_KEY]!r}, in this AGVM to module {name!r}")
            factor, num_steps = group[SCALE_KEY], group[STEPS_KEY]
            if isinstance(factor, bool) or not isinstance(factor, Real) or not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"{where}[{i}][{SCALE_KEY!r}] must be a finite number > 0, got {factor!r}")
            if isinstance(num_steps, bool) or not isinstance(num_steps, Integral) or num_steps < 0:
                raise ValueError(f"{where}[{i}][{STEPS_KEY!r}] must be an int >= 0, got {num_steps!r}")
            if factors.setdefault(module, factor) != factor:
                raise ValueError(
                    f"{where}[{i}][{SCALE_KEY!r}] is {factor!r}, another group of module {name!r} has {factors[module]!r}"
                )
            steps.add(int(num_steps))
            entries.append((name, float(factor), int(num_steps)))
        if len(steps) > 1:
            raise ValueError(f"{where} disagree on {STEPS_KEY!r}: {sorted(steps)}")
        return entries

    def _infer_use_adam(self) -> bool:
        with_betas = ["betas" in group for group in self.param_groups]
        if any(with_betas) and not all(with_betas):
            raise ValueError("some param groups have 'betas' and some not: pass use_adam explicitly")
        keeps_second_moment = all("exp_avg_sq" in s for s in self.state.values() if s)
        return all(with_betas) and keeps_second_moment

    # --- public views --------------------------------------------------------------------
    @property
    def module_names(self) -> tuple[str, ...]:
        """Module names in order; the first is the reference module. Aligned with `scale_factors`."""
        return tuple(self._module_names)

    @property
    def scale_factors(self) -> Tensor:
        """The factors :math:`s_i`, one per module (float64, a copy), for logging."""
        return torch.tensor(self._factors(), dtype=torch.float64)

    @property
    def num_steps(self) -> int:
        """How many times :meth:`step` has run (neither a step skipped by GradScaler nor the state
        initialisation of ``torch.distributed.checkpoint`` counts)."""
        return int(self.param_groups[0][STEPS_KEY])

    @property
    def measures_next_step(self) -> bool:
        """Whether the next :meth:`step` measures, i.e. needs two gradient halves."""
        k = self.num_steps
        in_window = self.start_step <= k and (self.stop_step is None or k <= self.stop_step)
        return not self.static and in_window and (k - self.start_step) % self.interval == 0

    # --- gradients ---------------------------------------------------------------------
    def backward_halves(
        self, loss_a: Callable[[], Tensor], loss_b: Callable[[], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r"""One process: backward two half-batch losses, leave their mean gradient in ``.grad``.

        ``loss_a()`` and ``loss_b()`` each return the mean loss over one half of the batch
        (each is called, and its graph freed, before the next). Every parameter's ``.grad``
        gains :math:`(\nabla L_A + \nabla L_B)/2` — what one backward of the whole batch's
        mean loss gives for halves of equal size; on a measuring step both halves are also
        kept for :meth:`step`. Usable on every step; under GradScaler pass
        ``lambda: scaler.scale(loss_fn_a())``. Returns both losses, detached. Under FSDP2
        (DTensor parameters) it runs two ordinary backwards instead, so that FSDP2's
        reduce-scatter runs, and reads each half as the change of the sharded ``.grad``.
        """
        if self._comm is not None:
            raise RuntimeError("backward_halves is for one process; under DDP agvm_comm_hook measures the halves")
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if self._shard_reduction is not None:
            return self._backward_halves_sharded(loss_a, loss_b, params)
        value_a, grads_a = self._gradients(loss_a, params)
        value_b, grads_b = self._gradients(loss_b, params)
        keep = self.measures_next_step
        with torch.no_grad():
            for p, grad_a, grad_b in zip(params, grads_a, grads_b):
                if grad_a is None and grad_b is None:
                    continue
                grad_a = torch.zeros_like(p) if grad_a is None else grad_a
                grad_b = torch.zeros_like(p) if grad_b is None else grad_b
                mean = (grad_a + grad_b).mul_(0.5)
                if p.grad is None:
                    p.grad = mean
                else:
                    p.grad.add_(mean)
                if keep:
                    if p in self._halves:
                        kept_a, kept_b = self._halves[p]
                        kept_a.add_(grad_a)
                        kept_b.add_(grad_b)
                    else:
                        self._halves[p] = (grad_a, grad_b)
        return value_a.detach(), value_b.detach()

    def _backward_halves_sharded(
        self, loss_a: Callable[[], Tensor], loss_b: Callable[[], Tensor], params: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """`backward_halves` under FSDP2: gradients reach the sharded ``.grad`` only through its
        reduce-scatter after ``backward()`` (``autograd.grad`` bypasses it), so each half's
        gradient is read as the change of ``.grad`` — the mean over all ranks of that half."""
        before = [None if p.grad is None else p.grad.detach().clone() for p in params]
        with torch.enable_grad():
            value_a = loss_a()
            value_a.backward()
        after_a = [None if p.grad is None else p.grad.detach().clone() for p in params]
        with torch.enable_grad():
            value_b = loss_b()
            value_b.backward()
        keep = self.measures_next_step
        with torch.no_grad():
            for p, grad_before, grad_after_a in zip(params, before, after_a):
                if p.grad is None:
                    continue
                zero = torch.zeros_like(p.grad)
                grad_before = zero if grad_before is None else grad_before
                grad_a = (zero if grad_after_a is None else grad_after_a) - grad_before
                grad_b = p.grad - grad_before - grad_a
                p.grad.copy_(grad_before + (grad_a + grad_b) * 0.5)
                if keep:
                    if p in self._halves:
                        kept_a, kept_b = self._halves[p]
                        kept_a.add_(grad_a)
                        kept_b.add_(grad_b)
                    else:
                        self._halves[p] = (grad_a, grad_b)
        return value_a.detach(), value_b.detach()

    @staticmethod
    def _gradients(loss_fn: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        with torch.enable_grad():
            loss = loss_fn()
            if loss.ndim != 0:
                raise ValueError(f"backward_halves: a loss must be a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss, grads

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base's ``zero_grad``; also drops kept gradient halves."""
        self._halves.clear()
        self.base_optimizer.zero_grad(set_to_none)

    # --- the step ------------------------------------------------------------------------
    def _adam_denominator(self, p: Tensor, group: Mapping[str, Any], grad: Tensor) -> Tensor:
        beta = _second_moment_beta(group)
        state = self.state.get(p)  # .get: the base's state is a defaultdict, do not grow it
        if state:
            if "exp_avg_sq" not in state:
                raise RuntimeError(
                    "use_adam: the base optimizer keeps no 'exp_avg_sq' for a parameter "
                    f"(state keys {sorted(state)}); pass use_adam=False"
                )
            second = state["exp_avg_sq"].to(grad.dtype).mul(beta).addcmul_(grad, grad, value=1.0 - beta)
        else:  # before the base's first step its second moment is zero
            second = grad.square().mul_(1.0 - beta)
        return second.sqrt_().add_(group["eps"])

    def _disagreements(self) -> Tensor:
        """:math:`d_i` per module (float64, NaN where a module had no gradient halves)."""
        if not self._halves:
            raise RuntimeError(
                f"step {self.num_steps} measures but no gradient halves were recorded: use "
                "AGVM.backward_halves (one process) or agvm_comm_hook (DDP) for this step's backward"
            )
        sums: list[list[Tensor]] = [[] for _ in self._module_names]
        device = None
        for group, module in zip(self.param_groups, self._group_modules):
            for p in group["params"]:
                if p not in self._halves:
                    continue
                # Local shards under FSDP2 (the sums below are completed across ranks after).
                half_a, half_b = to_local(self._halves[p])
                # float64, one parameter at a time: d_i near eps = 1e-6 matters, and float32's
                # rounding of cos (about 1e-7) would be a tenth of it.
                half_a, half_b = half_a.to(_MEASURE_DTYPE).flatten(), half_b.to(_MEASURE_DTYPE).flatten()
                if self.use_adam:
                    denominator = to_local([self._adam_denominator(p, group, p.grad.to(_MEASURE_DTYPE))])[0].flatten()
                    half_a, half_b = half_a / denominator, half_b / denominator
                if device is None:
                    device = p.device
                partial = torch.stack([half_a.dot(half_b), half_a.dot(half_a), half_b.dot(half_b)])
                sums[module].append(partial.to(device))
        # Per module: ⟨g_A, g_B⟩, ‖g_A‖², ‖g_B‖², and whether it had halves at all.
        totals = torch.zeros((len(sums), 4), dtype=_MEASURE_DTYPE, device=device)
        for module, partials in enumerate(sums):
            if partials:
                totals[module, :3] = torch.stack(partials).sum(0)
                totals[module, 3] = 1.0
        if self._shard_reduction is not None:
            self._shard_reduction.sum_over_shards(totals)  # one all-reduce for every module
        disagreements = torch.full((len(sums),), math.nan, dtype=torch.float64, device=device)
        for module, (dot, norm_a_sq, norm_b_sq, present) in enumerate(totals):
            if present > 0:
                cosine = dot / (norm_a_sq.sqrt() * norm_b_sq.sqrt()).clamp_min(_COSINE_EPS)
                disagreements[module] = 1.0 - cosine
        if self._comm is not None:
            self._comm.agree(disagreements)
        return disagreements

    def _update_scale_factors(self) -> None:
        disagreements = self._disagreements().tolist()
        if math.isnan(disagreements[self._reference]):
            raise RuntimeError(
                f"reference module {self._module_names[self._reference]!r} has no gradient on measuring step {self.num_steps}"
            )
        targets = agvm_scale_targets(disagreements, self._reference, self.eps, self.clamp)
        factors = self._factors()
        for i, target in enumerate(targets):
            if not math.isnan(target):  # a module without gradient this step keeps its factor
                factors[i] = self.momentum * factors[i] + (1.0 - self.momentum) * target
        for group, module in zip(self.param_groups, self._group_modules):
            group[SCALE_KEY] = factors[module]

    def _base_step_with_scaled_lr(self) -> None:
        groups = self.param_groups
        # Kept and put back as they were (not divided back): restored exactly, tensors included.
        lrs = [group["lr"] for group in groups]
        try:
            for group, lr in zip(groups, lrs):
                group["lr"] = lr * group[SCALE_KEY]
            self.base_optimizer.step()
        finally:
            for group, lr in zip(groups, lrs):
                group["lr"] = lr

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Measure (on measuring steps), then step the base with each group's lr times s_i."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self._group_modules) != len(self.param_groups) or any(STEPS_KEY not in g for g in self.param_groups):
            raise RuntimeError(
                "param_groups changed behind AGVM's back: add groups with AGVM.add_param_group and load "
                "checkpoints with AGVM.load_state_dict (which keep AGVM's entries in every group)"
            )
        if self._is_state_initialisation():
            self.base_optimizer.step()  # lr 0 and zero gradients: creates the base's state, moves nothing
            return loss
        if self.measures_next_step:
            self._update_scale_factors()
        if self.num_steps >= self.start_step:
            self._base_step_with_scaled_lr()
        else:
            self.base_optimizer.step()
        self._halves.clear()
        for group in self.param_groups:
            group[STEPS_KEY] += 1
        return loss

    def _is_state_initialisation(self) -> bool:
        """Whether this step is ``torch.distributed.checkpoint``'s state initialisation, not training.

        ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` create a stateless
        optimizer's state with one step of all-zero gradients at lr 0. Such a step moves no
        parameter, so it is not counted and does not measure (it has no gradient halves).
        Only a step with no base state, no halves and every lr 0 gets as far as the gradient check.
        """
        if self.state or self._halves or any(float(group["lr"]) != 0.0 for group in self.param_groups):
            return False
        grads = to_local([p.grad for group in self.param_groups for p in group["params"] if p.grad is not None])
        if not grads:
            return False
        nonzero = torch.stack([grad.count_nonzero() for grad in grads]).sum().to(torch.float64)
        if self._shard_reduction is not None:  # every rank must decide alike: count all shards
            self._shard_reduction.sum_over_shards(nonzero)
        return nonzero.item() == 0

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base's state dict; its param groups carry AGVM's module names, factors and step count."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base_optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimizer's state with AGVM's factors and step count (module names must match).

        AGVM's entries are checked first (every group's module, a finite factor > 0 shared by
        the module's groups, one step count >= 0): a ValueError leaves the optimizer unchanged.
        A checkpoint of the earlier layout, with a top-level ``"agvm"`` entry, loads too.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        base_state = dict(state_dict)
        groups = base_state.get("param_groups")
        if not isinstance(groups, Sequence):
            raise ValueError("state_dict has no 'param_groups' list")
        if "agvm" in base_state:
            groups = self._groups_from_top_level_entry(groups, base_state.pop("agvm"))
        entries = self._checked_group_entries(groups, "state_dict['param_groups']")
        base_state["param_groups"] = [
            {**group, MODULE_KEY: name, SCALE_KEY: factor, STEPS_KEY: num_steps}
            for group, (name, factor, num_steps) in zip(groups, entries)
        ]
        self.base_optimizer.load_state_dict(base_state)
        self._halves.clear()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _groups_from_top_level_entry(self, groups: Sequence[Mapping[str, Any]], saved: Any) -> list[dict[str, Any]]:
        """The param groups of an earlier checkpoint layout, whose ``"agvm"`` entry held
        ``module_names``, ``scale_factors`` (one per module) and ``num_steps``, with those put in
        the groups; checked by ``_checked_group_entries`` afterwards."""
        if not isinstance(saved, Mapping) or not {"module_names", "scale_factors", "num_steps"} <= saved.keys():
            raise ValueError(f"state_dict['agvm'] must hold module_names, scale_factors and num_steps, got {saved!r}")
        if list(saved["module_names"]) != self._module_names:
            raise ValueError(f"state_dict modules {saved['module_names']} differ from this AGVM's {self._module_names}")
        factors = saved["scale_factors"]
        if not isinstance(factors, Sequence) or len(factors) != len(self._module_names):
            raise ValueError(
                f"state_dict['agvm']['scale_factors'] must hold one factor per module ({len(self._module_names)}), "
                f"got {factors!r}"
            )
        modules = self._group_modules[: len(groups)]
        return [
            {MODULE_KEY: self._module_names[m], **group, SCALE_KEY: factors[m], STEPS_KEY: saved["num_steps"]}
            for group, m in zip(groups, modules)
        ]

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer's would keep only defaults/state/param_groups, which are the base's here.
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        factors = ", ".join(f"{name}={s:.4f}" for name, s in zip(self._module_names, self._factors()))
        return f"AGVM({factors}; base={self.base_optimizer!r})"
