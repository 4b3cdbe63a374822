r"""Gradient release: the optimizer step runs inside backward.

Each parameter is stepped as soon as its gradient is accumulated (a
``register_post_accumulate_grad_hook``), and that gradient is freed at once, so the gradients of
the whole model never live together: the peak of a training step holds the parameters, the
optimizer states, the activations and only the gradients still waiting for their step.

It is exact (the same parameters, bit for bit, as ``backward()`` then ``step()``) for update
rules in which one tensor's update needs nothing from the others:

* LAMB and LARS: the trust ratio :math:`r = \|x\| / \|u\|` is per tensor;
* Adan: elementwise;
* AdaGrad-Norm only with one parameter per param group. Its accumulator is per group,
  :math:`b^2 \leftarrow b^2 + \sum_{\text{group}} \|g\|^2`, and every tensor of the group steps
  with the :math:`b` that includes all of the group's gradients, which do not exist yet when the
  first of them is ready. A group of one tensor is AdaGrad-Norm with one accumulator per tensor,
  a different method that the user chooses by building the groups so
  (``AdaGradNorm([{"params": [p]} for p in model.parameters()])``); release then steps each
  group exactly as ``step()`` would. Groups of several tensors are refused.

Refused (ValueError naming the option), because each needs every gradient before any step:
``max_grad_norm`` (global clipping), AGVM (learning-rate factors from the whole step's
gradients), ``shard_group`` and DTensor parameters (norms completed across ranks, in an order
the ranks' hooks need not share), and ``DistributedDataParallel``/FSDP models: DDP's reducer
all-reduces gradients in buckets after these hooks have fired and writes the averaged gradient
into ``.grad`` at the end of backward, so a step taken in the hook would use the rank's local
gradient and the replicas would drift apart. GradScaler cannot be used either: it unscales and
skips a step only after every gradient is known (use bf16 autocast, which needs no loss
scaling); ``optimizer.step()``, which ``scaler.step`` calls, raises while release is active.
Optimizer step hooks (``register_step_pre_hook``/``post_hook``) would never run, so an
optimizer that has any is refused, and so are ``differentiable=True`` and ``sparse=True`` embeddings
(the optimizers refuse sparse gradients, which inside a hook would leave a half-applied step).

Gradient accumulation: backward passes inside ``with release.accumulating():`` only accumulate;
the first backward outside it steps. A parameter that received a gradient while accumulating
but gets none in the stepping backward is stepped at that backward's first hook (as ``step()``
would step it). Reentrant activation checkpointing (``use_reentrant=True``) runs nested
backward passes and is not supported; the default non-reentrant checkpointing is.

LR schedulers keep working: each hook reads its param group at the time it fires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

from largebatch.optimizers import AGVM, LAMB, LARS, AdaGradNorm, Adan
from largebatch.optimizers._base import LargeBatchOptimizer
from largebatch.optimizers.agvm import MODULE_KEY

__all__ = ["GradientRelease", "prepare_for_gradient_release"]

#: The optimizers whose update of one tensor is computed from that tensor alone.
RELEASABLE = (LAMB, LARS, Adan, AdaGradNorm)


def prepare_for_gradient_release(model: nn.Module, optimizer: Optimizer) -> GradientRelease:
    """Step `optimizer`'s parameters inside backward, each as soon as its gradient is accumulated,
    and free that gradient (see this module's docstring for what is exact and what is refused).

    Usage::

        release = prepare_for_gradient_release(model, optimizer)
        for batch in loader:
            for micro in micro_batches[:-1]:
                with release.accumulating():
                    loss_fn(model, micro).backward()
            loss_fn(model, micro_batches[-1]).backward()  # steps every parameter
            scheduler.step()
        release.remove()  # back to backward() + step()

    `model` is checked for DistributedDataParallel/FSDP wrappers (refused); the hooks go on the
    optimizer's parameters that require gradients.

    Raises:
        ValueError: naming what cannot be released (see above).
    """
    return GradientRelease(model, optimizer)


class GradientRelease:
    """The hooks of `prepare_for_gradient_release`; `remove()` takes them off."""

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        _check_model(model)
        _check_optimizer(optimizer)
        if _refuse_step in optimizer._optimizer_step_pre_hooks.values():
            raise ValueError(
                "Invalid optimizer: it is already prepared for gradient release (every parameter would step twice); "
                "remove() the first handle"
            )
        self.optimizer: LargeBatchOptimizer = optimizer  # type: ignore[assignment]
        self._params = _optimizer_params(optimizer)
        self._group_of = {param: index for index, param in self._params}
        trainable = [param for _, param in self._params if param.requires_grad]
        with torch.enable_grad():  # each parameter's AccumulateGrad node, to ask the engine about
            self._accumulators = {p: p.view_as(p).grad_fn.next_functions[0][0] for p in trainable}
        self._fused_plans: dict[Tensor, Any] = {}  # per parameter, for fused groups
        self._accumulating = False
        self._backward: int | None = None  # graph task id of the last backward that stepped
        self._handles = [p.register_post_accumulate_grad_hook(self._released) for p in trainable]
        self._handles.append(optimizer.register_step_pre_hook(_refuse_step))

    @contextlib.contextmanager
    def accumulating(self, enabled: bool = True) -> Iterator[None]:
        """Within it (when `enabled`), backward passes accumulate gradients in ``.grad`` and step
        nothing: the micro-batches before the last of a gradient-accumulation step."""
        if not isinstance(enabled, bool):
            raise ValueError(f"Invalid enabled: {enabled!r} (must be a bool)")
        previous, self._accumulating = self._accumulating, enabled
        try:
            yield
        finally:
            self._accumulating = previous

    def remove(self) -> None:
        """Take the hooks off (idempotent): backward accumulates again and ``step()`` steps.
        Gradients accumulated under `accumulating()` stay in ``.grad``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._fused_plans.clear()

    def __enter__(self) -> GradientRelease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _released(self, param: Tensor) -> None:
        """The post-accumulate-grad hook: step `param` alone and free its gradient."""
        if self._accumulating:
            return
        backward = torch._C._current_graph_task_id()
        if backward != self._backward:
            self._start_backward(param)
            self._backward = backward
        self._step(param)

    def _start_backward(self, first: Tensor) -> None:
        """At the first hook of a stepping backward, before anything steps: check the optimizer
        again (groups may have changed since `prepare`), then step the parameters that hold a
        gradient this backward will not reach (accumulated earlier: `step()` would step them)."""
        _check_optimizer(self.optimizer)
        if _layout(self._params) != _layout(_optimizer_params(self.optimizer)) or any(
            p.requires_grad and p not in self._accumulators for _, p in self._params
        ):
            raise ValueError(
                "the optimizer's parameters changed since prepare_for_gradient_release (add_param_group, or a "
                "frozen parameter that now requires grad): call remove() and prepare again"
            )
        unreached = [
            p
            for _, p in self._params
            if p is not first
            and p.grad is not None
            and (p not in self._accumulators or not torch._C._will_engine_execute_node(self._accumulators[p]))
        ]
        for param in unreached:
            self._step(param)
        # torch's LR schedulers warn that step() was skipped unless it has run; here it ran in the hooks.
        self.optimizer._opt_called = True  # type: ignore[attr-defined]

    def _step(self, param: Tensor) -> None:
        index = self._group_of[param]
        plans = None
        if self.optimizer.param_groups[index]["fused"]:
            from largebatch.fused._plan import PlanCache

            plans = self._fused_plans.setdefault(param, PlanCache())
        with torch.no_grad():
            self.optimizer._step_param_alone(index, param, plans)
        param.grad = None


def _optimizer_params(optimizer: Optimizer) -> list[tuple[int, Tensor]]:
    return [(index, p) for index, group in enumerate(optimizer.param_groups) for p in group["params"]]


def _layout(params: list[tuple[int, Tensor]]) -> list[tuple[int, int]]:
    """Group index and identity of each parameter (tensors' == is elementwise)."""
    return [(index, id(p)) for index, p in params]


def _refuse_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    raise RuntimeError(
        f"{type(optimizer).__name__}.step() was called while gradient release is active: the parameters are "
        "stepped inside backward, and their gradients freed. Call release.remove() first to step normally. "
        "GradScaler's scaler.step(optimizer) lands here too: loss scaling cannot work with gradient release "
        "(it unscales and skips only once every gradient is known); use bf16 autocast"
    )


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {model!r} (must be a torch.nn.Module)")
    from torch.nn.parallel import DistributedDataParallel

    wrappers: tuple[type, ...] = (DistributedDataParallel,)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers += (FullyShardedDataParallel,)
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) is True:  # nn.Embedding / nn.EmbeddingBag(sparse=True)
            raise ValueError(
                f"Invalid model: {name or 'the model'} ({type(module).__name__}) has sparse=True. Its sparse "
                "gradient would be refused by the optimizer inside its hook, after other parameters had already "
                "stepped (a half-applied step); use sparse=False"
            )
        if isinstance(module, wrappers):
            raise ValueError(
                f"Invalid model: {name or 'the model'} is a {type(module).__name__}. Its reducer averages the "
                "gradients across ranks after the post-accumulate-grad hooks have fired, so a step taken in "
                "the hook would use this rank's local gradient and the replicas would drift apart. Gradient "
                "release is for single-process training"
            )


