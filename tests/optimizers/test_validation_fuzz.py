"""Fuzz of the constructor and add_param_group: random valid and invalid hyper-parameters.

Each draw either raises a ValueError that names one of the arguments drawn invalid, or (when all
are valid) gives an optimizer whose steps leave the parameters finite. The parameters are float64
and the valid values span [1e-8, 1e30] (and 0 where allowed), so over two steps no valid
combination can overflow: a non-finite parameter means a check let a bad value through.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch import LAMB, LARS, AdaGradNorm, Adan

FP32_MAX = torch.finfo(torch.float32).max

finite = st.floats(1e-8, 1e30)
non_negative = st.one_of(st.just(0.0), finite, st.integers(0, 10))
positive = st.one_of(finite, st.integers(1, 10))
not_a_number = st.sampled_from([None, "0.1", 1j, True, False, [0.1], Fraction(1, 10), torch.tensor([0.1, 0.2])])
non_finite = st.sampled_from([math.inf, -math.inf, math.nan])
beyond_fp32 = st.floats(FP32_MAX * 1.01, 1e300)
bad_non_negative = st.one_of(not_a_number, non_finite, beyond_fp32, st.floats(-1e30, -1e-8))
bad_positive = st.one_of(bad_non_negative, st.just(0.0), st.just(0))
beta = st.one_of(st.just(0.0), st.floats(0.0, 0.999999))
bad_beta = st.one_of(st.sampled_from([1.0, 1.5, -0.1, math.nan, math.inf, None, "0.9", True]))
flag = st.booleans()
bad_flag = st.sampled_from([0, 1, None, "yes", 1.0])

lr_shapes = st.sampled_from([(), (1,), (1, 1)])
valid_lr = st.one_of(
    non_negative,
    st.tuples(st.floats(0.0, 1e30), lr_shapes).map(lambda v: torch.full(v[1], v[0], dtype=torch.float64)),
)
bad_lr = st.one_of(
    bad_non_negative,
    st.sampled_from(
        [
            torch.tensor(0.1j),
            torch.tensor(True),
            torch.tensor([math.nan]),
            torch.tensor([[-0.1]]),
            torch.tensor(1e39, dtype=torch.float64),
            torch.zeros(2),
        ]
    ),
)


def betas(n: int) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    good = st.tuples(*[beta] * n)
    bad_entry = st.tuples(*[st.one_of(beta, bad_beta)] * n).filter(
        lambda values: any(not (isinstance(v, float) and 0.0 <= v < 1.0) for v in values)
    )
    return good, st.one_of(bad_entry, st.sampled_from([(0.9,) * (n + 1), (0.9,) * (n - 1), None, 0.9]))


# (valid values, invalid values) of each kind of hyper-parameter. Every invalid value breaks a
# documented rule (type, sign, finiteness, float32 range, bool-ness, shape of betas, one element).
LR = (valid_lr, bad_lr)
NON_NEGATIVE = (non_negative, bad_non_negative)
POSITIVE = (positive, bad_positive)
POSITIVE_OR_NONE = (st.one_of(st.none(), positive), bad_positive.filter(lambda v: v is not None))
NONE_ONLY = (st.none(), st.one_of(positive, bad_positive.filter(lambda v: v is not None)))  # refused keys
FLAG = (flag, bad_flag)
FOREACH = (st.sampled_from([None, False, True]), bad_flag.filter(lambda v: v is not None))

SPACES: dict[type, dict[str, tuple[st.SearchStrategy, st.SearchStrategy]]] = {
    LAMB: {
        "lr": LR,
        "betas": betas(2),
        "eps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "trust_clip": POSITIVE_OR_NONE,
        "max_grad_norm": POSITIVE_OR_NONE,
        "always_adapt": FLAG,
        "bias_correction": FLAG,
        "maximize": FLAG,
        "foreach": FOREACH,
    },
    LARS: {
        "lr": LR,
        "momentum": NON_NEGATIVE,
        "dampening": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "trust_coefficient": POSITIVE,
        "eps": NON_NEGATIVE,
        "nesterov": FLAG,
        "trust_clip": FLAG,
        "lr_in_momentum": FLAG,
        "max_grad_norm": NONE_ONLY,
        "foreach": FOREACH,
    },
    Adan: {
        "lr": LR,
        "betas": betas(3),
        "eps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "no_prox": FLAG,
        "max_grad_norm": POSITIVE_OR_NONE,
        "foreach": FOREACH,
    },
    AdaGradNorm: {
        "lr": LR,
        "initial_accumulator_value": NON_NEGATIVE,
        "eps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "max_grad_norm": NONE_ONLY,
        "foreach": FOREACH,
    },
}


# Not arguments of these classes' constructors: a group key that they refuse (they do not clip).
GROUP_ONLY = {LARS: {"max_grad_norm"}, AdaGradNorm: {"max_grad_norm"}}


@st.composite
def hyper_parameters(draw: st.DrawFn, cls: type) -> tuple[dict[str, Any], set[str]]:
    """Some of `cls`'s hyper-parameters, each valid or invalid; and the names drawn invalid."""
    values, invalid = {}, set()
    for name, (good, bad) in SPACES[cls].items():
        choice = draw(st.sampled_from(["default", "valid", "valid", "invalid"]))
        if choice == "default":
            continue
        values[name] = draw(bad if choice == "invalid" else good)
        if choice == "invalid":
            invalid.add(name)
    if cls is LARS and values.get("nesterov") is True and not invalid & {"momentum", "dampening"}:
        if not values.get("momentum", 0.9) > 0 or values.get("dampening", 0.0) != 0:
            invalid.add("nesterov")  # valid values, but Nesterov needs momentum > 0 and dampening 0
    return values, invalid


def params_and_grads(count: int = 2):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_() for s in [(3,), (2, 2)][:count]]
    grads = [[torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params] for _ in range(2)]
    return params, grads


def steps_to_finite_parameters(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    for p in params:
        assert torch.isfinite(p).all(), f"valid hyper-parameters gave non-finite parameters {p}"


def assert_names_an_invalid_argument(error: ValueError, invalid: set[str]):
    message = str(error)
    assert invalid, f"valid hyper-parameters were refused: {message}"
    assert any(f"Invalid {name}" in message for name in invalid), f"{message!r} names none of {sorted(invalid)}"


def build_through_constructor(cls, values, params):
    group_only = {name: values.pop(name) for name in GROUP_ONLY.get(cls, ()) if name in values}
    return cls([{"params": params, **group_only}], **values)


def build_through_add_param_group(cls, values, params):
    opt = cls([params[0]])
    try:
        opt.add_param_group({"params": [params[1]], **values})
    except ValueError:
        assert len(opt.param_groups) == 1  # the rejected group is not kept
        raise
    return opt


@pytest.mark.filterwarnings("ignore:(LAMB|LARS) adapts no param group")
@pytest.mark.parametrize("build", [build_through_constructor, build_through_add_param_group], ids=["init", "add_param_group"])
@pytest.mark.parametrize("cls", list(SPACES), ids=lambda c: c.__name__)
@settings(max_examples=60)
@given(data=st.data())
def test_raises_naming_the_argument_or_steps_to_finite_parameters(cls, build, data):
    values, invalid = data.draw(hyper_parameters(cls))
    params, grads = params_and_grads()
    try:
        opt = build(cls, dict(values), params)
    except ValueError as error:
        assert_names_an_invalid_argument(error, invalid)
        return
    assert not invalid, f"accepted invalid {sorted(invalid)}: {values}"
    steps_to_finite_parameters(opt, params, grads)
