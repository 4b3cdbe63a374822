"""Adan: adaptive Nesterov momentum (Xie et al. 2022), as the official implementation computes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._base import (
    LargeBatchOptimizer,
    PreparedGroup,
    check_beta,
    check_bool,
    check_non_negative,
    check_positive,
    check_same_lengths,
    debias_factor,
    debias_factors,
    resolve_foreach,
    scalar_lr,
)
from ._sharding import locals_of

if TYPE_CHECKING:
    from largebatch.fused._plan import Bucket

__all__ = ["Adan", "adan"]



class Adan(LargeBatchOptimizer):
    r"""Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
    Deep Models"), following the official implementation (sail-sg/Adan).

    At step t, with g the gradient and g_prev the previous step's gradient:

    .. math::
        \Delta &= g - g_\text{prev} \quad (0 \text{ at } t = 1) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        d &\leftarrow \beta_2 d + (1-\beta_2) \Delta \\
        n &\leftarrow \beta_3 n + (1-\beta_3) (g + \beta_2 \Delta)^2 \\
        \eta &= \frac{m / (1-\beta_1^t) + \beta_2 \, d / (1-\beta_2^t)}{\sqrt{n / (1-\beta_3^t)} + \epsilon} \\
        x &\leftarrow (x - \text{lr}\cdot\eta) / (1 + \text{lr}\cdot\lambda)
            \qquad (\text{no\_prox: } x \leftarrow x (1 - \text{lr}\cdot\lambda) - \text{lr}\cdot\eta)

    The betas are the official code's (the paper writes 1 − β). ``g`` is the gradient after the
    optional global clipping (``max_grad_norm``), and that clipped gradient is what is kept as
    g_prev, as the official code does.

    Args:
        params: tensors, named parameters, or param-group dicts (every option can be set per group).
        lr: learning rate, a float or a one-element tensor (default 1e-3).
        betas: (β1, β2, β3) (default (0.98, 0.92, 0.99), the official defaults).
        eps: added outside the square root (default 1e-8).
        weight_decay: λ (default 0).
        no_prox: decoupled decay x·(1 − lr·λ) instead of the proximal division (default False).
        max_grad_norm: clip the global gradient norm (over all groups) first (default None).
        maximize, foreach, capturable, differentiable, fused: as in torch.optim.AdamW.
    """

    _name = "Adan"
    _has_fused = True
    _STATE_KEYS = ("step", "exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")
    _SQUARED_STATE_KEYS = ("exp_avg_sq",)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_prox: bool = False,
        max_grad_norm: float | None = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            no_prox=no_prox,
            max_grad_norm=max_grad_norm,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"Invalid betas: {betas!r} (must be a triple (beta1, beta2, beta3))")
        for i, beta in enumerate(betas):
            check_beta(f"betas[{i}]", beta)
        check_non_negative("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive("max_grad_norm", group["max_grad_norm"], allow_none=True)
        check_bool("no_prox", group["no_prox"])

    def _setstate_defaults(self) -> dict[str, Any]:
        return {**super()._setstate_defaults(), "no_prox": False, "max_grad_norm": None}

    def _group_lists(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[list[Tensor]]:
        *buffers, steps = self._state_lists(params, group, (*self._STATE_KEYS[1:], "step"))
        return [*locals_of(params, grads, *buffers), steps]

    def _fused_layout(self, group: dict[str, Any]) -> dict[str, int]:
        from largebatch.fused.adan import ADAN_LAYOUT

        return ADAN_LAYOUT

    def _step_group(self, group: dict[str, Any], prepared: PreparedGroup, grad_clip_coef: Tensor | None) -> None:
        beta1, beta2, beta3 = group["betas"]
        # The update is elementwise: on shards it needs only their local tensors (the global
        # clipping norm, the one whole-model quantity, is completed in _grad_clip_coefficients).
        adan(
            *prepared.lists,
            foreach=group["foreach"],
            fused=group["fused"],
            fused_buckets=prepared.buckets,
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            grad_clip_coef=grad_clip_coef,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            no_prox=group["no_prox"],
            maximize=group["maximize"],
            **self._amp_args(),
        )


def adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    fused_buckets: list[Bucket] | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    grad_clip_coef: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
) -> None:
    """Functional Adan: one step over the given tensors, in place. See :class:`Adan`.

    ``grad_scale``/``found_inf`` (GradScaler's protocol) are supported by the fused path only.

    Raises:
        ValueError: the tensor lists differ in length.
    """
    check_same_lengths(
        params=params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_diffs=exp_avg_diffs,
        exp_avg_sqs=exp_avg_sqs,
        prev_grads=prev_grads,
        state_steps=state_steps,
    )
    hyper = dict(
        lr=scalar_lr(lr),
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        eps=eps,
        weight_decay=weight_decay,
        no_prox=no_prox,
        maximize=maximize,
        grad_clip_coef=grad_clip_coef,
    )
    tensors = (params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, state_steps)
    if fused:
        from largebatch.fused import fused_adan

        fused_adan(*tensors, grad_scale=grad_scale, found_inf=found_inf, buckets=fused_buckets, **hyper)
        return
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError("grad_scale/found_inf are only supported with fused=True")
    if resolve_foreach(params, foreach, differentiable):
        _multi_tensor_adan(*tensors, capturable=capturable, **hyper)
    else:
        _single_tensor_adan(*tensors, capturable=capturable, **hyper)


def _has_previous_grad(steps: list[Tensor], capturable: bool) -> list[Any]:
    """1 where a tensor's counter (already incremented) is past its first step, else 0.

    prev_grad starts at zero and there is no previous gradient on the first step, so Δ is
    multiplied by this. Floats from the CPU counters, or device tensors when capturable.
    """
    if capturable:
        return [(step > 1).to(step.dtype) for step in steps]
    return [float(step.item() > 1) for step in steps]


def _single_tensor_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    state_steps: list[Tensor],
    *,
    capturable: bool,
    grad_clip_coef: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
) -> None:
    """The reference: one tensor at a time, reading like the equations."""
    tensors = zip(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, state_steps)
    for param, grad, exp_avg, exp_avg_diff, exp_avg_sq, prev_grad, step_t in tensors:
        grad = -grad if maximize else grad
        if grad_clip_coef is not None:
            grad = grad * grad_clip_coef.to(grad.device)
        step_t += 1
        diff = (grad - prev_grad) * _has_previous_grad([step_t], capturable)[0]

        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_diff.mul_(beta2).add_(diff, alpha=1 - beta2)
        nesterov_grad = grad.add(diff, alpha=beta2)
        exp_avg_sq.mul_(beta3).addcmul_(nesterov_grad, nesterov_grad, value=1 - beta3)
        prev_grad.copy_(grad)

        bc1 = debias_factor(beta1, step_t, capturable)
        bc2 = debias_factor(beta2, step_t, capturable)
        bc3 = debias_factor(beta3, step_t, capturable)
        update = (exp_avg / bc1 + exp_avg_diff * (beta2 / bc2)) / ((exp_avg_sq / bc3).sqrt() + eps)

        if no_prox:
            param.mul_(1 - lr * weight_decay)
            param.sub_(update * lr)
        else:
            param.sub_(update * lr)
            param.div_(1 + lr * weight_decay)


def _multi_tensor_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    state_steps: list[Tensor],
    *,
    capturable: bool,
    grad_clip_coef: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
) -> None:
    """torch._foreach implementation per (device, dtype) group; no host sync."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, state_steps]  # type: ignore[list-item]
    )
    for (device, _), (device_lists, _) in grouped.items():
        d_params, d_grads, d_exp_avgs, d_exp_avg_diffs, d_exp_avg_sqs, d_prev_grads, d_steps = device_lists
        d_grads = torch._foreach_neg(d_grads) if maximize else list(d_grads)
        if grad_clip_coef is not None:
            d_grads = torch._foreach_mul(d_grads, grad_clip_coef.to(device))
        torch._foreach_add_(d_steps, 1)
        diffs = torch._foreach_sub(d_grads, d_prev_grads)
        torch._foreach_mul_(diffs, _has_previous_grad(d_steps, capturable))

        torch._foreach_mul_(d_exp_avgs, beta1)
        torch._foreach_add_(d_exp_avgs, d_grads, alpha=1 - beta1)
        torch._foreach_mul_(d_exp_avg_diffs, beta2)
        torch._foreach_add_(d_exp_avg_diffs, diffs, alpha=1 - beta2)
        nesterov_grads = torch._foreach_add(d_grads, diffs, alpha=beta2)
        torch._foreach_mul_(d_exp_avg_sqs, beta3)
        torch._foreach_addcmul_(d_exp_avg_sqs, nesterov_grads, nesterov_grads, value=1 - beta3)
        torch._foreach_copy_(d_prev_grads, d_grads)

        updates = torch._foreach_div(d_exp_avgs, debias_factors(beta1, d_steps, capturable))
        diff_terms = torch._foreach_mul(d_exp_avg_diffs, [beta2 / bc for bc in debias_factors(beta2, d_steps, capturable)])
        torch._foreach_add_(updates, diff_terms)
        denoms = torch._foreach_div(d_exp_avg_sqs, debias_factors(beta3, d_steps, capturable))
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        torch._foreach_div_(updates, denoms)

        if no_prox:
            torch._foreach_mul_(d_params, 1 - lr * weight_decay)
            torch._foreach_sub_(d_params, torch._foreach_mul(updates, lr))
        else:
            torch._foreach_sub_(d_params, torch._foreach_mul(updates, lr))
            torch._foreach_div_(d_params, 1 + lr * weight_decay)
