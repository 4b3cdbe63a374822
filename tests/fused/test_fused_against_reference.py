"""fused=True == the library's per-tensor reference (largebatch.optimizers.functional with
foreach=False), in fp32, over random hyper-parameters: the two paths implement one definition.

(bf16/fp16 are compared with the float64 oracle in test_fused_against_oracle.py: the reference
computes in the storage dtype, the kernels in fp32, so there they legitimately differ.)
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _fused_cases import DEVICE, STEPS, pairwise_settings, requires_kernels, step_counters
from largebatch.optimizers.functional import adan, lamb, lars

pytestmark = requires_kernels

EXAMPLES = 1  # random draws per setting of the boolean options (parametrised pairwise, up to six)
SIZES = [(), (0,), (3,), (16,), (37,), (5, 7)]


def _assert_close(actual, expected):
    for a, e in zip(actual, expected):
        if e.numel():
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def _tensors(generator):
    return [torch.randn(s, generator=generator).to(DEVICE) for s in SIZES]


def _run_both(seed, step, n_states):
    """Run `step(params, grads, states, steps, fused)` on two identical copies, one per path."""
    generator = torch.Generator().manual_seed(seed)
    initial = _tensors(generator)
    runs = []
    for fused in (True, False):
        params = [p.clone() for p in initial]
        states = [[torch.zeros_like(p) for p in params] for _ in range(n_states)]
        steps = step_counters(params) if fused else [torch.zeros(()) for _ in params]
        runs.append((params, states, steps, fused))
    for _ in range(STEPS):
        grads = _tensors(generator)
        for params, states, steps, fused in runs:
            step(params, grads, states, steps, fused)
    (fused_params, fused_states, fused_steps, _), (ref_params, ref_states, ref_steps, _) = runs
    _assert_close(fused_params, ref_params)
    for fused_state, ref_state in zip(fused_states, ref_states):
        _assert_close(fused_state, ref_state)
    assert [float(s) for s in fused_steps] == [float(s) for s in ref_steps] == [STEPS] * len(SIZES)


@pairwise_settings("bias_correction", "grad_averaging", "adapt", "maximize")
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    weight_decay=st.sampled_from([0.0, 0.01]),
    trust_clip=st.sampled_from([None, 0.5]),
    clip=st.one_of(st.none(), st.floats(0.1, 1.0)),
)
def test_lamb(flags, seed, clip, **hyper):
    hyper = {**hyper, **flags}

    def step(params, grads, states, steps, fused):
        coef = None if clip is None else torch.tensor(clip, device=DEVICE)
        lamb(params, grads, *states, steps, fused=fused, foreach=False, grad_clip_coef=coef, eps=1e-6, **hyper)

    _run_both(seed, step, n_states=2)


@pairwise_settings("nesterov", "trust_clip", "adapt", "lr_in_momentum", "maximize")
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lr=st.floats(0.01, 2.0),
    momentum=st.sampled_from([0.0, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-4]),
    trust_coefficient=st.floats(1e-3, 0.1),
)
def test_lars(flags, seed, **hyper):
    hyper = {**hyper, **flags}
    hyper["nesterov"] = hyper["nesterov"] and hyper["momentum"] > 0

    def step(params, grads, states, steps, fused):
        buffers = states[0] if hyper["momentum"] else None
        lars(params, grads, buffers, steps, fused=fused, foreach=False, dampening=0.0, eps=1e-8, **hyper)

    _run_both(seed, step, n_states=1)


@pairwise_settings("no_prox", "maximize")
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.99),
    beta3=st.floats(0.5, 0.999),
    weight_decay=st.sampled_from([0.0, 0.02]),
    clip=st.one_of(st.none(), st.floats(0.1, 1.0)),
)
def test_adan(flags, seed, clip, **hyper):
    hyper = {**hyper, **flags}

    def step(params, grads, states, steps, fused):
        coef = None if clip is None else torch.tensor(clip, device=DEVICE)
        adan(params, grads, *states, steps, fused=fused, foreach=False, grad_clip_coef=coef, eps=1e-8, **hyper)

    _run_both(seed, step, n_states=4)
