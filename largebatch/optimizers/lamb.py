"""LAMB: layer-wise adaptive moments for large batches (You et al. 2019, Algorithm 2)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._base import (
    LargeBatchOptimizer,
    PreparedGroup,
    debias_factors,
    check_beta,
    check_bool,
    check_non_negative,
    check_positive,
    check_same_lengths,
    foreach_fp32_norms,
    fp32_norm,
    param_norm,
    resolve_foreach,
    scalar_lr,
)
from ._inplace import (
    add_scaled_,
    cache_chunks,
    foreach_add_scaled_,
    foreach_into,
    foreach_sqrt_denominators,
    reusable,
    sqrt_denominator,
    step_values,
)
from ._kahan import KAHAN_KEY, apply_update_, check_kahan_comps, compensated, foreach_apply_updates_, foreach_compensated
from ._quantised import check_unsharded, run_body
from ._sharding import ShardReduction, complete_norms, locals_of
from ._state_precision import foreach_store_, foreach_widened, store_, widened
from ._trust import trust_ratio

if TYPE_CHECKING:
    from largebatch.fused._plan import Bucket

__all__ = ["LAMB", "lamb"]


class LAMB(LargeBatchOptimizer):
    r"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", Algorithm 2).

    For each parameter tensor x with gradient g, at step t:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g \qquad (\text{or } \beta_1 m + g \text{ without grad\_averaging}) \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat m &= m / (1-\beta_1^t), \quad \hat v = v / (1-\beta_2^t) \quad (\text{bias\_correction}) \\
        u &= \hat m / (\sqrt{\hat v} + \epsilon) + \lambda x \\
        r &= \|x\| / \|u\| \quad (r = 1 \text{ if either norm is } 0;\ r \le \text{trust\_clip}) \\
        x &\leftarrow x - \text{lr} \cdot r \cdot u

    Norms and r are computed in float32 whatever the parameter dtype.

    ``kahan_sum`` (bf16/fp16 parameters): x is the compensated value x̃ = p + c of the stored
    parameter p and its compensation buffer c (in float32), in λx and in ‖x‖ alike, and the step
    −lr·r·u is added to p with Kahan summation (see `largebatch.optimizers._kahan`):

    .. math::
        y = -\text{lr} \cdot r \cdot u + c, \quad t = \operatorname{round}(p + y), \quad
        c \leftarrow y - (t - p), \quad p \leftarrow t

    Which tensors are adapted (r computed) and which use r = 1:

    * ``layer_adaptation=False`` on a group excludes it (usual for biases and norm weights).
    * ``always_adapt=False`` (default, as apex FusedLAMB and timm): a group with ``weight_decay=0``
      uses r = 1. ``always_adapt=True`` adapts every layer, as the paper's algorithm does.

    With ``weight_decay=0`` and ``always_adapt=False`` LAMB is exactly Adam.

    Args:
        params: tensors, named parameters, or param-group dicts (every option below can be
            overridden per group).
        lr: learning rate, a float or a one-element tensor (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: added to √v̂ (default 1e-6, as apex and the paper's code).
        weight_decay: λ, decoupled, inside u so it is scaled by r (default 0.01).
        bias_correction: divide the moments by 1 − β^t (default True).
        grad_averaging: scale g by 1 − β1 in the first moment (default True).
        trust_clip: upper bound on r (default None: unbounded).
        always_adapt: adapt groups with weight_decay 0 too (default False, see above).
        layer_adaptation: compute r for this group (default True).
        max_grad_norm: clip the global gradient norm (over all groups) to this value before the
            update, as ``torch.nn.utils.clip_grad_norm_`` does (default None: no clipping; apex
            clips at 1.0 without saying so, we do not).
        maximize: maximize the objective instead of minimizing it.
        foreach: use the ``torch._foreach`` implementation (default: on CUDA only).
        capturable: keep the step counter on the device so the step can be CUDA-graph captured.
        differentiable: let autograd run through the step (per-tensor implementation only).
        fused: use the Triton multi-tensor kernels of ``largebatch.fused``.
        kahan_sum: compensate the updates of bf16/fp16 parameters with a buffer of their dtype
            (state ``"kahan_comp"``, 2 bytes per parameter; see above). None (default) and True:
            on for bf16/fp16 parameters, while fp32/fp64 parameters of the group have no buffer
            and step exactly as without the option; False: off.
        state_dtype: the dtype of m and v: None (default) like the parameter, ``torch.float32``
            or ``torch.bfloat16`` (or their names) whatever the parameter's. Arithmetic is fp32;
            a narrower state is written back rounded to nearest each step (see
            ``largebatch.optimizers._state_precision``). ``"8bit"``: m and v block-quantised, one
            byte per element (int8 codes for m, uint8 for v, on a dynamic code map) plus one
            float32 absmax per 256 elements (states ``"exp_avg_scale"``, ``"exp_avg_sq_scale"``),
            dequantised to fp32 for each step and requantised after it (see
            ``largebatch.optimizers._quantised``; ``fused=True``: in the kernels' registers,
            ``largebatch.fused._blockwise``); not with ``differentiable=True`` or sharded
            parameters. load_state_dict converts a checkpoint's states to this optimizer's
            option, 8-bit included.
    """

    _name = "LAMB"
    _has_fused = True
    _has_kahan = True
    _STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
    _OPTIONAL_STATE_KEYS = (KAHAN_KEY,)
    _SQUARED_STATE_KEYS = ("exp_avg_sq",)
    _PRECISION_STATE_KEYS = ("exp_avg", "exp_avg_sq")
    _QUANTISED_STATE_KEYS = ("exp_avg", "exp_avg_sq")
    _LIVE_GROUP_KEYS = (*LargeBatchOptimizer._LIVE_GROUP_KEYS, "state_dtype")
    _NO_ADAPTATION_ADVICE = (
        "every group has weight_decay=0 with always_adapt=False (or layer_adaptation=False), so the "
        "trust ratio is 1 everywhere and this LAMB is exactly Adam. Hugging Face Trainer builds its groups "
        "with TrainingArguments.weight_decay, whose default is 0. Set weight_decay > 0 on the weight "
        "groups, or always_adapt=True."
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        trust_clip: float | None = None,
        always_adapt: bool = False,
        layer_adaptation: bool = True,
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
            bias_correction=bias_correction,
            grad_averaging=grad_averaging,
            trust_clip=trust_clip,
            always_adapt=always_adapt,
            layer_adaptation=layer_adaptation,
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
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])
        check_non_negative("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive("trust_clip", group["trust_clip"], allow_none=True)
        check_positive("max_grad_norm", group["max_grad_norm"], allow_none=True)
        for flag in ("bias_correction", "grad_averaging", "always_adapt", "layer_adaptation"):
            check_bool(flag, group[flag])

    def _setstate_defaults(self) -> dict[str, Any]:
        return {
            **super()._setstate_defaults(),
            "bias_correction": True,
            "grad_averaging": True,
            "trust_clip": None,
            "always_adapt": False,
            "layer_adaptation": True,
            "max_grad_norm": None,
            "state_dtype": None,
        }

    def _group_adapts(self, group: dict[str, Any]) -> bool:
        return lamb_adapts(group)

    def _group_lists(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[list[Tensor]]:
        exp_avgs, exp_avg_sqs, steps = self._state_lists(params, group, ("exp_avg", "exp_avg_sq", "step"))
        return [*locals_of(params, grads, exp_avgs, exp_avg_sqs), steps]

    def _fused_layout(self, group: dict[str, Any]) -> dict[str, int]:
        from largebatch.fused.lamb import LAMB_LAYOUT

        return LAMB_LAYOUT

    def _step_group(self, group: dict[str, Any], prepared: PreparedGroup, grad_clip_coef: Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        lamb(
            *prepared.lists,
            prepared.kahan_comps,
            **self._state_scales(group, prepared.params),
            shard_reduction=prepared.reduction,
            foreach=group["foreach"],
            fused=group["fused"],
            fused_buckets=prepared.buckets,
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            grad_clip_coef=grad_clip_coef,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"],
            grad_averaging=group["grad_averaging"],
            trust_clip=group["trust_clip"],
            adapt=lamb_adapts(group),
            maximize=group["maximize"],
            **self._amp_args(),
        )


def lamb_adapts(group: dict[str, Any]) -> bool:
    """Whether a LAMB group uses the trust ratio (see the LAMB docstring)."""
    return group["layer_adaptation"] and (group["always_adapt"] or group["weight_decay"] != 0)


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None = None,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    fused_buckets: list[Bucket] | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    grad_clip_coef: Tensor | None = None,
    shard_reduction: ShardReduction | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    kahan_sum: bool | None = None,
    exp_avg_scales: list[Tensor] | None = None,
    exp_avg_sq_scales: list[Tensor] | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    grad_averaging: bool,
    trust_clip: float | None,
    adapt: bool,
    maximize: bool,
) -> None:
    """Functional LAMB: one step over the given tensors, in place. See :class:`LAMB`.

    ``adapt`` says whether the trust ratio is used (the class derives it from ``layer_adaptation``,
    ``always_adapt`` and ``weight_decay``); ``grad_clip_coef`` is the global clipping multiplier;
    ``shard_reduction`` completes the norms across ranks when the tensors are local shards.
    ``grad_scale``/``found_inf`` (GradScaler's protocol) are supported by the fused path only.
    ``kahan_comps``: per parameter its compensation buffer (bf16/fp16 parameters) or None; given,
    the updates are compensated (``kahan_sum`` None or True; see `check_kahan_comps`).
    ``exp_avg_scales``/``exp_avg_sq_scales``: given, ``exp_avgs``/``exp_avg_sqs`` are 8-bit codes
    (int8/uint8) with these per-block scales, dequantised for the step and requantised after
    (see `largebatch.optimizers._quantised`; with ``fused=True`` every quantised state needs
    its scales; not with sharded tensors).

    Raises:
        ValueError: the tensor lists differ in length, ``kahan_comps`` does not fit, scales are
            given for sharded tensors, or (``fused=True``) for only some of the states.
    """
    check_same_lengths(
        params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps,
        exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
    )  # fmt: skip
    if not check_kahan_comps(params, kahan_comps, kahan_sum):
        kahan_comps = None
    hyper = dict(
        lr=scalar_lr(lr),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        bias_correction=bias_correction,
        grad_averaging=grad_averaging,
        trust_clip=trust_clip,
        adapt=adapt,
        maximize=maximize,
        grad_clip_coef=grad_clip_coef,
    )
    scales = {2: exp_avg_scales, 3: exp_avg_sq_scales}
    if fused:
        check_unsharded(scales.values(), shard_reduction is not None)
        from largebatch.fused import fused_lamb

        fused_lamb(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            kahan_comps,
            exp_avg_scales,
            exp_avg_sq_scales,
            grad_scale=grad_scale,
            found_inf=found_inf,
            shard_reduction=shard_reduction,
            buckets=fused_buckets,
            **hyper,
        )
        return
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError("grad_scale/found_inf are only supported with fused=True")
    per_tensor = not resolve_foreach(params, foreach, differentiable)
    body = partial(
        _single_tensor_lamb if per_tensor else _multi_tensor_lamb,
        capturable=capturable,
        shard_reduction=shard_reduction,
        **hyper,
    )
    tensors = [params, grads, exp_avgs, exp_avg_sqs, state_steps, kahan_comps]
    run_body(body, tensors, scales, per_tensor=per_tensor, sharded=shard_reduction is not None)


def _single_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None,
    *,
    capturable: bool,
    grad_clip_coef: Tensor | None,
    shard_reduction: ShardReduction | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    grad_averaging: bool,
    trust_clip: float | None,
    adapt: bool,
    maximize: bool,
) -> None:
    """The reference: one tensor at a time, reading like the equations.

    The update is held as scale · update (see `sqrt_denominator`): the bias corrections and the
    decay's factor are scalars, not passes. Each tensor is finished while it is in cache; only a sharded
    group keeps its updates until one all-reduce has completed their norms. With a compensation
    buffer, x is the compensated value p + c (float32) and the step is a Kahan add.
    """
    kept = []
    comps = kahan_comps if kahan_comps is not None else [None] * len(params)
    for param, grad, exp_avg, exp_avg_sq, step_t, comp in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, comps):
        grad = -grad if maximize else grad
        if grad_clip_coef is not None:
            grad = grad * grad_clip_coef.to(grad.device, grad.dtype)
        step_t += 1
        # States of another dtype than the gradient: updated in the wider one, stored rounded.
        stored_avg, stored_avg_sq = exp_avg, exp_avg_sq
        exp_avg, exp_avg_sq, grad = widened(exp_avg, grad), widened(exp_avg_sq, grad), widened(grad, exp_avg)

        if grad_averaging:
            exp_avg.lerp_(grad, 1 - beta1)
        else:
            exp_avg.mul_(beta1).add_(grad)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg, exp_avg_sq = store_(stored_avg, exp_avg), store_(stored_avg_sq, exp_avg_sq)
        if bias_correction:
            step = step_t if capturable else step_t.item()  # a CPU counter: no device sync
            bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        else:
            bc1 = bc2 = 1.0
        # m̂ / (√v̂ + ε) = scale · update: the bias corrections are scalars, not passes.
        denom, sqrt_bc2 = sqrt_denominator(exp_avg_sq, bc2, eps)
        update, scale = torch.div(exp_avg, denom, out=reusable(denom)), sqrt_bc2 / bc1
        value = compensated(param, comp)  # x (x̃ = p + c with a buffer)
        if weight_decay != 0:
            add_scaled_(update, value, weight_decay / scale)  # u = scale · (q + λ/scale · x)

        if not adapt:
            apply_update_(param, update, -lr * scale, comp)
        elif shard_reduction is not None:
            kept.append((param, update, scale, comp, value))
        else:
            ratio = trust_ratio(param_norm(value), fp32_norm(update) * scale, max_ratio=trust_clip)
            apply_update_(param, update, ratio * (-lr * scale), comp)
    if not kept:
        return
    norms = [param_norm(x) for *_, x in kept] + [fp32_norm(u) * s for _, u, s, *_ in kept]
    norms = complete_norms(norms, shard_reduction)
    for (param, update, scale, comp, _), p_norm, u_norm in zip(kept, norms[: len(kept)], norms[len(kept) :]):
        ratio = trust_ratio(p_norm, u_norm, max_ratio=trust_clip)
        apply_update_(param, update, ratio * (-lr * scale), comp)


