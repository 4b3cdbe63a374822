"""States of another dtype than their parameters (the ``state_dtype`` option: fp32 params + bf16
states, bf16 params + fp32 states): the fused kernels, the per-tensor reference and the foreach
path each == the float64 oracle, which computes in float64 and rounds every stored tensor to its
own dtype at the same points.

The oracle rounds bf16 as the path under test does: the Triton interpreter truncates fp32 to
bf16, compiled kernels and torch round to nearest even. States are compared in their dtype's
ulps (`assert_matches`), fp32 states of bf16 parameters within 2⁻⁴ of the list's largest
(see `_run_and_compare`); fp32 parameters also get 2⁻⁶ of their total displacement, since a state
that rounds one bf16 ulp apart from the oracle's (fp32 against float64 arithmetic near a rounding
boundary) moves the next steps by ~2⁻⁸ of their size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import _oracle as oracle
from _fused_cases import DEVICE, STEPS, TensorSpec, assert_matches, random_tensors, requires_kernels, step_counters, stored, zeros
from largebatch.fused._engine import INTERPRETED
from largebatch import LAMB, LARS, Adan
from largebatch.optimizers.functional import adan, lamb, lars

pytestmark = requires_kernels

PATHS = ["per-tensor", "foreach", "fused"]
MIXED = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
shapes = st.one_of(st.just(()), st.integers(1, 53).map(lambda n: (n,)), st.tuples(st.integers(1, 6), st.integers(1, 6)))


@st.composite
def mixed_specs(draw: st.DrawFn) -> list[TensorSpec]:
    dtype, state_dtype = draw(st.sampled_from(MIXED))
    return [TensorSpec(shape, dtype, state_dtype) for shape in draw(st.lists(shapes, min_size=1, max_size=8))]


def _path_args(path: str) -> dict[str, bool]:
    return {"fused": path == "fused", "foreach": path == "foreach"}


def _run(path, specs, seed, n_states, step, oracle_step):
    """STEPS steps of `step` (the library) and `oracle_step` from the same tensors; compare."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(oracle, "BF16_TRUNCATES", INTERPRETED and path == "fused")
        _run_and_compare(path, specs, seed, n_states, step, oracle_step)


def _run_and_compare(path, specs, seed, n_states, step, oracle_step):
    generator = torch.Generator().manual_seed(seed)
    params = random_tensors(specs, generator)
    states = [zeros(specs) for _ in range(n_states)]
    steps = step_counters(specs) if path == "fused" else [torch.zeros(()) for _ in specs]
    o_params, o_states, o_steps = stored(params), [stored(s) for s in states], [0] * len(specs)
    initial = [p.double().cpu() for p in params]
    for _ in range(STEPS):
        grads = random_tensors(specs, generator)
        step(params, grads, states, steps, **_path_args(path))
        oracle_step(o_params, [g.cpu() for g in grads], o_states, o_steps)
    for index, (state, o_state) in enumerate(zip(states, o_states)):
        assert [s.dtype for s in state] == [spec.state_dtype for spec in specs]
        if specs[0].dtype == torch.float32:
            assert_matches(state, o_state, f"state {index}")
            continue
        # fp32 states of bf16 params: a param one bf16 ulp apart from the oracle's changes the
        # next steps' inputs by 2⁻⁸, which the states carry, and cancellation (LARS's Nesterov
        # buffer of steps of alternating sign) can make large relative to a small state.
        scale = max(float(o.value.abs().max()) for o in o_state if o.value.numel())
        for s, o in zip(state, o_state):
            error = (s.double().cpu() - o.value).abs()
            assert not s.numel() or float(error.max()) <= 2**-4 * scale, f"state {index}"
    for i, (p, o, start) in enumerate(zip(params, o_params, initial)):
        assert p.dtype == o.dtype
        displacement = float((o.value - start).abs().max()) if p.numel() else 0.0
        slack = 2**-6 * displacement if p.dtype == torch.float32 else 0.0
        try:
            assert_matches([p], [o], "param")
        except AssertionError:
            error = float((p.cpu().double() - o.value).abs().max())
            assert error <= slack + 64 * torch.finfo(torch.float32).eps * float(o.value.abs().max()), (i, error, slack)
    assert [int(s) for s in steps] == o_steps


