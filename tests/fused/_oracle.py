"""Plain float64 transcriptions of one LAMB, LARS and Adan step: the oracle of tests/fused.

Written from the equations, independent of the library. The fused kernels compute in fp32 and
store parameters and states in their own dtypes; the oracle computes in float64 and rounds to
each tensor's storage dtype at the same points, so the two differ by fp32 arithmetic error plus,
now and then, one unit in the last place where they fall on either side of a rounding boundary.

Each stored tensor is a `Stored`: its float64 value (always representable in its dtype) and
its dtype. Step counters are plain ints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from largebatch.fused._engine import INTERPRETED

# The Triton interpreter converts fp32 to bf16 by dropping the low 16 bits; compiled kernels
# round to nearest even, as torch does.
BF16_TRUNCATES = INTERPRETED


def round_to(value: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 `value` computed in fp32 and stored as `dtype`, back as float64."""
    single = value.to(torch.float32)
    if dtype == torch.bfloat16 and BF16_TRUNCATES:
        return (single.view(torch.int32) & -65536).view(torch.float32).double()
    return single.to(dtype).double()


@dataclass
class Stored:
    value: Tensor
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: Tensor, dtype: torch.dtype | None = None) -> Stored:
        dtype = dtype or tensor.dtype
        return cls(round_to(tensor.double(), dtype), dtype)

    def set(self, value: Tensor) -> None:
        self.value = round_to(value, self.dtype)


def _effective_grad(grad: Tensor, *, maximize: bool, grad_scale: float | None, clip: float | None) -> Tensor:
    g = grad.double()
    if grad_scale is not None:
        g = g / grad_scale
    if clip is not None:
        g = g * clip
    return -g if maximize else g


def _norm(t: Tensor) -> float:
    return float(torch.sqrt((t * t).sum()))


def grad_norm(grads: list[Tensor], grad_scale: float | None = None) -> float:
    total = sum(float((g.double() ** 2).sum()) for g in grads)
    norm = math.sqrt(total)
    return norm / grad_scale if grad_scale is not None else norm


def lamb(
    params: list[Stored], grads: list[Tensor], exp_avgs: list[Stored], exp_avg_sqs: list[Stored], steps: list[int],
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
    grad_averaging: bool, trust_clip: float | None, adapt: bool, maximize: bool, clip: float | None,
    grad_scale: float | None,
) -> None:  # fmt: skip
    for i, (x, grad, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        steps[i] += 1
        t = steps[i]
        g = _effective_grad(grad, maximize=maximize, grad_scale=grad_scale, clip=clip)
        m.set(beta1 * m.value + ((1 - beta1) if grad_averaging else 1.0) * g)
        v.set(beta2 * v.value + (1 - beta2) * g * g)
        bc1 = 1 - beta1**t if bias_correction else 1.0
        bc2 = 1 - beta2**t if bias_correction else 1.0
        u = (m.value / bc1) / (torch.sqrt(v.value / bc2) + eps) + weight_decay * x.value
        ratio = 1.0
        if adapt:
            x_norm, u_norm = _norm(x.value), _norm(u)
            ratio = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
            if trust_clip is not None:
                ratio = min(ratio, trust_clip)
        x.set(x.value - lr * ratio * u)


def lars(
    params: list[Stored], grads: list[Tensor], buffers: list[Stored] | None, steps: list[int],
    *, lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float,
    trust_coefficient: float, eps: float, trust_clip: bool, adapt: bool, lr_in_momentum: bool,
    maximize: bool, grad_scale: float | None,
) -> None:  # fmt: skip
    for i, (x, grad) in enumerate(zip(params, grads)):
        steps[i] += 1
        g = _effective_grad(grad, maximize=maximize, grad_scale=grad_scale, clip=None)
        local = 1.0
        if adapt:
            x_norm, g_norm = _norm(x.value), _norm(g)
            if x_norm > 0 and g_norm > 0:
                local = trust_coefficient * x_norm / (g_norm + weight_decay * x_norm + eps)
            if trust_clip:
                local = min(local / lr, 1.0)
        d = local * (g + weight_decay * x.value)
        if lr_in_momentum:
            d = lr * d
        if buffers is not None:
            buf = buffers[i]
            buf.set(momentum * buf.value + (1 - dampening) * d)
            step = d + momentum * buf.value if nesterov else buf.value
        else:
            step = d
        x.set(x.value - (step if lr_in_momentum else lr * step))


def adan(
    params: list[Stored], grads: list[Tensor], exp_avgs: list[Stored], exp_avg_diffs: list[Stored],
    exp_avg_sqs: list[Stored], prev_grads: list[Stored], steps: list[int],
    *, lr: float, beta1: float, beta2: float, beta3: float, eps: float, weight_decay: float, no_prox: bool,
    maximize: bool, clip: float | None, grad_scale: float | None,
) -> None:  # fmt: skip
    for i, (x, grad, m, d, n, prev) in enumerate(zip(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads)):
        steps[i] += 1
        t = steps[i]
        g = _effective_grad(grad, maximize=maximize, grad_scale=grad_scale, clip=clip)
        diff = g - prev.value if t > 1 else torch.zeros_like(g)
        m.set(beta1 * m.value + (1 - beta1) * g)
        d.set(beta2 * d.value + (1 - beta2) * diff)
        z = g + beta2 * diff
        n.set(beta3 * n.value + (1 - beta3) * z * z)
        prev.set(g)
        update = (m.value / (1 - beta1**t) + beta2 * d.value / (1 - beta2**t)) / (
            torch.sqrt(n.value / (1 - beta3**t)) + eps
        )
        if no_prox:
            x.set(x.value * (1 - lr * weight_decay) - lr * update)
        else:
            x.set((x.value - lr * update) / (1 + lr * weight_decay))