def _multi_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None,
    *,
    capturable: bool,
    grad_clip_coef: Tensor | None,
    shard_reduction: ShardReduction | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    grad_averaging: bool,
    trust_clip: float | None,
    adapt: bool,
    maximize: bool,
) -> None:
    """torch._foreach implementation of the reference's update, each op over a chunk of a
    (device, dtype) group (cache-sized on the CPU, the whole group elsewhere: see `cache_chunks`);
    no host sync (CPU step counters are read once per chunk).

    A sharded group keeps its updates until one all-reduce has completed all chunks' norms.
    A (device, dtype) group of bf16/fp16 parameters with buffers steps as the reference does
    with them.
    """
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    if kahan_comps is not None:
        lists.append(kahan_comps)  # type: ignore[arg-type]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists)  # type: ignore[arg-type]
    kept = []
    for (device, dtype), (device_lists, _) in grouped.items():
        for d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps, *rest in cache_chunks(device_lists):
            d_comps = rest[0] if rest and rest[0][0] is not None else None
            # New lists: the caller's .grad tensors are never modified.
            if maximize:
                d_grads = torch._foreach_neg(d_grads)
            if grad_clip_coef is not None:
                d_grads = torch._foreach_mul(d_grads, grad_clip_coef.to(device, dtype))
            torch._foreach_add_(d_steps, 1)
            # States of another dtype than the gradients: updated in the wider one, stored rounded.
            stored = d_exp_avgs, d_exp_avg_sqs
            d_grads, (d_exp_avgs, d_exp_avg_sqs) = foreach_widened(d_grads, d_exp_avgs, d_exp_avg_sqs)

            if grad_averaging:
                torch._foreach_lerp_(d_exp_avgs, d_grads, 1 - beta1)
            else:
                torch._foreach_mul_(d_exp_avgs, beta1)
                torch._foreach_add_(d_exp_avgs, d_grads)
            torch._foreach_mul_(d_exp_avg_sqs, beta2)
            torch._foreach_addcmul_(d_exp_avg_sqs, d_grads, d_grads, value=1 - beta2)
            d_exp_avgs, d_exp_avg_sqs = foreach_store_(stored[0], d_exp_avgs), foreach_store_(stored[1], d_exp_avg_sqs)
            if not bias_correction:
                bc1s = bc2s = [1.0] * len(d_steps)
            elif capturable:
                bc1s, bc2s = debias_factors(beta1, d_steps, True), debias_factors(beta2, d_steps, True)
            else:
                steps = step_values(d_steps)
                bc1s, bc2s = [1 - beta1**t for t in steps], [1 - beta2**t for t in steps]
            denoms, sqrt_bc2s = foreach_sqrt_denominators(d_exp_avg_sqs, bc2s, eps)
            updates = foreach_into(torch.div, torch._foreach_div, [d_exp_avgs, denoms], denoms)
            scales = [s / bc1 for s, bc1 in zip(sqrt_bc2s, bc1s)]
            values = foreach_compensated(d_params, d_comps)  # x (x̃ = p + c with buffers)
            if weight_decay != 0:
                foreach_add_scaled_(updates, values, [weight_decay / s for s in scales])

            if not adapt:
                foreach_apply_updates_(d_params, updates, [-lr * s for s in scales], d_comps)
            elif shard_reduction is not None:
                kept.append((d_params, updates, scales, d_comps, values))
            else:
                norms = (foreach_fp32_norms(values), foreach_fp32_norms(updates))
                _apply_trust_ratios(d_params, updates, scales, *norms, lr, trust_clip, d_comps)
    if not kept:
        return
    norms = [norm for _, updates, _, _, values in kept for norm in (foreach_fp32_norms(values), foreach_fp32_norms(updates))]
    norms = complete_norms(norms, shard_reduction)
    for (d_params, updates, scales, d_comps, _), p_norms, u_norms in zip(kept, norms[::2], norms[1::2]):
        _apply_trust_ratios(d_params, updates, scales, p_norms, u_norms, lr, trust_clip, d_comps)


def _apply_trust_ratios(
    params: list[Tensor],
    updates: list[Tensor],
    scales: list[Any],
    param_norms: Tensor,
    update_norms: Tensor,
    lr: float | Tensor,
    trust_clip: float | None,
    comps: list[Tensor] | None,
) -> None:
    """x ← x − lr · r · s · q for a foreach chunk, r from the norms of x and of s · q (vectors);
    a Kahan add where the chunk has compensation buffers."""
    scales_t = torch.stack(scales) if isinstance(scales[0], Tensor) else torch.tensor(scales, dtype=update_norms.dtype)
    scales_t = scales_t.to(update_norms.device)
    ratios = trust_ratio(param_norms, update_norms * scales_t, max_ratio=trust_clip)
    coefficients = (ratios * (-lr * scales_t)).unbind()
    if comps is None:
        torch._foreach_addcmul_(params, updates, coefficients)
    else:
        foreach_apply_updates_(params, updates, coefficients, comps)