LAMB_HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True, grad_averaging=True,
                  trust_clip=None, maximize=False)  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=3, deadline=None)
@given(specs=mixed_specs(), seed=st.integers(0, 2**31 - 1), adapt=st.booleans(), lr=st.floats(1e-3, 0.05))
def test_lamb(path, specs, seed, adapt, lr):
    def step(params, grads, states, steps, **path_args):
        lamb(params, grads, *states, steps, lr=lr, adapt=adapt, **LAMB_HYPER, **path_args)

    def oracle_step(params, grads, states, steps):
        oracle.lamb(params, grads, *states, steps, lr=lr, adapt=adapt, clip=None, grad_scale=None, **LAMB_HYPER)

    _run(path, specs, seed, 2, step, oracle_step)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=3, deadline=None)
@given(specs=mixed_specs(), seed=st.integers(0, 2**31 - 1), nesterov=st.booleans(), weight_decay=st.sampled_from([0.0, 1e-3]))
def test_lars(path, specs, seed, nesterov, weight_decay):
    # The per-tensor and foreach Nesterov steps add their two terms to a bf16 parameter one after
    # the other (two roundings, as without the option; the parameter update is not this option's),
    # the oracle and the kernels in one: with LARS's local rate ∝ ‖x‖ that ulp is amplified.
    assume(not (nesterov and specs[0].dtype == torch.bfloat16 and path != "fused"))
    hyper = dict(lr=0.5, momentum=0.9, dampening=0.0, nesterov=nesterov, weight_decay=weight_decay,
                 trust_coefficient=0.02, eps=1e-8, trust_clip=False, adapt=True, lr_in_momentum=False, maximize=False)  # fmt: skip

    def step(params, grads, states, steps, **path_args):
        lars(params, grads, states[0], steps, **hyper, **path_args)

    def oracle_step(params, grads, states, steps):
        oracle.lars(params, grads, states[0], steps, grad_scale=None, **hyper)

    _run(path, specs, seed, 1, step, oracle_step)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=3, deadline=None)
@given(specs=mixed_specs(), seed=st.integers(0, 2**31 - 1), no_prox=st.booleans())
def test_adan(path, specs, seed, no_prox):
    hyper = dict(lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.02, no_prox=no_prox, maximize=False)

    def step(params, grads, states, steps, **path_args):
        adan(params, grads, *states, steps, **hyper, **path_args)

    def oracle_step(params, grads, states, steps):
        oracle.adan(params, grads, *states, steps, clip=None, grad_scale=None, **hyper)

    _run(path, specs, seed, 4, step, oracle_step)


CLASSES = {
    "LAMB": (LAMB, dict(lr=1e-2, weight_decay=0.01)),
    "LARS": (LARS, dict(lr=0.5, momentum=0.9, trust_coefficient=0.02)),
    "Adan": (Adan, dict(lr=1e-2, weight_decay=0.02)),
}


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("dtype, state_dtype", MIXED)
def test_fused_optimizers_keep_the_state_dtype_and_step_like_the_reference(name, dtype, state_dtype):
    """The classes with fused=True create their states in `state_dtype`, and step like the
    per-tensor path (which the oracle tests above compare in detail): within 2⁻⁵ of the
    reference's displacement, plus for bf16 parameters an ulp per step (the interpreter
    truncates to bf16 where torch rounds)."""
    cls, hyper = CLASSES[name]
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(s, generator=generator).to(dtype).to(DEVICE) for s in [(37,), (5, 7), ()]]
    grads = [[torch.randn(p.shape, generator=generator).to(dtype).to(DEVICE) for p in initial] for _ in range(STEPS)]
    runs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        optimizer = cls(params, **hyper, fused=fused, foreach=False if not fused else None, state_dtype=state_dtype)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        moments = [v for p in params for k, v in optimizer.state[p].items() if k not in ("step", "kahan_comp")]
        assert moments and all(v.dtype == state_dtype for v in moments)
        runs.append(params)
    for fused_p, ref_p, start in zip(*runs, initial):
        displacement = float((ref_p.detach().double() - start.double()).abs().max())
        error = float((fused_p.detach().double() - ref_p.detach().double()).abs().max())
        ulp = torch.finfo(dtype).eps * float(ref_p.detach().abs().max())
        assert error <= 2**-5 * displacement + (STEPS + 1) * ulp, (error, displacement)
