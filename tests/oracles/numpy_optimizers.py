"""Plain float64 numpy transcriptions of the update equations, written from the papers and the
issue text, independent of the library code. Each function takes lists of arrays and a list of
gradient lists (one per step) and returns the parameters after every step.
"""

from __future__ import annotations

import math

import numpy as np


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(a.astype(np.float64) ** 2)))


def _global_clip(grads: list[np.ndarray], max_norm: float | None) -> list[np.ndarray]:
    if max_norm is None:
        return grads
    total = math.sqrt(sum(_norm(g) ** 2 for g in grads))
    coef = min(1.0, max_norm / (total + 1e-6))
    return [g * coef for g in grads]


def lamb(params, grad_steps, *, lr, beta1, beta2, eps, weight_decay, bias_correction=True,
         grad_averaging=True, trust_clip=None, always_adapt=False, layer_adaptation=True,
         max_grad_norm=None, maximize=False):
    x = [np.array(p, dtype=np.float64) for p in params]
    m = [np.zeros_like(p) for p in x]
    v = [np.zeros_like(p) for p in x]
    adapt = layer_adaptation and (always_adapt or weight_decay != 0)
    for t, grads in enumerate(grad_steps, start=1):
        grads = [(-g if maximize else g).astype(np.float64) for g in grads]
        grads = _global_clip(grads, max_grad_norm)
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + ((1 - beta1) if grad_averaging else 1.0) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t) if bias_correction else m[i]
            v_hat = v[i] / (1 - beta2**t) if bias_correction else v[i]
            u = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * x[i]
            r = 1.0
            if adapt:
                xn, un = _norm(x[i]), _norm(u)
                if xn > 0 and un > 0:
                    r = xn / un
                if trust_clip is not None:
                    r = min(r, trust_clip)
            x[i] = x[i] - lr * r * u
    return x


def lars(params, grad_steps, *, lr, momentum, dampening=0.0, weight_decay=0.0, nesterov=False,
         trust_coefficient=0.001, eps=1e-8, trust_clip=False, layer_adaptation=True,
         lr_in_momentum=False, maximize=False, lrs=None):
    """`lrs` (optional) gives a learning rate per step, to tell the two momentum forms apart."""
    x = [np.array(p, dtype=np.float64) for p in params]
    buf = [np.zeros_like(p) for p in x]
    for t, grads in enumerate(grad_steps):
        step_lr = lrs[t] if lrs is not None else lr
        for i, g in enumerate(grads):
            g = (-g if maximize else g).astype(np.float64)
            local = 1.0
            if layer_adaptation:
                wn, gn = _norm(x[i]), _norm(g)
                if wn > 0 and gn > 0:
                    local = trust_coefficient * wn / (gn + weight_decay * wn + eps)
                if trust_clip:
                    local = min(local / step_lr, 1.0) if step_lr > 0 else 1.0
            d = local * (g + weight_decay * x[i])
            if lr_in_momentum:
                d = step_lr * d
            if momentum != 0:
                buf[i] = momentum * buf[i] + (1 - dampening) * d
                step = d + momentum * buf[i] if nesterov else buf[i]
            else:
                step = d
            x[i] = x[i] - (step if lr_in_momentum else step_lr * step)
    return x


def adan(params, grad_steps, *, lr, beta1, beta2, beta3, eps, weight_decay=0.0, no_prox=False,
         max_grad_norm=None, maximize=False):
    x = [np.array(p, dtype=np.float64) for p in params]
    m = [np.zeros_like(p) for p in x]
    d = [np.zeros_like(p) for p in x]
    n = [np.zeros_like(p) for p in x]
    prev = [None] * len(x)
    for t, grads in enumerate(grad_steps, start=1):
        grads = [(-g if maximize else g).astype(np.float64) for g in grads]
        grads = _global_clip(grads, max_grad_norm)
        for i, g in enumerate(grads):
            diff = np.zeros_like(g) if prev[i] is None else g - prev[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            d[i] = beta2 * d[i] + (1 - beta2) * diff
            z = g + beta2 * diff
            n[i] = beta3 * n[i] + (1 - beta3) * z * z
            update = (m[i] / (1 - beta1**t) + beta2 * d[i] / (1 - beta2**t)) / (
                np.sqrt(n[i] / (1 - beta3**t)) + eps
            )
            if no_prox:
                x[i] = x[i] * (1 - lr * weight_decay) - lr * update
            else:
                x[i] = (x[i] - lr * update) / (1 + lr * weight_decay)
            prev[i] = g
    return x


def adagrad_norm(params, grad_steps, *, lr, initial_accumulator_value=0.0, eps=1e-10,
                 weight_decay=0.0, maximize=False):
    x = [np.array(p, dtype=np.float64) for p in params]
    b_sq = initial_accumulator_value
    for grads in grad_steps:
        grads = [(-g if maximize else g).astype(np.float64) + weight_decay * x[i] for i, g in enumerate(grads)]
        b_sq += sum(_norm(g) ** 2 for g in grads)
        b = math.sqrt(b_sq)
        x = [xi - lr * g / (b + eps) for xi, g in zip(x, grads)]
    return x
