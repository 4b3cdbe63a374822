r"""Warmup-and-decay learning-rate schedules for large-batch training.

Every scheduler here is a :class:`torch.optim.lr_scheduler.LRScheduler` that multiplies each
group's learning rate by a factor :math:`f_g(t)` of the step :math:`t` (``last_epoch``; steps or
epochs, whichever you call :meth:`step` for). Each step applies the ratio
:math:`f_g(t) / f_g(t-1)` to the current ``group["lr"]``, the chainable form of torch's own
schedulers, so any number of them (and torch's chainable schedulers, and
:class:`~largebatch.schedules.BatchSizeCoupledLR`) compose by multiplication, work with a tensor
``lr`` (updated in place), and resume from ``state_dict``. Passing an epoch to ``step``, or using
them inside :class:`~torch.optim.lr_scheduler.SequentialLR`, uses the closed form
:math:`\eta_g f_g(t)` with :math:`\eta_g` the group's ``initial_lr``.

The factors are zero only at the end of a decay to ``end_factor=0``, and stay zero from there on,
which is what keeps the ratio form well defined.

Warmup (Goyal et al. 2017) is linear over ``warmup_steps`` steps :math:`t = 0, …, W-1`:

.. math::
    w(t) = s + (1 - s)\,\frac{t}{W - 1},\qquad w(W-1) = 1,

with the start factor :math:`s` defaulting to :math:`1/W`, which gives the equal increments
:math:`1/W, 2/W, …, 1`. Goyal's recipe, start at the small-batch lr :math:`\eta` and reach
:math:`k\eta` after five epochs, is ``start_factor=1/k`` on top of the scaled lr. A schedule's
next phase starts from the peak at step :math:`W`, so the peak is held for two steps and there is
no jump between phases.

Lengths in epochs. ``LinearWarmup``, ``WarmupPolynomialDecay``, ``WarmupCosineDecay`` and
``WarmupStableDecay`` also take ``warmup_epochs``/``total_epochs``/``decay_epochs`` with
``steps_per_epoch`` :math:`S_0` in place of the ``*_steps``: each length becomes
:math:`\operatorname{round}(\text{epochs} \cdot S_0)` steps, so the schedule equals its step
form. The schedule then runs on an epoch clock: when the batch size changes,
:meth:`set_steps_per_epoch` (which :class:`~largebatch.schedules.BatchSizeCoupledLR` calls for the
schedules handed to it) tells it the new :math:`S`, and each later step advances the schedule by
:math:`S_0/S` of a step, so warmup and decay still end at the same epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._checks import (
    check_finite_real,
    check_in_range,
    check_nonnegative_int,
    check_positive_int,
)

__all__ = [
    "DECAY_SHAPES",
    "LinearWarmup",
    "PowerScheduler",
    "WarmupCosineDecay",
    "WarmupPolynomialDecay",
    "WarmupStableDecay",
]


def _linear_decay(x: float) -> float:
    return 1.0 - x


def _cosine_decay(x: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * x))


def _sqrt_decay(x: float) -> float:
    return 1.0 - math.sqrt(x)


# Decay shapes d(x) for the fraction x ∈ [0, 1] of the decay phase done: d(0) = 1, d(1) = 0.
# "sqrt" is the 1 − √x cooldown of Hägele et al. 2024 ("Scaling Laws and Compute-Optimal
# Training Beyond Fixed Training Durations"), found there to beat the linear one.
DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": _linear_decay,
    "cosine": _cosine_decay,
    "sqrt": _sqrt_decay,
}


def _check_decay_shape(decay_shape: str) -> str:
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"decay_shape must be one of {sorted(DECAY_SHAPES)}, got {decay_shape!r}")
    return decay_shape


def _check_start_factor(start_factor: float | None, warmup_steps: int) -> float:
    if start_factor is None:
        return 1.0 / warmup_steps if warmup_steps > 0 else 1.0
    # Zero is refused: the chained form divides by the previous factor.
    return check_in_range("start_factor", start_factor, 0.0, 1.0, low_open=True)


def _check_total_steps(total_steps: int, warmup_steps: int, steps_per_epoch: int | None = None) -> int:
    total = check_positive_int("total_steps", total_steps)
    if total <= warmup_steps:
        if steps_per_epoch is not None:
            raise ValueError(
                f"total_epochs gives {total} steps and warmup_epochs {warmup_steps} at steps_per_epoch="
                f"{steps_per_epoch}: the run must be longer than its warmup; raise total_epochs or lower "
                "warmup_epochs (a larger batch has fewer steps per epoch)"
            )
        example = f" (e.g. warmup_steps={total // 10}, a 10 % warmup)" if total >= 10 else ""
        raise ValueError(
            f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}): raise total_steps or "
            f"lower warmup_steps{example}"
        )
    return total


def _check_decay_steps(decay_steps: int, total_steps: int, warmup_steps: int) -> int:
    """A decay phase of 1 ≤ D ≤ T − W steps, placed at the end of the run, after the warmup."""
    decay_steps = check_positive_int("decay_steps", decay_steps)
    if decay_steps > total_steps - warmup_steps:
        raise ValueError(
            f"decay_steps ({decay_steps}) must not exceed total_steps − warmup_steps ({total_steps - warmup_steps})"
        )
    return decay_steps


def _warmup_factor(step: float, warmup_steps: int, start_factor: float) -> float:
    """w(t) = s + (1 − s)·t/(W − 1) for t < W; a one-step warmup is already at the peak."""
    if warmup_steps == 1:
        return 1.0
    # Written from the peak down, so that w(W − 1) is exactly 1; an epoch clock's fractional
    # step between W − 1 and W stays at the peak.
    return min(1.0, 1.0 - (1.0 - start_factor) * (warmup_steps - 1 - step) / (warmup_steps - 1))


def _length(
    steps_name: str, steps: int | None, epochs: float | None, steps_per_epoch: int | None, *, positive: bool
) -> int | None:
    """A phase length in steps, from ``<phase>_steps`` or from ``<phase>_epochs · steps_per_epoch``.

    Returns None when neither is given; the caller decides whether the phase is required.
    """
    epochs_name = steps_name.replace("_steps", "_epochs")
    if epochs is not None:
        if steps is not None:
            raise ValueError(f"give {steps_name} or {epochs_name}, not both")
        if steps_per_epoch is None:
            raise ValueError(f"{epochs_name} needs steps_per_epoch (the optimizer steps in one epoch)")
        value = check_finite_real(epochs_name, epochs)
        if value < 0 or (positive and value == 0):
            raise ValueError(f"{epochs_name} must be {'> 0' if positive else '>= 0'}, got {epochs!r}")
        return round(value * steps_per_epoch)
    if steps is None:
        return None
    return check_positive_int(steps_name, steps) if positive else check_nonnegative_int(steps_name, steps)


def _required(name: str, value: int | None) -> int:
    if value is None:
        raise ValueError(f"give {name} or {name.replace('_steps', '_epochs')} (with steps_per_epoch)")
    return value


def is_initial_step(scheduler: LRScheduler) -> bool:
    """Whether ``scheduler`` is taking the step its constructor takes."""
    # Recent torch flags that step with ``_is_initial`` (so that resuming with last_epoch ≥ 0
    # works); older releases, which the package still admits, test ``last_epoch == 0``.
    return getattr(scheduler, "_is_initial", scheduler.last_epoch == 0)


def _decay_fraction(step: int, decay_start: int, decay_steps: int) -> float:
    """The fraction x ∈ [0, 1] of the decay phase done at ``step``; 1 from its end on."""
    return min((step - decay_start) / decay_steps, 1.0)


def _decayed(shape_value: float, end_factor: float) -> float:
    """The factor e + (1 − e)·d(x) of a decay from 1 to ``end_factor``, given d(x)."""
    return end_factor + (1.0 - end_factor) * shape_value


class _FactorScheduler(LRScheduler):
    """Chainable scheduler defined by a multiplicative factor f_g(t) per param group.

    Subclasses implement :meth:`factor` and validate their arguments before calling
    ``super().__init__``, which takes the initial step. A subclass built from epochs calls
    :meth:`_start_epoch_clock` first: :meth:`factor` is then evaluated at the schedule's own step
    :math:`u(t)`, which advances by :math:`S_0/S` per optimizer step while an epoch has
    :math:`S` steps (:math:`u(t) = t` while :math:`S = S_0`).
    """

    #: S₀, the steps per epoch the lengths were converted with; None for a step-based schedule.
    steps_per_epoch: int | None = None

    def _start_epoch_clock(self, steps_per_epoch: int | None) -> None:
        if steps_per_epoch is not None:
            self.steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
        # (optimizer step, schedule step, steps per epoch) from which the clock runs at that rate.
        self._clock: list[tuple[int, float, int]] = []

    def _schedule_step(self, step: int) -> float:
        """u(t): the schedule's step at optimizer step t (t itself unless the epoch length changed)."""
        for anchor, position, steps_per_epoch in reversed(getattr(self, "_clock", ())):
            if step >= anchor:
                return position + (step - anchor) * self.steps_per_epoch / steps_per_epoch
        return step

    def _set_lengths(
        self,
        warmup_steps: int | None,
        total_steps: int | None,
        warmup_epochs: float | None,
        total_epochs: float | None,
        steps_per_epoch: int | None,
    ) -> None:
        """Set ``warmup_steps`` and ``total_steps`` (checked) from steps or from epochs."""
        self._start_epoch_clock(steps_per_epoch)
        rate = self.steps_per_epoch
        warmup = _length("warmup_steps", warmup_steps, warmup_epochs, rate, positive=False)
        self.warmup_steps = _required("warmup_steps", warmup)
        total = _required("total_steps", _length("total_steps", total_steps, total_epochs, rate, positive=True))
        self.total_steps = _check_total_steps(total, self.warmup_steps, rate if total_epochs is not None else None)

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Tell an epoch-based schedule that an epoch now has ``steps_per_epoch`` steps.

        From the current step on, each step advances the schedule by :math:`S_0/S`, so the
        phases keep their lengths in epochs. The lr of the current step is left as it is.

        Raises:
            ValueError: the schedule was built from steps, not epochs, or ``steps_per_epoch`` is
                not a positive integer.
        """
        if self.steps_per_epoch is None:
            raise ValueError(
                f"steps_per_epoch: {type(self).__name__} was built from steps; build it from epochs "
                "(warmup_epochs/total_epochs and steps_per_epoch) for its clock to follow the batch size"
            )
        rate = check_positive_int("steps_per_epoch", steps_per_epoch)
        self._clock.append((self.last_epoch, self._schedule_step(self.last_epoch), rate))

    def factor(self, step: int, group_index: int) -> float:
        """The factor f_g(t) of the group's ``initial_lr`` at step ``step`` (≥ 0)."""
        raise NotImplementedError

    def get_lr(self) -> list[float | Tensor]:
        """The next lr of each group: ``group["lr"] · f_g(t) / f_g(t − 1)`` (``· f_g(t)`` at the start)."""
        step = self._schedule_step(self.last_epoch)
        groups = self.optimizer.param_groups
        if is_initial_step(self):
            return [group["lr"] * self.factor(step, index) for index, group in enumerate(groups)]
        previous_step = self._schedule_step(self.last_epoch - 1)
        lrs: list[float | Tensor] = []
        for index, group in enumerate(groups):
            previous = self.factor(previous_step, index)
            # A factor reaches zero only at the end of a decay and stays there: the lr stays zero.
            ratio = 0.0 if previous == 0.0 else self.factor(step, index) / previous
            lrs.append(group["lr"] * ratio)
        return lrs

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        step = self._schedule_step(self.last_epoch)
        return [base_lr * self.factor(step, index) for index, base_lr in enumerate(self.base_lrs)]


