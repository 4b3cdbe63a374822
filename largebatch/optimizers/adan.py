"""Adan: adaptive Nesterov momentum (Xie et al. 2022), as the official implementation computes it."""

from __future__ import annotations

from functools import partial
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
    resolve_foreach,
    scalar_lr,
)
from ._inplace import (
    add_quotient_,
    add_scaled_,
    cache_chunks,
    foreach_add_quotients_,
    foreach_sqrt_denominators,
    reusable,
    sqrt_denominator,
    step_values,
)
from ._kahan import KAHAN_KEY, check_kahan_comps, compensated, foreach_compensated, foreach_kahan_add_, fp32_combination, kahan_add_
from ._quantised import run_body
from ._sharding import locals_of
from ._state_precision import foreach_store_, foreach_widened, store_, widened

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

    ``kahan_sum`` (bf16/fp16 parameters): x is the compensated value x̃ = p + c of the stored
    parameter p and its compensation buffer c (in float32), and the whole step, decay included,
    u = x_new − x̃ (prox: u = −lr·(η + λ·x̃) / (1 + lr·λ); no_prox: u = −lr·(η + λ·x̃)), is
    added to p with Kahan summation (see `largebatch.optimizers._kahan`): y = u + c,
    t = round(p + y), c ← y − (t − p), p ← t. (A separate decay multiply would round away in
    bf16 as the small steps do.)

    Args:
        params: tensors, named parameters, or param-group dicts (every option can be set per group).
        lr: learning rate, a float or a one-element tensor (default 1e-3).
        betas: (β1, β2, β3) (default (0.98, 0.92, 0.99), the official defaults).
        eps: added outside the square root (default 1e-8).
        weight_decay: λ (default 0).
        no_prox: decoupled decay x·(1 − lr·λ) instead of the proximal division (default False).
        max_grad_norm: clip the global gradient norm (over all groups) first (default None).
        maximize, foreach, capturable, differentiable, fused: as in torch.optim.AdamW.
        kahan_sum: compensate the updates of bf16/fp16 parameters (state ``"kahan_comp"``, see
            above). None (default) and True: on for bf16/fp16 parameters, while fp32/fp64 ones
            have no buffer and step exactly as without the option; False: off.
        state_dtype: the dtype of m, d, n and g_prev: None (default) like the parameter,
            ``torch.float32`` or ``torch.bfloat16`` (or their names) whatever the parameter's.
            Arithmetic is fp32; a narrower state is written back rounded to nearest each step
            (see ``largebatch.optimizers._state_precision``). g_prev follows the option too: it
            costs as much memory as a moment, and rounding it perturbs Δ by at most 2⁻⁹·|g_prev|,
            the same relative precision the bf16 moments keep. ``"8bit"``: m, d and n
            block-quantised, one byte per element (int8 codes for m and d, uint8 for n, on a
            dynamic code map) plus one float32 absmax per 256 elements (states
            ``"<key>_scale"``), dequantised to fp32 for each step and requantised after it (see
            ``largebatch.optimizers._quantised``); g_prev is then kept in bf16, since Δ = g −
            g_prev is taken element by element and a block-quantised g_prev would add the
            block's rounding error (up to 0.7 % of the block's largest gradient) to every Δ.
            All three paths take it (``fused=True``: ``largebatch.fused._blockwise``); not
            ``differentiable=True`` or sharded parameters. load_state_dict converts a
            checkpoint's states to this optimizer's option, 8-bit included.
    """

    _name = "Adan"
    _has_fused = True
    _has_kahan = True
    _STATE_KEYS = ("step", "exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")
    _OPTIONAL_STATE_KEYS = (KAHAN_KEY,)
    _SQUARED_STATE_KEYS = ("exp_avg_sq",)
    _PRECISION_STATE_KEYS = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")
    _QUANTISED_STATE_KEYS = ("exp_avg", "exp_avg_diff", "exp_avg_sq")
    _LIVE_GROUP_KEYS = (*LargeBatchOptimizer._LIVE_GROUP_KEYS, "state_dtype")

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
        kahan_sum: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
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
            kahan_sum=kahan_sum,
            state_dtype=state_dtype,
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
        return {**super()._setstate_defaults(), "no_prox": False, "max_grad_norm": None, "state_dtype": None}

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
            prepared.kahan_comps,
            **self._state_scales(group, prepared.params),
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
    kahan_comps: list[Tensor | None] | None = None,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    fused_buckets: list[Bucket] | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    grad_clip_coef: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    kahan_sum: bool | None = None,
    exp_avg_scales: list[Tensor] | None = None,
    exp_avg_diff_scales: list[Tensor] | None = None,
    exp_avg_sq_scales: list[Tensor] | None = None,
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
    ``kahan_comps``/``kahan_sum``: see :func:`largebatch.optimizers.lamb.lamb`.
    ``exp_avg_scales``/``exp_avg_diff_scales``/``exp_avg_sq_scales``: given, that state's list
    holds 8-bit codes with these per-block scales (see :func:`largebatch.optimizers.lamb.lamb`).

    Raises:
        ValueError: the tensor lists differ in length, ``kahan_comps`` does not fit, or
            (``fused=True``) scales are given for only some of the states.
    """
    check_same_lengths(
        params=params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_diffs=exp_avg_diffs,
        exp_avg_sqs=exp_avg_sqs,
        prev_grads=prev_grads,
        state_steps=state_steps,
        exp_avg_scales=exp_avg_scales,
        exp_avg_diff_scales=exp_avg_diff_scales,
        exp_avg_sq_scales=exp_avg_sq_scales,
    )
    if not check_kahan_comps(params, kahan_comps, kahan_sum):
        kahan_comps = None
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
    tensors = (params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, state_steps, kahan_comps)
    scales = {2: exp_avg_scales, 3: exp_avg_diff_scales, 4: exp_avg_sq_scales}
    if fused:
        from largebatch.fused import fused_adan

        fused_adan(*tensors, *scales.values(), grad_scale=grad_scale, found_inf=found_inf, buckets=fused_buckets, **hyper)
        return
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError("grad_scale/found_inf are only supported with fused=True")
    per_tensor = not resolve_foreach(params, foreach, differentiable)
    body = partial(_single_tensor_adan if per_tensor else _multi_tensor_adan, capturable=capturable, **hyper)
    # The update is elementwise (the clipping coefficient comes in whole): shards need no norm.
    run_body(body, tensors, scales, per_tensor=per_tensor, sharded=False)


