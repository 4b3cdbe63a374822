"""AdaGrad-Norm: AdaGrad with one scalar step size per group (Ward, Wu, Bottou 2019)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._base import (
    LargeBatchOptimizer,
    PreparedGroup,
    check_non_negative,
    check_same_lengths,
    foreach_fp32_norms,
    fp32_norm,
    norm_dtype,
    resolve_foreach,
    scalar_lr,
)
from ._sharding import ShardReduction, complete_squares, shard_reduction, to_local

__all__ = ["AdaGradNorm", "adagrad_norm"]


class AdaGradNorm(LargeBatchOptimizer):
    r"""AdaGrad-Norm (Ward, Wu, Bottou 2019, "AdaGrad stepsizes: sharp convergence over nonconvex
    landscapes"), the base method of AdAdaGrad (Lau et al. 2024).

    One accumulator per param group, over all of the group's gradients:

    .. math::
        g &\leftarrow g + \lambda x \quad (\text{weight\_decay}, \text{as torch.optim.Adagrad}) \\
        b^2 &\leftarrow b^2 + \textstyle\sum_{\text{tensors}} \|g\|^2 \\
        x &\leftarrow x - \text{lr} \cdot g / (b + \epsilon)

    b² starts at ``initial_accumulator_value`` (b0²) and is kept in float32 (float64 for float64 params). It is stored as
    ``state[group["params"][0]]["sum_sq"]`` (a 0-dim tensor on that parameter's device), so it
    travels with ``state_dict()`` like any per-parameter state.

    Non-finite gradients: b² is shared by the whole group and only grows, so one step with a NaN
    gradient anywhere in the group makes b² NaN, and every tensor of the group NaN, for good (b²
    never recovers). One step with an inf gradient makes b² inf: the inf entries become NaN
    (inf / inf) and the rest of the group is frozen for good (every later step is lr · g / inf = 0).
    The step does not look for such gradients (that would cost a host synchronisation). With
    ``torch.amp.GradScaler`` use its usual protocol (``scaler.step(optimizer)``): it unscales the
    gradients and skips ``step()`` whenever one is inf or NaN, so b² is untouched. GradScaler's
    in-step protocol of fused optimizers (``grad_scale``/``found_inf`` handed to ``step()``) is
    not supported: AdaGrad-Norm has no fused path. Without GradScaler, check the gradients (or
    the loss) before ``step()``.

    Args:
        params: tensors, named parameters, or param-group dicts (every option can be set per group).
        lr: learning rate α, a float or a one-element tensor (default 1e-2, as torch.optim.Adagrad).
        initial_accumulator_value: b0² (default 0).
        eps: added to b (default 1e-10, as torch.optim.Adagrad).
        weight_decay: λ, L2 penalty added to the gradient (default 0).
        maximize, foreach, differentiable: as in torch.optim.Adagrad. ``capturable`` is accepted
            for symmetry (the update has no step-dependent scalar to capture) and ``fused`` is
            not implemented for AdaGrad-Norm (raises). There is no ``kahan_sum`` option: bf16/fp16
            parameters step uncompensated (LAMB, LARS and Adan have it).
    """

    _name = "AdaGradNorm"
    # b² lives in the state of the group's first parameter only, which may hold it without a step
    # (when that parameter has had no gradient yet); every other stepped parameter holds a step.
    _STATE_KEYS = ()
    _OPTIONAL_STATE_KEYS = ("step", "sum_sq")
    _SCALAR_STATE_KEYS = ("step", "sum_sq")
    _SQUARED_STATE_KEYS = ("sum_sq",)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_non_negative("initial_accumulator_value", group["initial_accumulator_value"])
        check_non_negative("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])

    def _loaded(self, state_dict: Mapping[str, Any]) -> tuple[defaultdict[Tensor, dict[str, Any]], list[dict[str, Any]]]:
        """The base class's checks, and b² where this class keeps it: on each group's first
        parameter only, and there whenever the group has stepped."""
        state, groups = super()._loaded(state_dict)
        for index, group in enumerate(groups):
            first, *others = group["params"]
            where = f"state_dict param_groups[{index}]"
            if any("sum_sq" in state.get(p, {}) for p in others):
                raise ValueError(f"{where}: 'sum_sq' is kept by the group's first parameter only")
            if "sum_sq" not in state.get(first, {}) and any("step" in state.get(p, {}) for p in group["params"]):
                raise ValueError(f"{where} has stepped but its first parameter holds no 'sum_sq' (b²)")
        return state, groups

    def _loaded_value(self, key: str, value: Any, param: Tensor, group: dict[str, Any]) -> Tensor:
        """As the base class's, except that b² keeps its float32/64 dtype: torch's policy would
        cast it to a bf16 parameter's dtype and round the accumulator to 8 bits of mantissa."""
        if key == "sum_sq":
            return value.to(device=param.device, dtype=norm_dtype(param.dtype), copy=True)
        return super()._loaded_value(key, value, param, group)

    def accumulator(self, group_index: int = 0) -> Tensor | None:
        """b² of one group (None before its first step)."""
        first = self.param_groups[group_index]["params"][0]
        return self.state[first].get("sum_sq") if first in self.state else None

    def _step_group(self, group: dict[str, Any], prepared: PreparedGroup, grad_clip_coef: Tensor | None) -> None:
        params = prepared.params
        first_state = self.state[group["params"][0]]
        if "sum_sq" not in first_state:
            first_state["sum_sq"] = torch.full(
                (),
                float(group["initial_accumulator_value"]),
                dtype=norm_dtype(group["params"][0].dtype),
                device=group["params"][0].device,
            )
        steps = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = self._new_step(p, group)
            steps.append(state["step"])
        adagrad_norm(
            to_local(params),
            to_local([p.grad for p in params]),
            first_state["sum_sq"],
            steps,
            shard_reduction=shard_reduction(params, group["shard_group"]),
            foreach=group["foreach"],
            differentiable=group["differentiable"],
            lr=group["lr"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )


def adagrad_norm(
    params: list[Tensor],
    grads: list[Tensor],
    sum_sq: Tensor,
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    differentiable: bool = False,
    shard_reduction: ShardReduction | None = None,
    lr: float | Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Functional AdaGrad-Norm: one step in place; ``sum_sq`` (b², 0-dim fp32) is updated too.

    ``shard_reduction`` sums the squares across ranks when the tensors are local shards.

    Raises:
        ValueError: the tensor lists differ in length.
    """
    check_same_lengths(params=params, grads=grads, state_steps=state_steps)
    hyper = dict(lr=scalar_lr(lr), eps=eps, weight_decay=weight_decay, maximize=maximize, shard_reduction=shard_reduction)
    if resolve_foreach(params, foreach, differentiable):
        _multi_tensor_adagrad_norm(params, grads, sum_sq, state_steps, **hyper)
    else:
        _single_tensor_adagrad_norm(params, grads, sum_sq, state_steps, **hyper)


def _single_tensor_adagrad_norm(
    params: list[Tensor],
    grads: list[Tensor],
    sum_sq: Tensor,
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
    shard_reduction: ShardReduction | None,
) -> None:
    """The reference: the accumulator over all tensors first, then each tensor's step."""
    grads = [-g if maximize else g for g in grads]
    if weight_decay != 0:
        grads = [g.add(p, alpha=weight_decay) for p, g in zip(params, grads)]
    squares = torch.stack([fp32_norm(g).square().to(device=sum_sq.device, dtype=sum_sq.dtype) for g in grads])
    sum_sq.add_(complete_squares(squares, shard_reduction).sum())
    for step_t in state_steps:
        step_t += 1
    scale = lr / (sum_sq.sqrt() + eps)
    for param, grad in zip(params, grads):
        param.sub_(grad * scale.to(param.device))


def _multi_tensor_adagrad_norm(
    params: list[Tensor],
    grads: list[Tensor],
    sum_sq: Tensor,
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
    shard_reduction: ShardReduction | None,
) -> None:
    """torch._foreach implementation: one norm pass, one update pass per (device, dtype) group."""
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, state_steps])  # type: ignore[list-item]
    prepared, squares = [], []
    for d_params, d_grads, d_steps in (lists for lists, _ in grouped.values()):
        d_grads = torch._foreach_neg(d_grads) if maximize else list(d_grads)
        if weight_decay != 0:
            d_grads = torch._foreach_add(d_grads, d_params, alpha=weight_decay)
        squares.append(foreach_fp32_norms(d_grads).square().sum().to(device=sum_sq.device, dtype=sum_sq.dtype))
        torch._foreach_add_(d_steps, 1)
        prepared.append((d_params, d_grads))
    sum_sq.add_(complete_squares(torch.stack(squares), shard_reduction).sum())
    scale = lr / (sum_sq.sqrt() + eps)
    for d_params, d_grads in prepared:
        torch._foreach_sub_(d_params, torch._foreach_mul(d_grads, scale.to(d_params[0].device)))
