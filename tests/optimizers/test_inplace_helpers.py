"""The helpers of the non-fused steps (largebatch/optimizers/_inplace.py): chunks of whole tensors
within the budget, the folded Adam denominator equal to the plain one (float16 included, where
the fold could underflow), scaled adds with float and tensor coefficients alike."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.optimizers import LAMB
from largebatch.optimizers._inplace import (
    add_scaled_,
    cache_chunks,
    foreach_add_scaled_,
    foreach_into,
    sqrt_denominator,
)


@settings(max_examples=50)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), budget=st.integers(1, 64))
def test_cache_chunks_are_consecutive_whole_tensors_within_the_budget(sizes, budget):
    params = [torch.zeros(n) for n in sizes]
    steps = [torch.zeros(()) for _ in sizes]
    chunks = list(cache_chunks([params, steps], budget))
    assert [t for chunk_params, _ in chunks for t in chunk_params] == params  # same order, all of them
    for chunk_params, chunk_steps in chunks:
        assert len(chunk_params) == len(chunk_steps)
        assert len(chunk_params) == 1 or sum(p.numel() for p in chunk_params) <= budget


def test_cache_chunks_keep_a_non_cpu_group_whole():
    params = [torch.empty(10, device="meta") for _ in range(5)]
    assert [len(c[0]) for c in cache_chunks([params], budget=1)] == [5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_folded_denominator_equals_the_plain_one(dtype):
    # eps 1e-7 is a float16 subnormal; eps·√bc (3e-9 at the first step) would round to 0 there.
    v = torch.tensor([0.0, 1e-4, 0.25, 4.0], dtype=dtype)
    m = torch.tensor([0.0, 1e-3, -0.5, 2.0], dtype=dtype)
    for bc in (1 - 0.999, 1 - 0.999**10, 1.0):
        denom, scale = sqrt_denominator(v, bc, 1e-7)
        got = (m / denom).float() * scale
        want = m.double() / ((v.double() / bc).sqrt() + 1e-7)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)


def test_float16_lamb_step_with_zero_gradients_stays_finite():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    param.grad = torch.tensor([0.0, 0.0, 0.5, -0.5], dtype=torch.float16)
    for foreach in (False, True):
        LAMB([param], lr=1e-3, eps=1e-7, foreach=foreach).step()  # eps·√bc2 would round to 0
        assert torch.isfinite(param).all()


@pytest.mark.parametrize("coefficient", [0.5, torch.tensor(0.5)])
def test_scaled_adds_take_floats_and_tensors_alike(coefficient):
    target, other = torch.ones(3), torch.arange(3.0)
    add_scaled_(target, other, coefficient)
    torch.testing.assert_close(target, 1 + 0.5 * other)
    targets = [torch.ones(2), torch.ones(3)]
    foreach_add_scaled_(targets, [torch.ones(2), torch.ones(3)], [coefficient, 2 * coefficient])
    torch.testing.assert_close(targets[1], torch.full((3,), 2.0))


def test_foreach_into_writes_into_the_given_cpu_tensors():
    inputs, outs = [torch.tensor([4.0]), torch.tensor([9.0])], [torch.empty(1), torch.empty(1)]
    result = foreach_into(torch.sqrt, torch._foreach_sqrt, [inputs], outs)
    assert all(r is o for r, o in zip(result, outs))
    torch.testing.assert_close(result, [torch.tensor([2.0]), torch.tensor([3.0])])
