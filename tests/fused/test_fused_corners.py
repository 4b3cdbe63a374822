"""The corners of the fused kernels that random draws rarely reach, through the optimizer classes.

Each test runs a few steps of `fused=True` and of the per-tensor reference (`foreach=False`) on the
same fp32 tensors and requires the same result: Nesterov momentum, a zero-initialised parameter
(LAMB's trust ratio falls back to 1), a zero gradient with weight decay (LARS's local rate falls
back to 1), and `eps=0` on tensors that end in a partial chunk (the lanes past the end must not
enter ‖u‖). Sizes are chosen against the 16-element test chunks: full chunks, tails, 0-dim.
"""

from __future__ import annotations

import pytest
import torch

from _fused_cases import DEVICE, TEST_CHUNKING, requires_kernels
from largebatch import LAMB, LARS

pytestmark = requires_kernels

STEPS = 3
SHAPES = [(), (5,), (16,), (37,), (3, 7)]
assert any(torch.Size(s).numel() % TEST_CHUNKING.chunk_size for s in SHAPES)  # some tails


def _random(shapes, generator):
    return [torch.randn(s, generator=generator).to(DEVICE) for s in shapes]


def _run_both(make, initial, grad_steps):
    """The parameters after `grad_steps` with `make(params, fused)` for fused=True and the reference."""
    results = []
    for fused in (True, False):
        params = [p.clone().requires_grad_() for p in initial]
        optimizer = make(params, fused)
        for grads in grad_steps:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    return results


def _assert_close(actual, expected):
    for a, e in zip(actual, expected):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def _grad_steps(shapes, generator):
    return [_random(shapes, generator) for _ in range(STEPS)]


@pytest.mark.parametrize("lr_in_momentum", [False, True])
def test_lars_nesterov(lr_in_momentum):
    generator = torch.Generator().manual_seed(0)
    initial, grad_steps = _random(SHAPES, generator), _grad_steps(SHAPES, generator)

    def make(params, fused, nesterov=True):
        return LARS(params, lr=0.5, momentum=0.9, nesterov=nesterov, weight_decay=0.01, trust_coefficient=0.02,
                    lr_in_momentum=lr_in_momentum, fused=fused, foreach=False)  # fmt: skip

    fused, reference = _run_both(make, initial, grad_steps)
    _assert_close(fused, reference)
    plain, _ = _run_both(lambda params, fused: make(params, fused, nesterov=False), initial, grad_steps)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(plain, reference) if a.numel())  # Nesterov matters here


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_moves_a_zero_initialised_parameter(weight_decay):
    generator = torch.Generator().manual_seed(1)
    initial = [torch.zeros((), device=DEVICE), torch.zeros(37, device=DEVICE), *_random([(16,), (3, 7)], generator)]
    grad_steps = _grad_steps([p.shape for p in initial], generator)

    def make(params, fused):
        return LAMB(params, lr=0.01, weight_decay=weight_decay, always_adapt=True, fused=fused,
                    foreach=False)  # fmt: skip

    fused, reference = _run_both(make, initial, grad_steps)
    _assert_close(fused, reference)
    assert all(bool((p != 0).any()) for p in fused[:2])  # trust ratio 1 for a zero ‖x‖: the step is Adam's


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lars_zero_gradient_with_weight_decay(momentum):
    """‖g‖ = 0, ‖x‖ > 0: the local rate is 1, so the step is lr·λ·x (not η‖x‖/(λ‖x‖) = η/λ times that)."""
    generator = torch.Generator().manual_seed(2)
    initial = _random(SHAPES, generator)
    grad_steps = _grad_steps(SHAPES, generator)
    for grads in grad_steps:
        grads[3] = torch.zeros_like(grads[3])  # the (37,) tensor: a full chunk, a partial one
        grads[0] = torch.zeros_like(grads[0])

    def make(params, fused):
        return LARS(params, lr=0.1, momentum=momentum, weight_decay=0.1, trust_coefficient=0.02, fused=fused,
                    foreach=False)  # fmt: skip

    fused, reference = _run_both(make, initial, grad_steps)
    _assert_close(fused, reference)
    if momentum == 0.0:  # one plain decay step per step: x·(1 − lr·λ)^t
        torch.testing.assert_close(fused[3], initial[3] * (1 - 0.1 * 0.1) ** STEPS, rtol=1e-5, atol=0.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the masked lanes
@pytest.mark.parametrize("bias_correction", [False, True])
def test_lamb_eps_zero_with_partial_chunks(bias_correction):
    """With eps = 0 the lanes past a tensor's end compute 0/0: they must not reach ‖u‖."""
    generator = torch.Generator().manual_seed(3)
    initial, grad_steps = _random(SHAPES, generator), _grad_steps(SHAPES, generator)

    def make(params, fused):
        return LAMB(params, lr=0.01, eps=0.0, weight_decay=0.01, bias_correction=bias_correction, fused=fused,
                    foreach=False)  # fmt: skip

    fused, reference = _run_both(make, initial, grad_steps)
    _assert_close(fused, reference)
