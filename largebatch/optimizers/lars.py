"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._base import (
    LargeBatchOptimizer,
    PreparedGroup,
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
from ._inplace import add_scaled_, cache_chunks, foreach_add_scaled_
from ._kahan import (
    KAHAN_KEY,
    apply_update_,
    check_kahan_comps,
    compensated,
    foreach_apply_updates_,
    foreach_compensated,
    foreach_kahan_add_,
    fp32_combination,
    kahan_add_,
)
from ._quantised import check_unsharded, run_body
from ._sharding import ShardReduction, complete_norms, locals_of
from ._state_precision import foreach_store_, foreach_widened, is_quantised, new_state, store_, widened
from ._trust import trust_ratio

if TYPE_CHECKING:
    from largebatch.fused._plan import Bucket

__all__ = ["LARS", "lars"]


class LARS(LargeBatchOptimizer):
    r"""LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks").

    SGD with momentum where each layer's step is scaled by a local learning rate:

    .. math::
        \text{local} &= \eta \, \|w\| / (\|g\| + \lambda \|w\| + \epsilon)
            \quad (\text{local} = 1 \text{ if } \|w\| = 0 \text{ or } \|g\| = 0) \\
        d &= \text{local} \cdot (g + \lambda w) \\
        \text{buf} &\leftarrow \mu \, \text{buf} + (1 - \text{dampening}) \, d \\
        w &\leftarrow w - \text{lr} \cdot \text{buf}
            \qquad (\text{nesterov: } w \leftarrow w - \text{lr} \cdot (d + \mu \, \text{buf}))

    ``kahan_sum`` (bf16/fp16 parameters): w is the compensated value w̃ = p + c of the stored
    parameter p and its compensation buffer c (in float32), in λw and in ‖w‖ alike, and the step
    u = −lr·buf (−lr·(d + μ·buf) with Nesterov) is added to p with Kahan summation (see
    `largebatch.optimizers._kahan`): y = u + c, t = round(p + y), c ← y − (t − p), p ← t.

    Norms and the local rate are computed in float32 whatever the parameter dtype. Momentum
    buffers start at zero (so with dampening ≠ 0 the first step differs from torch.optim.SGD,
    which copies the first d into the buffer).

    Options:

    * ``trust_clip=True``: LARC's clip mode (apex), local ← min(local / lr, 1), so the effective
      rate lr · local never exceeds lr.
    * ``layer_adaptation=False`` on a group: local = 1 there (usual for biases and BatchNorm
      parameters, which the paper's training code excludes, together with weight decay).
    * ``lr_in_momentum``: the paper's (and TF's) form buf ← μ·buf + lr·d; w ← w − buf (nesterov:
      w ← w − (lr·d + μ·buf)). It equals the default form (timm, LARC, MAE: lr outside the
      buffer) while lr is constant and differs when a schedule changes lr. Default False.

    Args:
        params: tensors, named parameters, or param-group dicts (every option can be set per group).
        lr: learning rate, a float or a one-element tensor (default 1.0, as timm; LARS is usually run at
            lr ≈ 0.1·batch/256 with warmup).
        momentum: μ (default 0.9).
        dampening: (default 0).
        weight_decay: λ (default 0).
        nesterov: Nesterov momentum (default False; needs momentum > 0 and dampening = 0).
        trust_coefficient: η (default 0.001, the paper's).
        eps: added to the denominator of the local rate (default 1e-8).
        trust_clip: LARC clipping, see above (default False).
        layer_adaptation: compute the local rate for this group (default True).
        lr_in_momentum: the paper's momentum form, see above (default False).
        maximize, foreach, capturable, differentiable, fused: as in torch.optim.SGD / AdamW.
        kahan_sum: compensate the updates of bf16/fp16 parameters (state ``"kahan_comp"``, see
            above). None (default) and True: on for bf16/fp16 parameters, while fp32/fp64 ones
            have no buffer and step exactly as without the option; False: off.
        state_dtype: the momentum buffer's dtype: None (default) like the parameter,
            ``torch.float32`` or ``torch.bfloat16`` (or their names) whatever the parameter's.
            Arithmetic is fp32; a narrower buffer is written back rounded to nearest each step
            and the parameter steps with the stored value (see
            ``largebatch.optimizers._state_precision``). ``"8bit"``: the buffer block-quantised,
            int8 codes on a dynamic code map plus one float32 absmax per 256 elements (state
            ``"momentum_buffer_scale"``), dequantised to fp32 for each step and requantised
            after it (see ``largebatch.optimizers._quantised``; ``fused=True``: in the kernels'
            registers, ``largebatch.fused._blockwise``); not with ``differentiable=True`` or
            sharded parameters. load_state_dict converts a checkpoint's buffers to this
            optimizer's option, 8-bit included.
    """

    _name = "LARS"
    _has_fused = True
    _has_kahan = True
    _OPTIONAL_STATE_KEYS = ("momentum_buffer", KAHAN_KEY)
    _PRECISION_STATE_KEYS = ("momentum_buffer",)
    _QUANTISED_STATE_KEYS = ("momentum_buffer",)
    _LIVE_GROUP_KEYS = (*LargeBatchOptimizer._LIVE_GROUP_KEYS, "state_dtype")
    _NO_ADAPTATION_ADVICE = (
        "every group has layer_adaptation=False, so the local rate is 1 everywhere and this LARS is "
        "SGD with momentum. Set layer_adaptation=True on the weight groups (it is the default)."
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        layer_adaptation: bool = True,
        lr_in_momentum: bool = False,
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
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coefficient=trust_coefficient,
            eps=eps,
            trust_clip=trust_clip,
            layer_adaptation=layer_adaptation,
            lr_in_momentum=lr_in_momentum,
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
        check_non_negative("momentum", group["momentum"])
        check_non_negative("dampening", group["dampening"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive("trust_coefficient", group["trust_coefficient"])
        check_non_negative("eps", group["eps"])
        for flag in ("nesterov", "trust_clip", "layer_adaptation", "lr_in_momentum"):
            check_bool(flag, group[flag])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov: Nesterov momentum requires momentum > 0 and dampening = 0")

    def _setstate_defaults(self) -> dict[str, Any]:
        return {
            **super()._setstate_defaults(),
            "nesterov": False,
            "trust_clip": False,
            "layer_adaptation": True,
            "lr_in_momentum": False,
            "state_dtype": None,
        }

    def _group_adapts(self, group: dict[str, Any]) -> bool:
        return group["layer_adaptation"]

    def _init_state(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._init_state(param, state, group)
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            if is_quantised(group):
                self._init_quantised(param, state, "momentum_buffer")
            else:
                state["momentum_buffer"] = new_state(param, group)

    def _group_lists(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[list[Tensor]]:
        has_momentum = group["momentum"] != 0
        *buffers, steps = self._state_lists(params, group, ("momentum_buffer", "step") if has_momentum else ("step",))
        return [*locals_of(params, grads, *buffers), steps]

    def _fused_layout(self, group: dict[str, Any]) -> dict[str, int]:
        from largebatch.fused.lars import lars_layout

        return lars_layout(group["momentum"] != 0)

    def _step_group(self, group: dict[str, Any], prepared: PreparedGroup, grad_clip_coef: Tensor | None) -> None:
        params, grads, *buffers, steps = prepared.lists
        lars(
            params,
            grads,
            buffers[0] if buffers else None,
            steps,
            prepared.kahan_comps,
            **self._state_scales(group, prepared.params),
            shard_reduction=prepared.reduction,
            foreach=group["foreach"],
            fused=group["fused"],
            fused_buckets=prepared.buckets,
            differentiable=group["differentiable"],
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"],
            eps=group["eps"],
            trust_clip=group["trust_clip"],
            adapt=group["layer_adaptation"],
            lr_in_momentum=group["lr_in_momentum"],
            maximize=group["maximize"],
            **self._amp_args(),
        )


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None = None,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    fused_buckets: list[Bucket] | None = None,
    differentiable: bool = False,
    shard_reduction: ShardReduction | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    kahan_sum: bool | None = None,
    momentum_buffer_scales: list[Tensor] | None = None,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    adapt: bool,
    lr_in_momentum: bool,
    maximize: bool,
) -> None:
    """Functional LARS: one step over the given tensors, in place. See :class:`LARS`.

    ``momentum_buffers`` is None when ``momentum`` is 0; ``adapt`` is the group's
    ``layer_adaptation``; ``shard_reduction`` completes the norms across ranks when the tensors
    are local shards. ``grad_scale``/``found_inf`` are supported by the fused path only.
    ``kahan_comps``/``kahan_sum``: see :func:`largebatch.optimizers.lamb.lamb`.
    ``momentum_buffer_scales``: given, ``momentum_buffers`` are int8 codes with these per-block
    scales (see ``exp_avg_scales`` of :func:`largebatch.optimizers.lamb.lamb`).

    Raises:
        ValueError: the tensor lists differ in length, ``momentum_buffers`` is given with
            momentum 0 (or missing with momentum != 0), ``kahan_comps`` does not fit, or scales
            are given for sharded tensors.
    """
    check_same_lengths(
        params=params, grads=grads, momentum_buffers=momentum_buffers, state_steps=state_steps,
        momentum_buffer_scales=momentum_buffer_scales,
    )  # fmt: skip
    if not check_kahan_comps(params, kahan_comps, kahan_sum):
        kahan_comps = None
    hyper = dict(
        lr=scalar_lr(lr),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        trust_clip=trust_clip,
        adapt=adapt,
        lr_in_momentum=lr_in_momentum,
        maximize=maximize,
    )
    if (momentum_buffers is None) != (momentum == 0):
        raise ValueError("momentum_buffers must be given exactly when momentum != 0")
    scales = {2: momentum_buffer_scales}
    if fused:
        check_unsharded(scales.values(), shard_reduction is not None)
        from largebatch.fused import fused_lars

        fused_lars(
            params,
            grads,
            momentum_buffers,
            state_steps,
            kahan_comps,
            momentum_buffer_scales,
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
    body = partial(_single_tensor_lars if per_tensor else _multi_tensor_lars, shard_reduction=shard_reduction, **hyper)
    tensors = [params, grads, momentum_buffers, state_steps, kahan_comps]
    run_body(body, tensors, scales, per_tensor=per_tensor, sharded=shard_reduction is not None)


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    adapt: bool,
    lr_in_momentum: bool,
    maximize: bool,
    shard_reduction: ShardReduction | None,
) -> None:
    """The reference: one tensor at a time, reading like the equations.

    d = local · (g + λw) is folded into the coefficients of in-place adds (with momentum and
    without Nesterov it is never materialised: buf ← μ·buf + c·g + c·λ·w). Each tensor is
    finished while it is in cache; a sharded group takes all its norms first, for one all-reduce.
    With a compensation buffer, w is the compensated value p + c (float32) and the step a Kahan add.
    """
    buffers = momentum_buffers if momentum_buffers is not None else [None] * len(params)
    comps = kahan_comps if kahan_comps is not None else [None] * len(params)
    if adapt and shard_reduction is not None:
        values = [compensated(p, c) for p, c in zip(params, comps)]
        norms = complete_norms([param_norm(x) for x in values] + [fp32_norm(g) for g in grads], shard_reduction)
    for i, (param, grad, buf, step_t, comp) in enumerate(zip(params, grads, buffers, state_steps, comps)):
        step_t += 1
        grad = -grad if maximize else grad
        value = compensated(param, comp)  # w (w̃ = p + c with a buffer)
        local: float | Tensor = 1.0
        if adapt:
            if shard_reduction is not None:
                p_norm, g_norm = norms[i], norms[len(params) + i]
            else:
                p_norm, g_norm = param_norm(value), fp32_norm(grad)
            local = trust_ratio(p_norm, g_norm, coefficient=trust_coefficient, weight_decay=weight_decay, eps=eps)
            if trust_clip:
                local = torch.clamp(local / lr, max=1.0)
        _lars_update_(param, comp, value, grad, buf, local, lr, momentum, dampening, nesterov, weight_decay, lr_in_momentum)


def _lars_update_(
    param: Tensor,
    comp: Tensor | None,
    value: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    local: float | Tensor,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    lr_in_momentum: bool,
) -> None:
    """One tensor's momentum and step, d = local · (g + λw) (see the LARS docstring), in place;
    w is `value` (the parameter, or p + c with the compensation buffer `comp`)."""
    # What multiplies g + λw in the buffer, and what multiplies the buffer in the step.
    rate, step_lr = (local * lr, 1.0) if lr_in_momentum else (local, lr)
    if buf is not None:  # of another dtype than the gradient: updated in the wider one, stored rounded
        stored_buf, buf = buf, widened(buf, grad)
        grad = widened(grad, buf)
    if buf is not None and not nesterov:
        damped = rate if dampening == 0 else rate * (1 - dampening)
        buf.mul_(momentum)
        add_scaled_(buf, grad, damped)
        if weight_decay != 0:
            add_scaled_(buf, value, damped * weight_decay)
        buf = store_(stored_buf, buf)
        apply_update_(param, buf, -step_lr, comp)
        return
    direction = grad.add(value, alpha=weight_decay) if weight_decay != 0 else grad
    if buf is None:
        apply_update_(param, direction, -local * lr, comp)
        return
    buf.mul_(momentum)  # nesterov: dampening is 0
    add_scaled_(buf, direction, rate)
    buf = store_(stored_buf, buf)
    if comp is not None:
        kahan_add_(param, comp, fp32_combination((direction, -rate * step_lr), (buf, -step_lr * momentum)))
        return
    add_scaled_(param, direction, -rate * step_lr)
    add_scaled_(param, buf, -step_lr * momentum)


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    state_steps: list[Tensor],
    kahan_comps: list[Tensor | None] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    adapt: bool,
    lr_in_momentum: bool,
    maximize: bool,
    shard_reduction: ShardReduction | None,
) -> None:
    """torch._foreach implementation of the reference's update, each op over a chunk of a
    (device, dtype) group (cache-sized on the CPU, the whole group elsewhere: see `cache_chunks`);
    no host sync. A sharded group takes all chunks' norms first, for one all-reduce. A (device,
    dtype) group of bf16/fp16 parameters with buffers steps as the reference does with them."""
    none = [None] * len(params)
    lists = [params, grads, state_steps, momentum_buffers or none, kahan_comps or none]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists)  # type: ignore[arg-type]
    chunks = [chunk for device_lists, _ in grouped.values() for chunk in cache_chunks(device_lists)]
    # Per chunk: its buffers and compensation buffers (None where it has none), and w.
    buffers, comps = ([chunk[i] if chunk[i][0] is not None else None for chunk in chunks] for i in (3, 4))
    values = [foreach_compensated(chunk[0], chunk_comps) for chunk, chunk_comps in zip(chunks, comps)]
    if adapt and shard_reduction is not None:
        norms = complete_norms(
            [norm for x, (_, d_grads, *_) in zip(values, chunks) for norm in (foreach_fp32_norms(x), foreach_fp32_norms(d_grads))],
            shard_reduction,
        )
    for index, (d_params, d_grads, d_steps, *_) in enumerate(chunks):
        d_buffers, d_comps, d_values = buffers[index], comps[index], values[index]
        torch._foreach_add_(d_steps, 1)
        if d_buffers is not None:  # of another dtype than the gradients: updated in the wider one, stored rounded
            stored_buffers = d_buffers
            d_grads, (d_buffers,) = foreach_widened(d_grads, d_buffers)
        if maximize:
            d_grads = torch._foreach_neg(d_grads)  # a new list: the caller's .grad tensors are never modified
        count = len(d_params)
        local: Any = 1.0
        if adapt:
            if shard_reduction is not None:
                p_norms, g_norms = norms[2 * index], norms[2 * index + 1]
            else:
                p_norms, g_norms = foreach_fp32_norms(d_values), foreach_fp32_norms(d_grads)
            local = trust_ratio(p_norms, g_norms, coefficient=trust_coefficient, weight_decay=weight_decay, eps=eps)
            if trust_clip:
                local = torch.clamp(local / lr, max=1.0)
        rate, step_lr = (local * lr, 1.0) if lr_in_momentum else (local, lr)

        def per_tensor(coefficient: Any) -> list[Any]:
            return list(coefficient.unbind()) if isinstance(coefficient, Tensor) and coefficient.dim() else [coefficient] * count

        if d_buffers is not None and not nesterov:
            damped = rate if dampening == 0 else rate * (1 - dampening)
            torch._foreach_mul_(d_buffers, momentum)
            foreach_add_scaled_(d_buffers, d_grads, per_tensor(damped))
            if weight_decay != 0:
                foreach_add_scaled_(d_buffers, d_values, per_tensor(damped * weight_decay))
            d_buffers = foreach_store_(stored_buffers, d_buffers)
            foreach_apply_updates_(d_params, d_buffers, per_tensor(-step_lr), d_comps)
            continue
        directions = torch._foreach_add(d_grads, d_values, alpha=weight_decay) if weight_decay != 0 else d_grads
        if d_buffers is None:
            foreach_apply_updates_(d_params, directions, per_tensor(-local * lr), d_comps)
            continue
        torch._foreach_mul_(d_buffers, momentum)
        foreach_add_scaled_(d_buffers, directions, per_tensor(rate))
        d_buffers = foreach_store_(stored_buffers, d_buffers)
        direction_coefs, buffer_coefs = per_tensor(-rate * step_lr), per_tensor(-step_lr * momentum)
        if d_comps is not None:
            updates = [fp32_combination(*terms) for terms in zip(zip(directions, direction_coefs), zip(d_buffers, buffer_coefs))]
            foreach_kahan_add_(d_params, d_comps, updates)
            continue
        foreach_add_scaled_(d_params, directions, direction_coefs)
        foreach_add_scaled_(d_params, d_buffers, buffer_coefs)