class LinearWarmup(_FactorScheduler):
    r"""Linear warmup to the optimizer's lr, then a factor of 1 (Goyal et al. 2017).

    .. math::
        f(t) = \begin{cases} s + (1-s)\,\dfrac{t}{W-1} & t < W \\ 1 & t \ge W \end{cases}

    Use it alone, or chained with any other schedule (a torch ``MultiStepLR``, a
    :class:`BatchSizeCoupledLR`, …), which it multiplies during warmup.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: :math:`W ≥ 0`, the number of warmup steps; the lr reaches its peak at step
            :math:`W - 1`. Zero means no warmup.
        start_factor: :math:`s ∈ (0, 1]`, the factor at step 0; default :math:`1/W`.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler`.
        warmup_epochs: the lengths in epochs instead (reals ≥ 0), with ``steps_per_epoch``.
        steps_per_epoch: :math:`S_0`, the optimizer steps in one epoch; see the module docstring.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int | None = None,
        start_factor: float | None = None,
        last_epoch: int = -1,
        *,
        warmup_epochs: float | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        self._start_epoch_clock(steps_per_epoch)
        warmup = _length("warmup_steps", warmup_steps, warmup_epochs, self.steps_per_epoch, positive=False)
        self.warmup_steps = _required("warmup_steps", warmup)
        self.start_factor = _check_start_factor(start_factor, self.warmup_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int, group_index: int) -> float:
        """The multiplier of the group's initial lr at `step` (the formula in the class docstring)."""
        if step < self.warmup_steps:
            return _warmup_factor(step, self.warmup_steps, self.start_factor)
        return 1.0


