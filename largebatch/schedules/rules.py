r"""Learning-rate scaling rules: how the lr tuned at one batch size carries to another.

A rule is an exponent :math:`k` in

.. math::
    \eta(B) = \eta_0 \left(\frac{B}{B_0}\right)^{k},

where :math:`\eta_0` is the learning rate tuned at batch size :math:`B_0`.

* ``"linear"`` (:math:`k = 1`): Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training
  ImageNet in 1 Hour". The rule for SGD with momentum and for LARS.
* ``"sqrt"`` (:math:`k = 1/2`): Krizhevsky 2014, "One weird trick for parallelizing convolutional
  neural networks". The rule for adaptive methods (Adam family, LAMB, Adagrad): Granziol et al.,
  "Learning Rates as a Function of Batch Size" (2020), and You et al. 2019 (LAMB).
* a float :math:`k \ge 0`, for an exponent found by a sweep, such as :data:`MEASURED_EXPONENTS`
  (``suggest_scaling_rule(optimizer, source="measured")``).
"""

from __future__ import annotations

from ._checks import check_finite_real, check_positive_int

__all__ = ["MEASURED_EXPONENTS", "SCALING_RULES", "RULE_SOURCES", "scale_lr", "scaling_exponent", "suggest_scaling_rule"]

SCALING_RULES: dict[str, float] = {"linear": 1.0, "sqrt": 0.5}

#: The exponents k measured by ``python -m largebatch.experiments.deep_scaling``
#: (docs/deep_scaling.md): the base lr tuned at batch 64 on a validation split, then the k of
#: lr · 32^k, k ∈ {0.25, 0.5, 0.75} and the rule's own, with the best validation accuracy at
#: batch 2048 (the oracle rows). One small 8-layer BatchNorm CNN, one seed, a resolution of 0.25:
#: evidence that the papers' rules overshoot there (linear for SGD and LARS, sqrt for LAMB, AdamW
#: and Adan), not a law; the first version of that experiment (a wider model) measured 0.25 for
#: SGD and 0.5 for AdamW and Adan. Keyed by class name; LARS's is that of its default exclusion
#: recipe ("adapt"). Optimizers the run did not get to have no entry.
MEASURED_EXPONENTS: dict[str, float] = {"SGD": 0.5, "LARS": 0.5, "LAMB": 0.25, "AdamW": 0.25, "Adan": 0.25}

#: Where :func:`suggest_scaling_rule` takes its rule from.
RULE_SOURCES = ("paper", "measured")

# Looked up by class name, walking the MRO, so that a subclass inherits its parent's rule and
# largebatch.optimizers need not be imported here (it imports nothing from this package either).
_LINEAR_RULE_OPTIMIZERS = frozenset({"SGD", "ASGD", "LARS", "LARC"})
_SQRT_RULE_OPTIMIZERS = frozenset(
    {
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "SparseAdam",
        "Adafactor",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "AdaGradNorm",
        "LAMB",
        "Lamb",
        "FusedLAMB",
        "Adan",
    }
)


def scaling_exponent(rule: str | float) -> float:
    """Return the exponent :math:`k` of a rule: 1 for ``"linear"``, 1/2 for ``"sqrt"``, or the float given.

    Raises:
        ValueError: ``rule`` is an unknown name, or a number that is not finite and ≥ 0.
    """
    if isinstance(rule, str):
        if rule not in SCALING_RULES:
            raise ValueError(f"rule must be one of {sorted(SCALING_RULES)} or a float exponent, got {rule!r}")
        return SCALING_RULES[rule]
    exponent = check_finite_real("rule", rule)
    if exponent < 0:
        raise ValueError(f"rule as an exponent must be ≥ 0 (a larger batch never lowers the lr), got {rule!r}")
    return exponent


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int, rule: str | float = "linear") -> float:
    r"""Scale a learning rate tuned at ``base_batch_size`` to ``batch_size``.

    .. math::
        \eta = \eta_0 \left(\frac{B}{B_0}\right)^{k},\qquad
        k = 1 \text{ (linear)},\ \tfrac12 \text{ (sqrt)}, \text{ or the float given.}

    Args:
        base_lr: :math:`\eta_0`, the learning rate tuned at ``base_batch_size``; ≥ 0.
        batch_size: :math:`B`, the batch size to scale to; a positive integer.
        base_batch_size: :math:`B_0`; a positive integer.
        rule: ``"linear"`` (Goyal et al. 2017), ``"sqrt"`` (Krizhevsky 2014) or an exponent ≥ 0.

    Returns:
        The scaled learning rate.

    Raises:
        ValueError: naming the argument that is out of range.

    Example:
        >>> scale_lr(0.1, batch_size=8192, base_batch_size=256)  # Goyal et al.: 0.1 per 256
        3.2
        >>> scale_lr(1e-3, batch_size=4096, base_batch_size=1024, rule="sqrt")
        0.002
    """
    lr = check_finite_real("base_lr", base_lr)
    if lr < 0:
        raise ValueError(f"base_lr must be ≥ 0, got {base_lr!r}")
    batch = check_positive_int("batch_size", batch_size)
    base_batch = check_positive_int("base_batch_size", base_batch_size)
    return lr * (batch / base_batch) ** scaling_exponent(rule)


def suggest_scaling_rule(optimizer_or_class: object, source: str = "paper") -> str | float:
    """Suggest the scaling rule for an optimizer, given as an instance or a class.

    ``source="paper"`` (default): ``"linear"`` for SGD-like optimizers (SGD, ASGD, LARS, LARC);
    ``"sqrt"`` for adaptive ones (the Adam family, Adagrad, Adadelta, RMSprop, Adafactor,
    AdaGradNorm, LAMB, Adan). ``source="measured"``: the exponent of :data:`MEASURED_EXPONENTS`
    (a float, which :func:`scale_lr` and ``create_optimizer(scaling_rule=...)`` take). The class
    and then its bases are looked up by name, so subclasses inherit the rule of their parent.

    Raises:
        ValueError: ``source`` is unknown, or no class in the optimizer's MRO has a rule from it;
            pass ``rule`` explicitly.
    """
    if source not in RULE_SOURCES:
        raise ValueError(f"source must be one of {', '.join(RULE_SOURCES)}, got {source!r}")
    cls = optimizer_or_class if isinstance(optimizer_or_class, type) else type(optimizer_or_class)
    if source == "measured":
        for klass in cls.__mro__:
            if klass.__name__ in MEASURED_EXPONENTS:
                return MEASURED_EXPONENTS[klass.__name__]
        raise ValueError(
            f"optimizer_or_class: no exponent was measured for {cls.__name__} (measured: "
            f"{', '.join(MEASURED_EXPONENTS) or 'none'}); use source='paper' or an exponent of your own"
        )
    for klass in cls.__mro__:
        if klass.__name__ in _LINEAR_RULE_OPTIMIZERS:
            return "linear"
        if klass.__name__ in _SQRT_RULE_OPTIMIZERS:
            return "sqrt"
    raise ValueError(
        f"optimizer_or_class: no scaling rule is known for {cls.__name__}; "
        "choose rule='linear', rule='sqrt' or an exponent yourself"
    )
