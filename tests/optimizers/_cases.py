"""Hypothesis strategies shared by the optimizer tests: shapes, tensors and hyper-parameters.

Each optimizer is described once by an `OptimizerCase`: how to draw its hyper-parameters, how to
build the class from them, and which numpy oracle (tests/oracles) to compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from largebatch import LAMB, LARS, AdaGradNorm, Adan
from oracles import numpy_optimizers as oracle


@dataclass(frozen=True)
class OptimizerCase:
    name: str
    cls: type
    hyper: st.SearchStrategy[dict[str, Any]]
    #: turns a drawn hyper-parameter dict into the class's keyword arguments
    to_kwargs: Callable[[dict[str, Any]], dict[str, Any]]
    oracle: Callable[..., list[np.ndarray]]


def _lamb_kwargs(h: dict[str, Any]) -> dict[str, Any]:
    h = dict(h)
    h["betas"] = (h.pop("beta1"), h.pop("beta2"))
    return h


def _adan_kwargs(h: dict[str, Any]) -> dict[str, Any]:
    h = dict(h)
    h["betas"] = (h.pop("beta1"), h.pop("beta2"), h.pop("beta3"))
    return h


def _same(h: dict[str, Any]) -> dict[str, Any]:
    return dict(h)


lrs = st.sampled_from([0.0, 1e-3, 0.01, 0.1, 0.5])
betas = st.sampled_from([0.0, 0.5, 0.9, 0.98])
second_betas = st.sampled_from([0.5, 0.9, 0.99, 0.999])
weight_decays = st.sampled_from([0.0, 1e-3, 0.1])
max_grad_norms = st.sampled_from([None, 0.05, 10.0])

LAMB_CASE = OptimizerCase(
    "lamb",
    LAMB,
    st.fixed_dictionaries(
        {
            "lr": lrs,
            "beta1": betas,
            "beta2": second_betas,
            "eps": st.sampled_from([1e-8, 1e-6, 1e-2]),
            "weight_decay": weight_decays,
            "bias_correction": st.booleans(),
            "grad_averaging": st.booleans(),
            "trust_clip": st.sampled_from([None, 0.3, 2.0]),
            "always_adapt": st.booleans(),
            "layer_adaptation": st.booleans(),
            "max_grad_norm": max_grad_norms,
            "maximize": st.booleans(),
        }
    ),
    _lamb_kwargs,
    oracle.lamb,
)

LARS_CASE = OptimizerCase(
    "lars",
    LARS,
    st.fixed_dictionaries(
        {
            "lr": lrs,
            "momentum": st.sampled_from([0.0, 0.5, 0.9]),
            "dampening": st.sampled_from([0.0, 0.1]),
            "weight_decay": weight_decays,
            "trust_coefficient": st.sampled_from([1e-3, 0.02, 1.0]),
            "eps": st.sampled_from([1e-8, 1e-3]),
            "trust_clip": st.booleans(),
            "layer_adaptation": st.booleans(),
            "lr_in_momentum": st.booleans(),
            "maximize": st.booleans(),
            "nesterov": st.booleans(),
        }
    ).map(lambda h: {**h, "nesterov": h["nesterov"] and h["momentum"] > 0 and h["dampening"] == 0}),
    _same,
    oracle.lars,
)

ADAN_CASE = OptimizerCase(
    "adan",
    Adan,
    st.fixed_dictionaries(
        {
            "lr": lrs,
            "beta1": betas,
            "beta2": st.sampled_from([0.0, 0.5, 0.92]),
            "beta3": second_betas,
            "eps": st.sampled_from([1e-8, 1e-3]),
            "weight_decay": weight_decays,
            "no_prox": st.booleans(),
            "max_grad_norm": max_grad_norms,
            "maximize": st.booleans(),
        }
    ),
    _adan_kwargs,
    oracle.adan,
)

ADAGRAD_NORM_CASE = OptimizerCase(
    "adagrad_norm",
    AdaGradNorm,
    st.fixed_dictionaries(
        {
            "lr": lrs,
            "initial_accumulator_value": st.sampled_from([0.0, 0.1, 4.0]),
            "eps": st.sampled_from([1e-10, 1e-3]),
            "weight_decay": weight_decays,
            "maximize": st.booleans(),
        }
    ),
    _same,
    oracle.adagrad_norm,
)

CASES = [LAMB_CASE, LARS_CASE, ADAN_CASE, ADAGRAD_NORM_CASE]

# Random hyper-parameters often adapt no group, on purpose; that warning has its own tests
# (test_no_adaptation_warning.py). For `pytestmark = pytest.mark.filterwarnings(...)`.
IGNORE_NO_ADAPTATION_WARNING = "ignore:(LAMB|LARS) adapts no param group:UserWarning"
CASE_IDS = [case.name for case in CASES]

# Shapes the optimizers must handle: 0-dim, empty, vectors, matrices (transposed = non-contiguous).
shape_specs = st.one_of(
    st.just(("scalar", ())),
    st.just(("empty", (0, 3))),
    st.tuples(st.just("vector"), st.tuples(st.integers(1, 17))),
    st.tuples(st.just("matrix"), st.tuples(st.integers(1, 6), st.integers(1, 6))),
    st.tuples(st.just("transposed"), st.tuples(st.integers(1, 6), st.integers(1, 6))),
    st.tuples(st.just("zeros"), st.tuples(st.integers(1, 9))),
)


def make_param(kind: str, shape: tuple[int, ...], rng: np.random.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A parameter tensor of the given kind; 'transposed' is a non-contiguous view."""
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "transposed":
        base = torch.from_numpy(rng.standard_normal(shape[::-1])).to(dtype)
        return base.t()
    return torch.from_numpy(np.asarray(rng.standard_normal(shape))).to(dtype)


def make_grads(params: list[torch.Tensor], steps: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """float64 gradients, one list per step; every third step one tensor gets an all-zero gradient."""
    grad_steps = []
    for t in range(steps):
        grads = [rng.standard_normal(tuple(p.shape)) for p in params]
        if t % 3 == 2 and grads:
            grads[t % len(grads)] = np.zeros(tuple(params[t % len(params)].shape))
        grad_steps.append(grads)
    return grad_steps


def run_torch(
    case: OptimizerCase,
    hyper: dict[str, Any],
    params: list[torch.Tensor],
    grad_steps: list[list[np.ndarray]],
    **options: Any,
) -> list[torch.Tensor]:
    """Run the class on copies of `params` (non-contiguity kept) and return them after all steps."""
    work = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in params]
    if any(not p.is_contiguous() for p in params):
        # clone(preserve_format) keeps the transposed strides of non-overlapping dense tensors
        assert [w.stride() for w in work] == [p.stride() for p in params]
    opt = case.cls(work, **case.to_kwargs(hyper), **options)
    for grads in grad_steps:
        for p, g in zip(work, grads):
            p.grad = torch.from_numpy(np.ascontiguousarray(g)).to(device=p.device, dtype=p.dtype).reshape(p.shape)
        opt.step()
    return [p.detach() for p in work]