class WarmupPolynomialDecay(_FactorScheduler):
    r"""Linear warmup, then polynomial decay to ``end_factor`` at ``total_steps``.

    .. math::
        f(t) = \begin{cases}
            w(t) & t < W \\
            e + (1 - e)\left(1 - \dfrac{t - W}{T - W}\right)^{p} & W \le t \le T \\
            e & t > T
        \end{cases}

    LAMB trains BERT with :math:`p = 0.5` (You et al. 2019); LARS trains ResNet-50 at batch 32K
    with :math:`p = 2` (You, Gitman, Ginsburg 2017). The lr of the last trained step, :math:`T-1`,
    is still positive when :math:`e = 0`.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: :math:`W ≥ 0`.
        total_steps: :math:`T > W`, the step at which the factor reaches ``end_factor``.
        power: :math:`p > 0`.
        end_factor: :math:`e ∈ [0, 1]`, the final factor.
        start_factor: the warmup's first factor, in (0, 1]; default :math:`1/W`.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler`.
        warmup_epochs, total_epochs: the lengths in epochs instead (reals ≥ 0), with ``steps_per_epoch``.
        steps_per_epoch: :math:`S_0`, the optimizer steps in one epoch; see the module docstring.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int | None = None,
        total_steps: int | None = None,
        power: float = 1.0,
        end_factor: float = 0.0,
        start_factor: float | None = None,
        last_epoch: int = -1,
        *,
        warmup_epochs: float | None = None,
        total_epochs: float | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        self._set_lengths(warmup_steps, total_steps, warmup_epochs, total_epochs, steps_per_epoch)
        self.power = check_finite_real("power", power)
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {power!r}")
        self.end_factor = check_in_range("end_factor", end_factor, 0.0, 1.0)
        self.start_factor = _check_start_factor(start_factor, self.warmup_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int, group_index: int) -> float:
        """The multiplier of the group's initial lr at `step` (the formula in the class docstring)."""
        if step < self.warmup_steps:
            return _warmup_factor(step, self.warmup_steps, self.start_factor)
        x = _decay_fraction(step, self.warmup_steps, self.total_steps - self.warmup_steps)
        return _decayed((1.0 - x) ** self.power, self.end_factor)


