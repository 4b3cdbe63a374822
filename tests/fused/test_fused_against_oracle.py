"""fused_lamb / fused_lars / fused_adan == the float64 oracle, over random tensor lists and options.

Lists of 1–40 tensors (0-dim, empty, up to a few chunks, sizes that are no multiple of the
chunk), one dtype or a mix, states in fp32 or the param dtype, five steps with fresh gradients,
random hyper-parameters, lr as a float or a tensor, with and without a grad scale and a
clipping coefficient, some parameters or gradients all zero. The boolean options are not drawn
but parametrised, six settings in which every pair of them takes all four value pairs
(`pairwise_rows`); each setting also runs the corners given by `@example` (Nesterov momentum, zero
parameters, zero gradients with weight decay, LAMB with eps = 0), on a few small fp32 tensors that
end in partial chunks. The gradients passed in must come back untouched.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import _oracle as oracle
from _fused_cases import (
    DEVICE,
    STEPS,
    TensorSpec,
    assert_matches,
    pairwise_settings,
    random_tensors,
    requires_kernels,
    step_counters,
    stored,
    tensor_specs,
    zeros,
)
from largebatch.fused import fused_adan, fused_lamb, fused_lars

pytestmark = requires_kernels

EXAMPLES = 2  # random draws per setting of the boolean options; six settings per optimizer

# Powers of two, as GradScaler uses: unscaling is then exact and the oracle needs no tolerance for it.
grad_scales = st.sampled_from([None, 1.0, 256.0])
clip_coefs = st.one_of(st.none(), st.floats(0.05, 1.0))
learning_rates = st.floats(1e-4, 0.1)


def _lr_argument(lr: float, as_tensor: bool) -> float | torch.Tensor:
    return torch.tensor(lr, device=DEVICE) if as_tensor else lr


def _optional_tensor(value: float | None) -> torch.Tensor | None:
    return None if value is None else torch.tensor(value, device=DEVICE)


# Indices (modulo the list's length) of tensors that start at zero, or whose gradient is always zero.
zeroed = st.lists(st.integers(0, 39), max_size=3)
# Small fp32 tensors for the corners: a 0-dim one, a partial chunk, a full one, one of 2 + 5 elements.
CORNER_SPECS = [TensorSpec(shape, torch.float32, torch.float32) for shape in [(), (5,), (16,), (37,), (3, 7)]]


def _zero_at(tensors, indices):
    for i in indices:
        tensors[i % len(tensors)].zero_()
    return tensors


def _grads_for_step(specs, generator, grad_scale, zero_grads=()):
    grads = _zero_at(random_tensors(specs, generator, scale=grad_scale or 1.0), zero_grads)
    return grads, [g.clone() for g in grads]


LAMB_CORNER = dict(
    seed=0, lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.01, trust_clip=None, clip=None, grad_scale=None,
    zero_grads=[],
)  # fmt: skip


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # eps = 0, masked lanes
@pairwise_settings("adapt", "bias_correction", "grad_averaging", "maximize", "lr_as_tensor")
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    specs=tensor_specs(),
    seed=st.integers(0, 2**31 - 1),
    lr=learning_rates,
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    trust_clip=st.sampled_from([None, 0.5, 10.0]),
    clip=clip_coefs,
    grad_scale=grad_scales,
    zero_params=zeroed,
    zero_grads=zeroed,
)
@example(specs=CORNER_SPECS, eps=0.0, zero_params=[], **LAMB_CORNER)  # 0/0 in the lanes past each end
@example(specs=CORNER_SPECS, eps=1e-6, zero_params=[0, 3], **LAMB_CORNER)  # ‖x‖ = 0: trust ratio 1
def test_lamb(flags, specs, seed, lr, clip, grad_scale, zero_params, zero_grads, **hyper):
    hyper = {**hyper, **flags}
    lr_as_tensor = hyper.pop("lr_as_tensor")
    generator = torch.Generator().manual_seed(seed)
    params = _zero_at(random_tensors(specs, generator), zero_params)
    exp_avgs, exp_avg_sqs, steps = zeros(specs), zeros(specs), step_counters(specs)
    o_params, o_exp_avgs, o_exp_avg_sqs, o_steps = stored(params), stored(exp_avgs), stored(exp_avg_sqs), [0] * len(specs)
    for _ in range(STEPS):
        grads, grads_before = _grads_for_step(specs, generator, grad_scale, zero_grads)
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


LARS_CORNER = dict(
    seed=0, lr=0.5, momentum=0.9, dampening=0.0, trust_coefficient=0.02, eps=1e-8, grad_scale=None, zero_params=[]
)  # fmt: skip


@pairwise_settings("adapt", "nesterov", "trust_clip", "lr_in_momentum", "maximize", "lr_as_tensor")
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    specs=tensor_specs(),
    seed=st.integers(0, 2**31 - 1),
    lr=st.floats(0.01, 2.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.1]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
    trust_coefficient=st.floats(1e-3, 0.1),
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    grad_scale=grad_scales,
    zero_params=zeroed,
    zero_grads=zeroed,
)
@example(specs=CORNER_SPECS, weight_decay=0.01, zero_grads=[], **LARS_CORNER)  # Nesterov in the nesterov rows
@example(specs=CORNER_SPECS, weight_decay=0.1, zero_grads=[0, 3], **LARS_CORNER)  # ‖g‖ = 0: local rate 1
def test_lars(flags, specs, seed, lr, grad_scale, zero_params, zero_grads, **hyper):
    hyper = {**hyper, **flags}
    lr_as_tensor = hyper.pop("lr_as_tensor")
    hyper["nesterov"] = hyper["nesterov"] and hyper["momentum"] > 0 and hyper["dampening"] == 0
    generator = torch.Generator().manual_seed(seed)
    params = _zero_at(random_tensors(specs, generator), zero_params)
    buffers = zeros(specs) if hyper["momentum"] else None
    steps = step_counters(specs)
    o_params, o_buffers, o_steps = stored(params), stored(buffers) if buffers else None, [0] * len(specs)
    for _ in range(STEPS):
        grads, grads_before = _grads_for_step(specs, generator, grad_scale, zero_grads)
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


@pairwise_settings("no_prox", "maximize", "lr_as_tensor")
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    specs=tensor_specs(),
    seed=st.integers(0, 2**31 - 1),
    lr=learning_rates,
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.99),
    beta3=st.floats(0.5, 0.999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.02, 0.5]),
    clip=clip_coefs,
    grad_scale=grad_scales,
    zero_params=zeroed,
    zero_grads=zeroed,
)
@example(  # lr·λ = 0.05: the proximal step x/(1 + lr·λ) and the decoupled x·(1 − lr·λ) differ by (lr·λ)²
    specs=CORNER_SPECS, seed=0, lr=0.1, beta1=0.9, beta2=0.9, beta3=0.99, eps=1e-8, weight_decay=0.5, clip=None,
    grad_scale=None, zero_params=[], zero_grads=[],
)  # fmt: skip
def test_adan(flags, specs, seed, lr, clip, grad_scale, zero_params, zero_grads, **hyper):
    hyper = {**hyper, **flags}
    lr_as_tensor = hyper.pop("lr_as_tensor")
    generator = torch.Generator().manual_seed(seed)
    params = _zero_at(random_tensors(specs, generator), zero_params)
    states = [zeros(specs) for _ in range(4)]  # exp_avg, exp_avg_diff, exp_avg_sq, prev_grad
    steps = step_counters(specs)
    o_params, o_states, o_steps = stored(params), [stored(s) for s in states], [0] * len(specs)
    for _ in range(STEPS):
        grads, grads_before = _grads_for_step(specs, generator, grad_scale, zero_grads)
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
