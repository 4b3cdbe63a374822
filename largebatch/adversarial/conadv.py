r"""ConAdv: adversarial examples from stale weights, so that both gradient passes are independent.

Concurrent Adversarial Learning (Liu, Chen, Cheng, Hsieh, You; ICLR 2022, arXiv 2106.00221)
trains on every batch :math:`(x_t, y_t)` together with its adversarial examples. Plain adversarial
training needs two *sequential* gradient computations per step: the input gradient at the current
weights :math:`\theta_t`, then the weight gradient on the perturbed batch. ConAdv takes the input
gradient at the weights of :math:`\tau` steps back, :math:`\theta_{t-\tau}`, so it no longer waits
for step :math:`t-1`'s update. ``docs/conadv_paper_notes.md`` lists what was found of the paper,
where, and which parts below are the paper's and which are our choices; in short:

- **from the paper** (its Algorithm 1): the staleness (batch :math:`t`'s adversarial examples are
  computed at :math:`\theta_{t-\tau}`, concurrently with step :math:`t-\tau`'s training), the
  training loss on the clean batch plus the adversarial batch with equal weights, the clean loss
  through the "main BN" and the adversarial one through a separate "adv BN";
- **from a public repository** (``github.com/conadv/ConAdv``, not linked from the paper, so
  secondary): one L∞ sign step of size :math:`\epsilon` (``attack_iter 1``, step = ε), and
  the perturbation's forward pass through the adv BN too;
- **our choices**: no random start and an untargeted step (that repository's attacker starts 80 %
  of batches at a uniform random point of the ball and steps towards a random wrong label), the
  loss as a mean rather than Algorithm 1's sum (a factor 2), :math:`\theta_0` for the first
  :math:`\tau` steps, the L2 norm, PGD-K, ``input_range``, the GradScaler and DDP handling.

**Perturbation** (PGD with ``steps`` = :math:`K` iterations from :math:`\delta^0 = 0`, step size
:math:`\alpha`, radius :math:`\epsilon`; :math:`K = 1, \alpha = \epsilon` is FGSM, the default),
per example, through the adversarial BatchNorm :math:`\mathrm{BN}_a` (below):

.. math::

    g^k &= \nabla_x \, \ell\big(f(x_t + \delta^k; \theta_{\max(t-\tau, 0)}, \mathrm{BN}_a), y_t\big) \\
    \delta^{k+1} &= \Pi_\epsilon\big(\delta^k + \alpha\, d(g^k)\big), \qquad
    \hat x_t = x_t + \delta^K

with :math:`d(g) = \operatorname{sign}(g)` and :math:`\Pi_\epsilon` the clamp to
:math:`[-\epsilon, \epsilon]` for ``norm="linf"``; :math:`d(g) = g / \lVert g \rVert_2` and
:math:`\Pi_\epsilon(\delta) = \delta \min(1, \epsilon / \lVert \delta \rVert_2)` for ``norm="l2"``
(norms over each example's own entries). ``input_range=(lo, hi)`` also clamps :math:`x_t + \delta`
into the data's domain (pixels in [0, 1], say). The first :math:`\tau` steps, which have no
weights :math:`\tau` steps back, use :math:`\theta_0`. :math:`\theta_{t-\tau}` includes the
adversarial BatchNorm's own :math:`\gamma, \beta` of that step.

**Training loss** (the clean/adversarial mix, weight :math:`\lambda` = ``adversarial_weight``):

.. math::

    L_t = (1 - \lambda)\, \ell\big(f(x_t; \theta_t, \mathrm{BN}_c), y_t\big)
        + \lambda\, \ell\big(f(\hat x_t; \theta_t, \mathrm{BN}_a), y_t\big)

Algorithm 1 writes :math:`L_B(\theta_t) = \mathbb{E}_{B_c}\, \ell(\theta_t; x_i, y_i) +
\mathbb{E}_{B_a}\, \ell(\theta_t; \hat x_i(\theta_{t-\tau}), y_i)`, i.e. :math:`2 L_t` at the
default :math:`\lambda = 1/2`; we keep the mean (the repository above also takes one mean over the
concatenated clean and adversarial batch) so that the gradient keeps a plain step's scale and a
learning rate tuned without ConAdv keeps its meaning (LARS and LAMB normalise the scale away in
any case, up to their weight decay and ε). :math:`\lambda = 1` trains on adversarial examples only
(the clean forward pass is then skipped; our extension).

**BatchNorm** (``batchnorm="auxiliary"``, the default, the paper's): :math:`\mathrm{BN}_c` is the
model's own BatchNorm ("main BN"), :math:`\mathrm{BN}_a` a twin with its own affine parameters and
statistics ("adv BN", AdvProp's auxiliary BatchNorm). The model must be converted first with
:func:`~largebatch.adversarial.convert_to_auxiliary_batchnorm` (before building the optimizer and
the DDP wrapper); evaluation uses :math:`\mathrm{BN}_c`. The clean and the adversarial batch go
through separate forward passes, so each is normalised with its own batch statistics; the
adversarial pass updates :math:`\mathrm{BN}_a`'s running statistics only
(``adversarial_updates_buffers`` defaults to True here, and False restores every buffer after it).
``batchnorm="shared"`` (our variant, for a model one cannot convert) normalises both batches with
the same :math:`\gamma, \beta`, and by default keeps the running statistics those of clean batches
(``adversarial_updates_buffers=False``). The perturbation passes never change the model: they run
with :func:`torch.func.functional_call` on the stale weights and on scratch copies of the buffers.

**Cost, and what can run concurrently.** A step computes (a) the perturbation: :math:`K` forward
passes and :math:`K` backward passes to the *input* only (:func:`torch.autograd.grad` w.r.t.
:math:`x`, no weight-gradient products, no ``.grad`` written, no DDP all-reduce), at
:math:`\theta_{t-\tau}`; (b) the weight gradient of :math:`L_t`: a forward and backward pass on
the clean and on the adversarial batch (2× the examples of plain training). With :math:`\tau \ge 1`,
(a) for batch :math:`t` depends only on :math:`\theta_{t-\tau}` and :math:`x_t`, not on (b) of steps
:math:`t-\tau, \dots, t-1`: given the next batch in advance, it can run on a second CUDA stream or on
other ranks while (b) of the previous step runs, which is the paper's point (its Figure 1: DisAdv vs
ConAdv; Algorithm 1 perturbs batch :math:`t+\tau` at :math:`\theta_t` during step :math:`t`). This
helper runs (a) then (b) in one call, sequentially: on one device a step costs about
:math:`2 + K \cdot c` plain steps, where :math:`c \approx 2/3` is the cost of a forward pass plus
an input-only backward pass relative to a plain step, plus one copy of the trainable parameters per
step for :math:`\tau \ge 1` (:math:`\tau` copies are kept: memory :math:`\tau \cdot |\theta|`).
With :math:`\tau = 0` it is ordinary sequential adversarial training (no copies).

**GradScaler**: the perturbation's loss is multiplied by the scaler's current scale, so that fp16
input gradients under autocast do not underflow to zero; both directions :math:`d(g)` are
invariant to that factor, so nothing needs unscaling. An example whose input gradient is not finite
(an overflow: the scale is too large) gets no perturbation step from it, and the number of such
examples is returned (``nonfinite_inputs``), so the caller can see it. The training loss is
backpropagated as ``scaler.scale(L_t)``; ``scaler.step(optimizer)`` and ``scaler.update()`` stay
the caller's, as in any GradScaler loop, so this works with every optimizer, this library's or
torch's, and with LR schedulers. (Taking the optimizer inside would have to re-implement
``scaler.step``'s unscale/inf-check/skip and gradient clipping between backward and step.)

**DDP**: pass the :class:`~torch.nn.parallel.DistributedDataParallel` module (of the converted
model); each rank perturbs its own shard with the wrapped module (no collectives), and the
training backward through the wrapper all-reduces the weight gradient once, the adversarial
BatchNorm's included. Since the perturbation of an example depends only on that example (and on
BatchNorm's batch statistics, which are per rank anyway under DDP), 2 ranks equal one process on
the concatenated batch for a model without BatchNorm. With auxiliary BatchNorm and
:math:`\lambda = 1` the main BatchNorm gets no gradient, so DDP then needs
``find_unused_parameters=True``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from .batchnorm import adversarial_route, find_batchnorms

__all__ = ["BATCHNORMS", "NORMS", "ConAdv", "ConAdvLosses"]

#: The perturbation norms: ``"linf"`` (sign steps, clamp) and ``"l2"`` (normalised steps, rescale).
NORMS: tuple[str, ...] = ("linf", "l2")
#: BatchNorm handling: ``"auxiliary"`` (the paper's adv BN; convert the model first) or ``"shared"``.
BATCHNORMS: tuple[str, ...] = ("auxiliary", "shared")

_STATE_KEYS = {"step", "staleness", "snapshots"}


class ConAdvLosses(NamedTuple):
    """What :meth:`ConAdv.backward` computed (detached; ``clean`` is None when it was skipped)."""

    loss: Tensor
    clean: Tensor | None
    adversarial: Tensor
    nonfinite_inputs: Tensor  # examples whose input gradient was not finite in some PGD iteration


def _positive_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _non_negative_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class ConAdv:
    r"""One ConAdv training step on a batch and its stale-weight adversarial examples.

    Usage (the optimizer, scheduler and GradScaler stay the caller's)::

        model = convert_to_auxiliary_batchnorm(model)   # before the optimizer and DDP
        optimizer = LAMB(model.parameters(), lr=...)
        conadv = ConAdv(model, nn.functional.cross_entropy, epsilon=0.05, staleness=1)
        for x, y in loader:
            optimizer.zero_grad()
            losses = conadv.backward(x, y)           # or backward(x, y, scaler=scaler)
            optimizer.step()                         # or scaler.step(optimizer); scaler.update()

    Args:
        model: the network (converted, if it has BatchNorm and ``batchnorm="auxiliary"``), in
            train mode; a ``DistributedDataParallel`` wrapper of it is fine.
        loss_fn: ``loss_fn(output, target)`` → a scalar loss (a mean over the batch).
        epsilon: the perturbation radius :math:`\epsilon` (module docstring), > 0.
        norm: ``"linf"`` or ``"l2"``.
        staleness: :math:`\tau`, how many steps old the weights of the perturbation are (≥ 0;
            0 is plain sequential adversarial training).
        steps: PGD iterations :math:`K` (≥ 1; 1 with the default step size is FGSM).
        step_size: :math:`\alpha`; default :math:`\epsilon / K`.
        adversarial_weight: :math:`\lambda \in (0, 1]` of the training loss.
        input_range: ``(lo, hi)`` to clamp perturbed inputs into, or None.
        batchnorm: ``"auxiliary"`` (default, the paper's): adversarial examples go through the
            adversarial twins of :func:`~largebatch.adversarial.convert_to_auxiliary_batchnorm`;
            ``"shared"``: through the model's own BatchNorm layers.
        adversarial_updates_buffers: whether the adversarial training pass may update buffers
            (BatchNorm running statistics); default True with ``"auxiliary"`` (only the
            adversarial twins' move), False with ``"shared"`` (running statistics from clean data).

    Raises:
        ValueError: an argument out of range, naming it; with ``"auxiliary"``, a BatchNorm layer
            without an adversarial twin (naming it); with ``"shared"``, a converted model.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        epsilon: float,
        norm: str = "linf",
        staleness: int = 1,
        steps: int = 1,
        step_size: float | None = None,
        adversarial_weight: float = 0.5,
        input_range: tuple[float, float] | None = None,
        batchnorm: str = "auxiliary",
        adversarial_updates_buffers: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
        self.epsilon = _positive_finite("epsilon", epsilon)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.staleness = _non_negative_int("staleness", staleness, 0)
        self.steps = _non_negative_int("steps", steps, 1)
        self.step_size = self.epsilon / self.steps if step_size is None else _positive_finite("step_size", step_size)
        weight = adversarial_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
            raise ValueError(f"adversarial_weight must be in (0, 1], got {adversarial_weight!r}")
        if input_range is not None:
            try:
                lo, hi = (float(bound) for bound in input_range)
                valid = math.isfinite(lo) and math.isfinite(hi) and lo < hi
            except (TypeError, ValueError):
                valid = False
            if not valid:
                raise ValueError(f"input_range must be (lo, hi) with finite lo < hi, got {input_range!r}")
        if batchnorm not in BATCHNORMS:
            raise ValueError(f"batchnorm must be one of {BATCHNORMS}, got {batchnorm!r}")
        if adversarial_updates_buffers is not None and not isinstance(adversarial_updates_buffers, bool):
            raise ValueError(f"adversarial_updates_buffers must be True, False or None, got {adversarial_updates_buffers!r}")
        self.model = model
        # The perturbation runs on the wrapped module: no DDP hooks, no all-reduce of weight gradients.
        self.module: nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
        self._auxiliary, plain = find_batchnorms(self.module)
        if batchnorm == "auxiliary" and plain:
            raise ValueError(
                f"batchnorm='auxiliary' (the paper's adv BN), but the model has BatchNorm layers without an adversarial "
                f"twin: {plain[:3]}{' ...' if len(plain) > 3 else ''}; convert it with "
                "convert_to_auxiliary_batchnorm(model) before building the optimizer and DDP, or pass batchnorm='shared'"
            )
        if batchnorm == "shared" and self._auxiliary:
            raise ValueError("batchnorm='shared', but the model has AuxiliaryBatchNorm layers: pass batchnorm='auxiliary'")
        self.batchnorm = batchnorm
        self.loss_fn = loss_fn
        self.norm = norm
        self.adversarial_weight = float(weight)
        self.input_range = None if input_range is None else (float(input_range[0]), float(input_range[1]))
        self.adversarial_updates_buffers = (
            batchnorm == "auxiliary" if adversarial_updates_buffers is None else adversarial_updates_buffers
        )
        self._step = 0
        # θ_{t-τ}, …, θ_{t-1} (oldest first), min(t, τ) of them; never changed in place once stored.
        self._snapshots: deque[dict[str, Tensor]] = deque(maxlen=max(self.staleness, 1))

    # ------------------------------------------------------------------ the step

    def _trainable(self) -> dict[str, Tensor]:
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    def _stale_parameters(self) -> dict[str, Tensor]:
        """θ_{max(t-τ, 0)}, detached (the perturbation never writes weight gradients)."""
        if self.staleness > 0 and self._snapshots:
            return self._snapshots[0]
        return {name: p.detach() for name, p in self._trainable().items()}

    def _check_training(self) -> None:
        if not (self.model.training and self.module.training):
            raise ValueError("model is in eval mode: ConAdv is a training step (call model.train() first)")

    def _direction(self, grad: Tensor) -> Tensor:
        if self.norm == "linf":
            return grad.sign()
        norms = grad.reshape(len(grad), -1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
        return torch.where(norms > 0, grad / norms, torch.zeros_like(grad))

    def _project(self, delta: Tensor, x: Tensor) -> Tensor:
        if self.norm == "linf":
            delta = delta.clamp(-self.epsilon, self.epsilon)
        else:
            norms = delta.reshape(len(delta), -1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
            delta = delta * (self.epsilon / norms).clamp(max=1.0)  # norm 0: ε/0 = inf → factor 1
        if self.input_range is not None:
            delta = (x + delta).clamp(*self.input_range) - x
        return delta

    def _perturb(self, x: Tensor, y: Tensor, scaler: torch.amp.GradScaler | None) -> tuple[Tensor, Tensor]:
        self._check_training()
        x = x.detach()
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        params = self._stale_parameters()
        # Scratch buffers: the perturbation's train-mode forward passes must not move BatchNorm statistics.
        buffers = {name: b.clone() for name, b in self.module.named_buffers()}
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        delta = torch.zeros_like(x)
        nonfinite = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            x_k = (x + delta).requires_grad_(True)
            with adversarial_route(self._auxiliary):
                loss = self.loss_fn(functional_call(self.module, {**params, **buffers}, (x_k,)), y)
            if scale is not None:
                loss = loss * scale  # directions are scale-invariant: no unscaling needed
            (grad,) = torch.autograd.grad(loss, x_k)
            finite = torch.isfinite(grad).reshape(len(grad), -1).all(dim=1)
            nonfinite |= ~finite
            grad = torch.where(finite.view(-1, *([1] * (grad.dim() - 1))), grad, torch.zeros_like(grad))
            delta = self._project(delta + self.step_size * self._direction(grad), x)
        x_adv = x + delta
        if self.input_range is not None:  # exactly inside the range (x + ((x + δ).clamp() - x) may round out)
            x_adv = x_adv.clamp(*self.input_range)
        return x_adv.detach(), nonfinite.sum()

    def perturb(self, x: Tensor, y: Tensor, scaler: torch.amp.GradScaler | None = None) -> Tensor:
        r"""The adversarial examples :math:`\hat x_t` of this step's batch, without taking the step."""
        return self._perturb(x, y, scaler)[0]

    @contextmanager
    def _buffers_kept(self) -> Iterator[None]:
        if self.adversarial_updates_buffers:
            yield
            return
        saved = [(b, b.clone()) for b in self.module.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)

    def backward(self, x: Tensor, y: Tensor, scaler: torch.amp.GradScaler | None = None) -> ConAdvLosses:
        r"""Perturb the batch, backpropagate :math:`L_t` (scaled by ``scaler`` if given), advance the state.

        The gradients accumulate into ``.grad`` like ``loss.backward()``; the caller zeroes them and
        steps the optimizer (``scaler.step(optimizer)`` with a scaler). Staleness counts calls of
        this method: call it once per optimizer step (with gradient accumulation over micro-batches,
        τ counts micro-batches).

        Raises:
            ValueError: the model is in eval mode, or ``x`` has no batch dimension.
        """
        x_adv, nonfinite = self._perturb(x, y, scaler)
        weight = self.adversarial_weight
        clean = None if weight == 1.0 else self.loss_fn(self.model(x), y)
        # BatchNorm saves its running statistics for backward: they are restored only after it.
        with self._buffers_kept():
            with adversarial_route(self._auxiliary):
                adversarial = self.loss_fn(self.model(x_adv), y)
            loss = adversarial if clean is None else (1.0 - weight) * clean + weight * adversarial
            (loss if scaler is None else scaler.scale(loss)).backward()
        if self.staleness > 0:  # θ_t, the weights this step's update starts from
            self._snapshots.append({name: p.detach().clone() for name, p in self._trainable().items()})
        self._step += 1
        return ConAdvLosses(loss.detach(), None if clean is None else clean.detach(), adversarial.detach(), nonfinite)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The step count and the stored weights :math:`\\theta_{t-\\tau}, …, \\theta_{t-1}` (oldest first)."""
        return {"step": self._step, "staleness": self.staleness, "snapshots": [dict(s) for s in self._snapshots]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a state that does not fit raises and changes nothing.

        Raises:
            ValueError: missing or extra keys, another staleness, a snapshot count that does not
                match the step, or snapshots whose names, shapes or dtypes differ from the model's.
        """
        if not isinstance(state_dict, Mapping) or set(state_dict) != _STATE_KEYS:
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"ConAdv state_dict must have exactly the keys {sorted(_STATE_KEYS)}, got {got}")
        step, staleness, snapshots = state_dict["step"], state_dict["staleness"], state_dict["snapshots"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict['step'] must be a non-negative integer, got {step!r}")
        if staleness != self.staleness:
            raise ValueError(f"state_dict has staleness {staleness!r}, this ConAdv has {self.staleness}")
        if not isinstance(snapshots, (list, tuple)) or len(snapshots) != min(step, self.staleness):
            raise ValueError(
                f"state_dict['snapshots'] must be a list of min(step, staleness) = {min(step, self.staleness)} "
                f"weight snapshots, got {len(snapshots) if isinstance(snapshots, (list, tuple)) else snapshots!r}"
            )
        params = self._trainable()
        restored = []
        for i, snapshot in enumerate(snapshots):
            if not isinstance(snapshot, Mapping) or set(snapshot) != set(params):
                raise ValueError(f"snapshot {i} must hold exactly the trainable parameters {sorted(params)}")
            for name, p in params.items():
                value = snapshot[name]
                if not isinstance(value, Tensor) or value.shape != p.shape or value.dtype != p.dtype:
                    raise ValueError(
                        f"snapshot {i}, {name!r}: expected a {p.dtype} tensor of shape {tuple(p.shape)}, got "
                        + (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value))
                    )
            restored.append({name: snapshot[name].detach().to(p.device, copy=True) for name, p in params.items()})
        self._snapshots = deque(restored, maxlen=max(self.staleness, 1))
        self._step = step