class WarmupCosineDecay(_FactorScheduler):
    r"""Linear warmup, then half a cosine down to ``end_factor`` at ``total_steps``.

    .. math::
        f(t) = \begin{cases}
            w(t) & t < W \\
            e + \dfrac{1 - e}{2}\left(1 + \cos\dfrac{\pi (t - W)}{T - W}\right) & W \le t \le T \\
            e & t > T
        \end{cases}

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: :math:`W ≥ 0`.
        total_steps: :math:`T > W`.
        end_factor: :math:`e ∈ [0, 1]`.
        start_factor: the warmup's first factor, in (0, 1]; default :math:`1/W`.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler`.
        warmup_epochs, total_epochs: the lengths in epochs instead (reals ≥ 0), with ``steps_per_epoch``.
        steps_per_epoch: :math:`S_0`, the optimizer steps in one epoch; see the module docstring.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int | None = None,
        total_steps: int | None = None,
        end_factor: float = 0.0,
        start_factor: float | None = None,
        last_epoch: int = -1,
        *,
        warmup_epochs: float | None = None,
        total_epochs: float | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        self._set_lengths(warmup_steps, total_steps, warmup_epochs, total_epochs, steps_per_epoch)
        self.end_factor = check_in_range("end_factor", end_factor, 0.0, 1.0)
        self.start_factor = _check_start_factor(start_factor, self.warmup_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int, group_index: int) -> float:
        """The multiplier of the group's initial lr at `step` (the formula in the class docstring)."""
        if step < self.warmup_steps:
            return _warmup_factor(step, self.warmup_steps, self.start_factor)
        x = _decay_fraction(step, self.warmup_steps, self.total_steps - self.warmup_steps)
        return _decayed(_cosine_decay(x), self.end_factor)