def _check_optimizer(optimizer: Optimizer) -> None:
    """ValueError naming the first option that gradient release cannot honour exactly."""
    if isinstance(optimizer, AGVM):
        raise ValueError(
            "Invalid optimizer: AGVM sets each module's learning rate from the whole step's gradients "
            "(two half-batch estimates), which do not exist when the first gradient is ready"
        )
    if not isinstance(optimizer, RELEASABLE):
        names = ", ".join(cls.__name__ for cls in RELEASABLE)
        raise ValueError(f"Invalid optimizer: gradient release steps {names}, got {type(optimizer).__name__}")
    pre = sum(hook is not _refuse_step for hook in optimizer._optimizer_step_pre_hooks.values())
    post = len(optimizer._optimizer_step_post_hooks)
    pre += len(torch_optimizer._global_optimizer_pre_hooks)
    post += len(torch_optimizer._global_optimizer_post_hooks)
    if pre or post:
        raise ValueError(
            f"Invalid optimizer: it has {pre} step pre-hook(s) and {post} post-hook(s), which gradient release "
            "would never run (it steps one parameter at a time inside backward, never through step())"
        )
    for index, group in enumerate(optimizer.param_groups):
        where = f"param_groups[{index}]"
        if group.get("max_grad_norm") is not None:
            raise ValueError(
                f"Invalid max_grad_norm in {where}: {group['max_grad_norm']!r}. Global clipping scales every "
                "gradient by the norm of all of them, unknown until the last is ready; set max_grad_norm=None"
            )
        if MODULE_KEY in group:
            raise ValueError(
                f"Invalid {where}: it belongs to an AGVM ({MODULE_KEY!r}), whose learning-rate factors need the "
                "whole step's gradients"
            )
        if group["differentiable"]:
            raise ValueError(f"Invalid differentiable in {where}: the steps run inside backward, under no_grad")
        if group["shard_group"] is not None or any(_is_dtensor(p) for p in group["params"]):
            raise ValueError(
                f"Invalid {where}: sharded parameters (shard_group, DTensor/FSDP2) complete their norms across "
                "ranks, which would happen once per parameter in an order the ranks' hooks need not share"
            )
        if isinstance(optimizer, AdaGradNorm) and len(group["params"]) > 1:
            raise ValueError(
                f"Invalid {where} of AdaGradNorm: {len(group['params'])} parameters share one accumulator "
                "b^2 += sum ||g||^2, and each steps with the b of all of them. Release needs one parameter per "
                "group (one accumulator per tensor, a different method you choose): "
                "AdaGradNorm([{'params': [p]} for p in model.parameters()], ...)"
            )


def _is_dtensor(param: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)
