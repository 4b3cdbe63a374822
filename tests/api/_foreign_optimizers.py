"""Small float64 transcriptions of timm's ``Lamb`` and ``Adan``, apex's ``FusedLAMB`` and the
official (sail-sg) ``Adan``: their update and, above all, the layout of their ``state_dict()``.

Written for these tests from the sources' published code (timm/optim/lamb.py, timm/optim/adan.py,
apex/optimizers/fused_lamb.py with its multi_tensor_lamb kernel, sail-sg/Adan adan.py, and the
older releases of the Adan ones); none of those packages is a dependency. Each transcription
steps a list of groups ``{"params": [tensors], **hyper}`` given the gradients of each step,
keeps the step count per group as the sources do, and exports ``state_dict()`` in the source's
own layout, parameters numbered in group order as ``torch.optim.Optimizer.state_dict`` does.
"""

from __future__ import annotations

import copy
import math

import torch

LAMB_LAYOUTS = ("timm", "timm-int-step", "apex")
ADAN_LAYOUTS = ("official", "official-pre_grad", "timm", "timm-pre_grad")


def _global_norm(grads):
    return math.sqrt(sum(float(g.square().sum()) for g in grads))


class ForeignOptimizer:
    """Shared plumbing: groups, per-parameter state, the state_dict export."""

    group_keys: tuple[str, ...] = ()

    def __init__(self, groups, layout):
        self.layout = layout
        self.groups = [dict(group, params=list(group["params"])) for group in groups]
        self.state = {}

    def _numbered(self):
        index = 0
        for group in self.groups:
            ids = []
            for p in group["params"]:
                ids.append((index, p))
                index += 1
            yield group, ids

    def state_dict(self):
        state, groups = {}, []
        for group, ids in self._numbered():
            saved = {key: group[key] for key in self.group_keys if key in group}
            if "step" in group:
                saved["step"] = group["step"]
            saved["params"] = [i for i, _ in ids]
            groups.append(saved)
            for i, p in ids:
                if id(p) in self.state:
                    state[i] = self.state[id(p)]
        return copy.deepcopy({"state": state, "param_groups": groups})


class ForeignLamb(ForeignOptimizer):
    """timm ``Lamb`` (group step as a 0-dim tensor, or as an int in older releases) or apex ``FusedLAMB``.

    Hyper keys: lr, betas, eps, weight_decay, bias_correction, grad_averaging, max_grad_norm,
    and timm's trust_clip (bool), always_adapt; apex's use_nvlamb is a constructor argument.
    """

    def __init__(self, groups, layout, *, use_nvlamb=False):
        super().__init__(groups, layout)
        self.use_nvlamb = use_nvlamb
        base = ("lr", "bias_correction", "betas", "eps", "weight_decay", "grad_averaging", "max_grad_norm")
        self.group_keys = base if layout == "apex" else base + ("trust_clip", "always_adapt")

    def step(self, grads_per_group):
        max_norm = self.groups[0]["max_grad_norm"]  # both read it from the defaults: one value
        all_grads = [g for grads in grads_per_group for g in grads if g is not None]
        divisor = 1.0
        if max_norm is not None:
            total = _global_norm(all_grads)
            divisor = max(total / max_norm, 1.0)  # timm: clamp(norm/max, min=1); apex: norm/max if norm > max
        for group, grads in zip(self.groups, grads_per_group):
            if self.layout == "timm":
                group["step"] = group.get("step", torch.tensor(0.0)) + 1
            else:
                group["step"] = group.get("step", 0) + 1
            t = float(group["step"])
            beta1, beta2 = group["betas"]
            bc1 = 1 - beta1**t if group["bias_correction"] else 1.0
            bc2 = 1 - beta2**t if group["bias_correction"] else 1.0
            adapts = group["weight_decay"] != 0 or (self.use_nvlamb if self.layout == "apex" else group["always_adapt"])
            for p, grad in zip(group["params"], grads):
                if grad is None:
                    continue
                state = self.state.setdefault(id(p), {})
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                g = grad / divisor
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g * ((1 - beta1) if group["grad_averaging"] else 1.0))
                v.mul_(beta2).add_((1 - beta2) * g * g)
                update = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + group["eps"]) + group["weight_decay"] * p
                ratio = 1.0
                if adapts:
                    w_norm, u_norm = float(p.norm()), float(update.norm())
                    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
                    if self.layout != "apex" and group["trust_clip"]:
                        ratio = min(ratio, 1.0)
                p.sub_(group["lr"] * ratio * update)


class ForeignAdan(ForeignOptimizer):
    """The official ``Adan`` and timm's, each in its current layout (``neg_pre_grad``) and its
    older one (``pre_grad``; in timm's, the second moment is stored under ``"exp_avg_diff"`` and
    the gradient-difference average under ``"exp_avg_sq"``).

    Hyper keys: lr, betas, eps, weight_decay, no_prox, and the official max_grad_norm (0 = off).
    """

    def __init__(self, groups, layout):
        super().__init__(groups, layout)
        official = layout.startswith("official")
        self.group_keys = ("lr", "betas", "eps", "weight_decay", "no_prox") + (("max_grad_norm",) if official else ())
        self.clips = official  # timm's Adan has no gradient clipping
        self.crossed = layout == "timm-pre_grad"
        self.negated = not layout.endswith("pre_grad")

    def step(self, grads_per_group):
        coef = 1.0
        max_norm = self.groups[0]["max_grad_norm"] if self.clips else 0.0
        if max_norm > 0:
            total = _global_norm([g for grads in grads_per_group for g in grads if g is not None])
            coef = min(max_norm / (total + self.groups[-1]["eps"]), 1.0)
        moment_key, diff_key = ("exp_avg_diff", "exp_avg_sq") if self.crossed else ("exp_avg_sq", "exp_avg_diff")
        prev_key = "neg_pre_grad" if self.negated else "pre_grad"
        for group, grads in zip(self.groups, grads_per_group):
            group["step"] = group.get("step", 0) + 1
            t = group["step"]
            beta1, beta2, beta3 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p, grad in zip(group["params"], grads):
                if grad is None:
                    continue
                g = grad * coef
                state = self.state.setdefault(id(p), {})
                if not state:
                    for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                        state[key] = torch.zeros_like(p)
                if prev_key not in state or t == 1:
                    state[prev_key] = -g if self.negated else g.clone()
                previous = -state[prev_key] if self.negated else state[prev_key]
                diff = g - previous
                m, d, n = state["exp_avg"], state[diff_key], state[moment_key]
                m.mul_(beta1).add_((1 - beta1) * g)
                d.mul_(beta2).add_((1 - beta2) * diff)
                n.mul_(beta3).add_((1 - beta3) * (g + beta2 * diff) ** 2)
                denom = n.sqrt() / math.sqrt(1 - beta3**t) + group["eps"]
                update = (m / (1 - beta1**t) + beta2 * d / (1 - beta2**t)) / denom
                if group["no_prox"]:
                    p.mul_(1 - lr * wd).sub_(lr * update)
                else:
                    p.sub_(lr * update).div_(1 + lr * wd)
                state[prev_key] = -g if self.negated else g.clone()