class WarmupStableDecay(_FactorScheduler):
    r"""Warmup-stable-decay (WSD): warm up, hold the peak, decay over the last ``decay_steps``.

    .. math::
        f(t) = \begin{cases}
            w(t) & t < W \\
            1 & W \le t < T - D \\
            e + (1 - e)\, d\!\left(\dfrac{t - (T - D)}{D}\right) & T - D \le t \le T \\
            e & t > T
        \end{cases}

    with the decay shape :math:`d` one of ``"linear"`` (:math:`1 - x`), ``"cosine"``
    (:math:`(1 + \cos \pi x)/2`) or ``"sqrt"`` (:math:`1 - \sqrt{x}`, Hägele et al. 2024).
    Hu et al. 2024 (MiniCPM) introduced the schedule; the stable phase lets a run be extended, or
    branched into a decay, without knowing its length beforehand.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: :math:`W ≥ 0`.
        total_steps: :math:`T > W`.
        decay_steps: :math:`D`, with :math:`1 ≤ D ≤ T - W`.
        decay_shape: ``"linear"``, ``"cosine"`` or ``"sqrt"``.
        end_factor: :math:`e ∈ [0, 1]`.
        start_factor: the warmup's first factor, in (0, 1]; default :math:`1/W`.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler`.
        warmup_epochs, total_epochs, decay_epochs: the lengths in epochs instead (reals ≥ 0), with ``steps_per_epoch``.
        steps_per_epoch: :math:`S_0`, the optimizer steps in one epoch; see the module docstring.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int | None = None,
        total_steps: int | None = None,
        decay_steps: int | None = None,
        decay_shape: str = "linear",
        end_factor: float = 0.0,
        start_factor: float | None = None,
        last_epoch: int = -1,
        *,
        warmup_epochs: float | None = None,
        total_epochs: float | None = None,
        decay_epochs: float | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        self._set_lengths(warmup_steps, total_steps, warmup_epochs, total_epochs, steps_per_epoch)
        decay = _length("decay_steps", decay_steps, decay_epochs, self.steps_per_epoch, positive=True)
        self.decay_steps = _check_decay_steps(_required("decay_steps", decay), self.total_steps, self.warmup_steps)
        self.decay_shape = _check_decay_shape(decay_shape)
        self.end_factor = check_in_range("end_factor", end_factor, 0.0, 1.0)
        self.start_factor = _check_start_factor(start_factor, self.warmup_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int, group_index: int) -> float:
        """The multiplier of the group's initial lr at `step` (the formula in the class docstring)."""
        if step < self.warmup_steps:
            return _warmup_factor(step, self.warmup_steps, self.start_factor)
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return 1.0
        x = _decay_fraction(step, decay_start, self.decay_steps)
        return _decayed(DECAY_SHAPES[self.decay_shape](x), self.end_factor)