def _single_tensor_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None,
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
    """The reference: one tensor at a time, reading like the equations, each op in place.

    The moving averages are lerps (β·a + (1−β)·b); g + β2·Δ is kept as (g + β2·Δ) / (1 + β2), a
    lerp of Δ towards g, its factor moved into n's coefficient; the bias corrections are scalars
    (see `sqrt_denominator`). The step counter is read once per tensor (not capturable). With a
    compensation buffer the step is one Kahan add (see `_kahan_step`).
    """
    comps = kahan_comps if kahan_comps is not None else [None] * len(params)
    tensors = zip(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, state_steps, comps)
    for param, grad, exp_avg, exp_avg_diff, exp_avg_sq, prev_grad, step_t, comp in tensors:
        grad = -grad if maximize else grad
        if grad_clip_coef is not None:
            grad = grad * grad_clip_coef.to(grad.device, grad.dtype)
        step_t += 1
        step = step_t if capturable else step_t.item()
        # States of another dtype than the gradient: updated in the wider one, stored rounded.
        stored = exp_avg, exp_avg_diff, exp_avg_sq
        exp_avg, exp_avg_diff, exp_avg_sq = (widened(state, grad) for state in stored)
        grad = widened(grad, exp_avg)
        # Δ = g − g_prev, 0 on the first step (there is no previous gradient).
        if capturable:
            diff = (grad - prev_grad).mul_((step > 1).to(grad.dtype))
        else:
            diff = grad - prev_grad if step > 1 else torch.zeros_like(grad)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_diff.lerp_(diff, 1 - beta2)
        nesterov = diff.lerp_(grad, 1 / (1 + beta2))  # (g + β2·Δ) / (1 + β2)
        exp_avg_sq.mul_(beta3).addcmul_(nesterov, nesterov, value=(1 - beta3) * (1 + beta2) ** 2)
        prev_grad.copy_(grad)
        exp_avg, exp_avg_diff, exp_avg_sq = map(store_, stored, (exp_avg, exp_avg_diff, exp_avg_sq))

        # η = (m / bc1 + β2 · d / bc2) / (√(n / bc3) + ε) = sqrt_bc3 · (m / bc1 + β2 · d / bc2) / denom
        denom, sqrt_bc3 = sqrt_denominator(exp_avg_sq, 1 - beta3**step, eps, out=reusable(nesterov))
        m_coef, d_coef = -lr * sqrt_bc3 / (1 - beta1**step), -lr * sqrt_bc3 * beta2 / (1 - beta2**step)
        if comp is not None:
            update = fp32_combination((exp_avg / denom, m_coef), (exp_avg_diff / denom, d_coef))
            kahan_add_(param, comp, _decayed(update, compensated(param, comp), lr, weight_decay, no_prox))
            continue
        if no_prox:
            param.mul_(1 - lr * weight_decay)
        add_quotient_(param, exp_avg, denom, m_coef)
        add_quotient_(param, exp_avg_diff, denom, d_coef)
        if not no_prox and weight_decay != 0:
            param.div_(1 + lr * weight_decay)


