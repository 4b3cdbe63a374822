"""fused_lamb / fused_lars / fused_adan == the float64 oracle, over random tensor lists and options.

Lists of 1–40 tensors (0-dim, empty, up to a few chunks, sizes that are no multiple of the
chunk), one dtype or a mix, states in fp32 or the param dtype, five steps with fresh gradients,
random hyper-parameters, lr as a float or a tensor, with and without a grad scale and a
clipping coefficient. The gradients passed in must come back untouched.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import _oracle as oracle
from _fused_cases import DEVICE, STEPS, assert_matches, random_tensors, requires_kernels, step_counters, stored, tensor_specs, zeros
from largebatch.fused import fused_adan, fused_lamb, fused_lars

pytestmark = requires_kernels

EXAMPLES = 6

# Powers of two, as GradScaler uses: unscaling is then exact and the oracle needs no tolerance for it.
grad_scales = st.sampled_from([None, 1.0, 256.0])
clip_coefs = st.one_of(st.none(), st.floats(0.05, 1.0))
learning_rates = st.floats(1e-4, 0.1)


def _lr_argument(lr: float, as_tensor: bool) -> float | torch.Tensor:
    return torch.tensor(lr, device=DEVICE) if as_tensor else lr


def _optional_tensor(value: float | None) -> torch.Tensor | None:
    return None if value is None else torch.tensor(value, device=DEVICE)


def _grads_for_step(specs, generator, grad_scale):
    grads = random_tensors(specs, generator, scale=grad_scale or 1.0)
    return grads, [g.clone() for g in grads]


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    specs=tensor_specs(),
    seed=st.integers(0, 2**31 - 1),
    lr=learning_rates,
    lr_as_tensor=st.booleans(),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    bias_correction=st.booleans(),
    grad_averaging=st.booleans(),
    trust_clip=st.sampled_from([None, 0.5, 10.0]),
    adapt=st.booleans(),
    maximize=st.booleans(),
    clip=clip_coefs,
    grad_scale=grad_scales,
)
def test_lamb(specs, seed, lr, lr_as_tensor, clip, grad_scale, **hyper):
    generator = torch.Generator().manual_seed(seed)
    params = random_tensors(specs, generator)
    exp_avgs, exp_avg_sqs, steps = zeros(specs), zeros(specs), step_counters(specs)
    o_params, o_exp_avgs, o_exp_avg_sqs, o_steps = stored(params), stored(exp_avgs), stored(exp_avg_sqs), [0] * len(specs)
    for _ in range(STEPS):
        grads, grads_before = _grads_for_step(specs, generator, grad_scale)
        fused_lamb(
            params, grads, exp_avgs, exp_avg_sqs, steps, lr=_lr_argument(lr, lr_as_tensor),
            grad_clip_coef=_optional_tensor(clip), grad_scale=_optional_tensor(grad_scale), found_inf=None, **hyper,
        )  # fmt: skip
        oracle.lamb(
            o_params, [g.cpu() for g in grads], o_exp_avgs, o_exp_avg_sqs, o_steps, lr=lr, clip=clip,
            grad_scale=grad_scale, **hyper,
        )  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_before))
    assert_matches(exp_avgs, o_exp_avgs, "exp_avg")
    assert_matches(exp_avg_sqs, o_exp_avg_sqs, "exp_avg_sq")
    assert_matches(params, o_params, "param")
    assert [int(s) for s in steps] == o_steps


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    specs=tensor_specs(),
    seed=st.integers(0, 2**31 - 1),
    lr=st.floats(0.01, 2.0),
    lr_as_tensor=st.booleans(),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.1]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
    trust_coefficient=st.floats(1e-3, 0.1),
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    trust_clip=st.booleans(),
    adapt=st.booleans(),
    lr_in_momentum=st.booleans(),
    maximize=st.booleans(),
    grad_scale=grad_scales,
)
def test_lars(specs, seed, lr, lr_as_tensor, grad_scale, **hyper):
    hyper["nesterov"] = hyper["nesterov"] and hyper["momentum"] > 0 and hyper["dampening"] == 0
    generator = torch.Generator().manual_seed(seed)
    params = random_tensors(specs, generator)
    buffers = zeros(specs) if hyper["momentum"] else None
    steps = step_counters(specs)
    o_params, o_buffers, o_steps = stored(params), stored(buffers) if buffers else None, [0] * len(specs)
    for _ in range(STEPS):
        grads, grads_before = _grads_for_step(specs, generator, grad_scale)
        fused_lars(
            params, grads, buffers, steps, lr=_lr_argument(lr, lr_as_tensor), grad_scale=_optional_tensor(grad_scale),
            found_inf=None, **hyper,
        )  # fmt: skip
        oracle.lars(o_params, [g.cpu() for g in grads], o_buffers, o_steps, lr=lr, grad_scale=grad_scale, **hyper)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_before))
    if buffers is not None:
        assert_matches(buffers, o_buffers, "momentum_buffer")
    assert_matches(params, o_params, "param")
    assert [int(s) for s in steps] == o_steps


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    specs=tensor_specs(),
    seed=st.integers(0, 2**31 - 1),
    lr=learning_rates,
    lr_as_tensor=st.booleans(),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.99),
    beta3=st.floats(0.5, 0.999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.02, 0.5]),
    no_prox=st.booleans(),
    maximize=st.booleans(),
    clip=clip_coefs,
    grad_scale=grad_scales,
)
def test_adan(specs, seed, lr, lr_as_tensor, clip, grad_scale, **hyper):
    generator = torch.Generator().manual_seed(seed)
    params = random_tensors(specs, generator)
    states = [zeros(specs) for _ in range(4)]  # exp_avg, exp_avg_diff, exp_avg_sq, prev_grad
    steps = step_counters(specs)
    o_params, o_states, o_steps = stored(params), [stored(s) for s in states], [0] * len(specs)
    for _ in range(STEPS):
        grads, grads_before = _grads_for_step(specs, generator, grad_scale)
        fused_adan(
            params, grads, *states, steps, lr=_lr_argument(lr, lr_as_tensor), grad_clip_coef=_optional_tensor(clip),
            grad_scale=_optional_tensor(grad_scale), found_inf=None, **hyper,
        )  # fmt: skip
        oracle.adan(
            o_params, [g.cpu() for g in grads], *o_states, o_steps, lr=lr, clip=clip, grad_scale=grad_scale, **hyper
        )
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_before))
    for name, actual, expected in zip(("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"), states, o_states):
        assert_matches(actual, expected, name)
    assert_matches(params, o_params, "param")
    assert [int(s) for s in steps] == o_steps