class PowerScheduler(_FactorScheduler):
    r"""The Power scheduler of Shen et al. 2024, "Power Scheduler: A Batch Size and Token Number
    Agnostic Learning Rate Scheduler".

    With :math:`\eta_{max}` each group's ``initial_lr``, :math:`\beta` the batch size and
    :math:`n_t = t \beta L` the tokens (or, with :math:`L = 1`, samples) seen before step
    :math:`t`:

    .. math::
        \eta_{power}(n) = \min(\eta_{max},\ \beta a n^{b}),

    .. math::
        \eta(t) = \begin{cases}
            w(t)\,\eta_{power}(n_W) & t < W \\
            \eta_{power}(n_t) & W \le t < T - D \\
            \eta_{power}(n_{T-D})\left(e + (1 - e)\, d\!\left(\dfrac{t - (T - D)}{D}\right)\right)
                & T - D \le t \le T \\
            e\,\eta_{power}(n_{T-D}) & t > T.
        \end{cases}

    :math:`a` and :math:`b < 0` transfer across batch sizes and token counts (the paper uses
    :math:`a = 4`, :math:`b = -0.51`, :math:`\eta_{max} = 0.02` with μP, β counted in sequences
    and :math:`n` in tokens). Without ``total_steps`` there is no decay phase, for runs of open
    length (continual pretraining). The shape :math:`d` of the final decay is a choice here
    (``"linear"``, ``"cosine"``, ``"sqrt"``), as in :class:`WarmupStableDecay`.

    ``batch_size`` is fixed: :math:`n_t` counts ``batch_size`` samples per step.

    Args:
        optimizer: the wrapped optimizer; each group's lr is its :math:`\eta_{max}`.
        a: :math:`a > 0`.
        b: :math:`b < 0`.
        batch_size: :math:`\beta`, samples per optimizer step.
        warmup_steps: :math:`W ≥ 0`.
        total_steps: :math:`T > W`, or ``None`` for no decay phase.
        decay_steps: :math:`D`, with :math:`1 ≤ D ≤ T - W` when ``total_steps`` is given.
        decay_shape: ``"linear"``, ``"cosine"`` or ``"sqrt"``.
        end_factor: :math:`e ∈ [0, 1]`.
        tokens_per_sample: :math:`L ≥ 1`, e.g. the sequence length of a language model.
        start_factor: the warmup's first factor, in (0, 1]; default :math:`1/W`.
        last_epoch: as in :class:`~torch.optim.lr_scheduler.LRScheduler`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        a: float,
        b: float,
        batch_size: int,
        warmup_steps: int,
        total_steps: int | None = None,
        decay_steps: int | None = None,
        decay_shape: str = "linear",
        end_factor: float = 0.0,
        tokens_per_sample: int = 1,
        start_factor: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.a = check_finite_real("a", a)
        if self.a <= 0:
            raise ValueError(f"a must be > 0, got {a!r}")
        self.b = check_finite_real("b", b)
        if self.b >= 0:
            raise ValueError(f"b must be < 0 (the lr falls as tokens are seen), got {b!r}")
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.tokens_per_sample = check_positive_int("tokens_per_sample", tokens_per_sample)
        self.warmup_steps = check_nonnegative_int("warmup_steps", warmup_steps)
        if total_steps is None:
            if decay_steps is not None:
                raise ValueError("decay_steps needs total_steps: the decay is placed before the end")
            self.total_steps = None
            self.decay_steps = None
        else:
            self.total_steps = _check_total_steps(total_steps, self.warmup_steps)
            if decay_steps is None:
                raise ValueError("decay_steps must be given with total_steps")
            self.decay_steps = _check_decay_steps(decay_steps, self.total_steps, self.warmup_steps)
        self.decay_shape = _check_decay_shape(decay_shape)
        self.end_factor = check_in_range("end_factor", end_factor, 0.0, 1.0)
        self.start_factor = _check_start_factor(start_factor, self.warmup_steps)
        for index, group in enumerate(optimizer.param_groups):
            if float(group.get("initial_lr", group["lr"])) <= 0:
                raise ValueError(f"optimizer.param_groups[{index}] lr must be > 0: it is the group's lr_max")
        super().__init__(optimizer, last_epoch)

    def _power_factor(self, step: int, group_index: int) -> float:
        """η_power(n_t) / η_max = min(1, β a n_t^b / η_max)."""
        tokens = step * self.batch_size * self.tokens_per_sample
        if tokens == 0:
            return 1.0  # n^b → ∞ as n → 0: the cap η_max applies.
        lr_max = float(self.base_lrs[group_index])
        return min(1.0, self.batch_size * self.a * tokens**self.b / lr_max)

    def factor(self, step: int, group_index: int) -> float:
        """The multiplier of the group's initial lr at `step` (the formula in the class docstring)."""
        if step < self.warmup_steps:
            warmup = _warmup_factor(step, self.warmup_steps, self.start_factor)
            return warmup * self._power_factor(self.warmup_steps, group_index)
        if self.total_steps is None:
            return self._power_factor(step, group_index)
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return self._power_factor(step, group_index)
        x = _decay_fraction(step, decay_start, self.decay_steps)
        decayed = _decayed(DECAY_SHAPES[self.decay_shape](x), self.end_factor)
        return self._power_factor(decay_start, group_index) * decayed