def _decayed(update: Tensor, value: Tensor, lr: float | Tensor, weight_decay: float, no_prox: bool) -> Tensor:
    """The compensated step u = x_new − x̃ from −lr·η (`update`, float32, overwritten) and x̃
    (`value`): −lr·(η + λ·x̃), divided by 1 + lr·λ unless no_prox (see the Adan docstring)."""
    if weight_decay == 0:
        return update
    add_scaled_(update, value, -lr * weight_decay)
    return update if no_prox else update.div_(1 + lr * weight_decay)


def _multi_tensor_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None,
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
    """torch._foreach implementation of the reference's update, each op over a chunk of a
    (device, dtype) group (cache-sized on the CPU, the whole group elsewhere: see `cache_chunks`);
    no host sync (CPU step counters are read once per chunk, not once per tensor)."""
    lists = [params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, state_steps]
    if kahan_comps is not None:
        lists.append(kahan_comps)  # type: ignore[arg-type]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists)  # type: ignore[arg-type]
    for (device, dtype), (device_lists, _) in grouped.items():
        for chunk in cache_chunks(device_lists):
            d_params, d_grads, d_exp_avgs, d_exp_avg_diffs, d_exp_avg_sqs, d_prev_grads, d_steps, *rest = chunk
            d_comps = rest[0] if rest and rest[0][0] is not None else None
            if maximize:
                d_grads = torch._foreach_neg(d_grads)  # a new list: the caller's .grad tensors are never modified
            if grad_clip_coef is not None:
                d_grads = torch._foreach_mul(d_grads, grad_clip_coef.to(device, dtype))
            torch._foreach_add_(d_steps, 1)
            # States of another dtype than the gradients: updated in the wider one, stored rounded.
            stored = d_exp_avgs, d_exp_avg_diffs, d_exp_avg_sqs
            d_grads, (d_exp_avgs, d_exp_avg_diffs, d_exp_avg_sqs) = foreach_widened(d_grads, *stored)
            steps: list[Any] = list(d_steps) if capturable else step_values(d_steps)
            diffs = torch._foreach_sub(d_grads, d_prev_grads)
            if capturable:
                torch._foreach_mul_(diffs, [(step > 1).to(diffs[0].dtype) for step in steps])
            elif 1 in steps:
                torch._foreach_zero_([diff for diff, step in zip(diffs, steps) if step == 1])

            torch._foreach_lerp_(d_exp_avgs, d_grads, 1 - beta1)
            torch._foreach_lerp_(d_exp_avg_diffs, diffs, 1 - beta2)
            torch._foreach_lerp_(diffs, d_grads, 1 / (1 + beta2))  # (g + β2·Δ) / (1 + β2)
            torch._foreach_mul_(d_exp_avg_sqs, beta3)
            torch._foreach_addcmul_(d_exp_avg_sqs, diffs, diffs, value=(1 - beta3) * (1 + beta2) ** 2)
            torch._foreach_copy_(d_prev_grads, d_grads)
            working = d_exp_avgs, d_exp_avg_diffs, d_exp_avg_sqs
            d_exp_avgs, d_exp_avg_diffs, d_exp_avg_sqs = map(foreach_store_, stored, working)

            bc3s = [1 - beta3**step for step in steps]
            denoms, sqrt_bc3s = foreach_sqrt_denominators(d_exp_avg_sqs, bc3s, eps, outs=diffs)  # diffs are dead
            m_coefs = [-lr * s / (1 - beta1**step) for s, step in zip(sqrt_bc3s, steps)]
            d_coefs = [-lr * s * beta2 / (1 - beta2**step) for s, step in zip(sqrt_bc3s, steps)]
            if d_comps is not None:
                m_quotients, d_quotients = torch._foreach_div(d_exp_avgs, denoms), torch._foreach_div(d_exp_avg_diffs, denoms)
                terms = zip(zip(m_quotients, m_coefs), zip(d_quotients, d_coefs))
                values = foreach_compensated(d_params, d_comps)
                updates = [_decayed(fp32_combination(*t), x, lr, weight_decay, no_prox) for t, x in zip(terms, values)]
                foreach_kahan_add_(d_params, d_comps, updates)
                continue
            if no_prox:
                torch._foreach_mul_(d_params, 1 - lr * weight_decay)
            foreach_add_quotients_(d_params, d_exp_avgs, denoms, m_coefs)
            foreach_add_quotients_(d_params, d_exp_avg_diffs, denoms, d_coefs)
            if not no_prox and weight_decay != 0:
                torch._foreach_div_(d_params, 1 + lr * weight_decay)
