r"""Regime adaptation (Hoffer, Hubara, Soudry 2017, "Train longer, generalize better").

A large batch takes :math:`B/B_0` times fewer steps per epoch. Hoffer et al. close most of the
generalisation gap by keeping the number of *updates* of the small-batch regime: train
:math:`B/B_0` times more epochs, drop the lr at epochs :math:`B/B_0` times later, and raise the lr
by :math:`\sqrt{B/B_0}` (which keeps the covariance of the weight updates, :math:`\eta^2/B`,
proportional to that of the small batch's). They pair it with Ghost BatchNorm
(:class:`largebatch.nn.GhostBatchNorm2d`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from ._checks import check_finite_real, check_positive_int

__all__ = ["Regime", "adapt_regime"]


@dataclass(frozen=True)
class Regime:
    """A MultiStepLR-style training regime: lr, length and the epochs where the lr drops.

    Pass ``milestones`` to :class:`torch.optim.lr_scheduler.MultiStepLR` as they are.
    """

    lr: float
    epochs: int
    milestones: tuple[int, ...]


def adapt_regime(
    lr: float,
    epochs: int,
    milestones: Sequence[int],
    batch_size: int,
    base_batch_size: int,
) -> Regime:
    r"""Adapt a regime tuned at ``base_batch_size`` to ``batch_size`` (Hoffer et al. 2017).

    .. math::
        \eta = \eta_0 \sqrt{B/B_0},\qquad
        E = \lceil E_0\, B/B_0 \rceil,\qquad
        m_i = \lceil m_{0,i}\, B/B_0 \rceil.

    Epoch counts are rounded up, with exact rational arithmetic, so the large batch takes at
    least as many updates as the small one did. Milestones are in epochs (any unit of data passes
    works the same way; not optimizer steps, which the adaptation keeps as they were).

    Args:
        lr: :math:`\eta_0 > 0`, the lr of the base regime.
        epochs: :math:`E_0 ≥ 1`.
        milestones: the base regime's lr-drop epochs, positive and strictly increasing.
        batch_size: :math:`B`.
        base_batch_size: :math:`B_0`.

    Returns:
        The adapted :class:`Regime`.

    Example:
        >>> adapt_regime(0.1, epochs=90, milestones=[30, 60, 80], batch_size=4096, base_batch_size=1024)
        Regime(lr=0.2, epochs=360, milestones=(120, 240, 320))
    """
    base_lr = check_finite_real("lr", lr)
    if base_lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    base_epochs = check_positive_int("epochs", epochs)
    base_milestones = [check_positive_int("milestones[]", milestone) for milestone in milestones]
    if any(later <= earlier for earlier, later in zip(base_milestones, base_milestones[1:])):
        raise ValueError(f"milestones must be strictly increasing, got {list(milestones)!r}")
    batch = check_positive_int("batch_size", batch_size)
    ratio = Fraction(batch, check_positive_int("base_batch_size", base_batch_size))
    return Regime(
        lr=base_lr * math.sqrt(ratio),
        epochs=math.ceil(base_epochs * ratio),
        milestones=tuple(math.ceil(milestone * ratio) for milestone in base_milestones),
    )
