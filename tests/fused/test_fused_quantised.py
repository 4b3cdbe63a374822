"""``state_dtype="8bit"`` on the fused path: the kernels' dequantise/requantise against the
library's own (`largebatch.optimizers._quantised`, itself tested against a brute-force nearest
value), fused LAMB, LARS and Adan against the per-tensor reference, checkpoints, the GradScaler
skip, pooling, and the refusals.

How close fused and reference can be: both take the same float32 moments, but the kernels'
float32 arithmetic is not torch's operation for operation, so a moment one ulp from a midpoint of
the code map can round to the next code on one path only: then that element's state differs by a
map gap (≤ 2·HALF_GAP of its block's absmax) and its later steps by up to a few percent. So
almost every element (≥ 99 %) must agree to float32 rounding and every element within a few
percent of its displacement. bf16 parameters are compared as p + c (the Kahan sum, on by default),
since the interpreter truncates to bf16 where torch rounds to nearest; gradients are bf16 values,
so that Adan's g_prev (bf16 under "8bit") is the same on both paths.
"""

from __future__ import annotations

import io

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from _fused_cases import requires_kernels
from largebatch import LAMB, LARS, Adan
from largebatch.fused import Chunking, chunking
from largebatch.fused._blockwise import load_state, store_state
from largebatch.optimizers._quantised import HALF_GAP, dequantised, kernel_tables, quantise_, quantised
from largebatch.optimizers.functional import lamb

pytestmark = requires_kernels

#: Chunks of whole blocks (256 elements), two per program: the smallest chunking 8-bit states take.
QUANTISED_CHUNKING = Chunking(chunk_size=256, num_warps=1, chunks_per_program=2)
OPTIMIZERS = {
    "LAMB": (LAMB, dict(lr=0.01, weight_decay=0.01), ("exp_avg", "exp_avg_sq")),
    "LAMB, no adaptation": (LAMB, dict(lr=0.01, weight_decay=0.0), ("exp_avg", "exp_avg_sq")),
    "LARS": (LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4), ("momentum_buffer",)),
    "LARS, nesterov": (LARS, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), ("momentum_buffer",)),
    "Adan": (Adan, dict(lr=0.01, weight_decay=0.02), ("exp_avg", "exp_avg_diff", "exp_avg_sq")),
    "Adan, no_prox": (Adan, dict(lr=0.01, weight_decay=0.02, no_prox=True), ("exp_avg", "exp_avg_diff", "exp_avg_sq")),
}


# --------------------------------------------------------------------------- the kernels' quantiser


@triton.jit
def _rescale_kernel(state_ptrs, scale_ptrs, code_maps, midpoints, numel, factor, CHUNK: tl.constexpr, DTYPE: tl.constexpr):
    """Each chunk of tensor 0: dequantise, multiply by `factor`, requantise (tail chunks masked)."""
    offsets = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    mask = offsets < numel
    value = load_state(state_ptrs, scale_ptrs, code_maps, 0, offsets, mask, 0.0, DTYPE, False)
    store_state(state_ptrs, scale_ptrs, midpoints, 0, offsets, mask, numel, value * factor, DTYPE, False, True, CHUNK)


@settings(max_examples=25, deadline=None)
@given(
    numel=st.integers(1, 1100),
    signed=st.booleans(),
    factor=st.floats(0.01, 100.0),
    spread=st.integers(0, 4),
    zero_block=st.booleans(),
    chunk=st.sampled_from([256, 512]),
    seed=st.integers(0, 2**16),
)
def test_the_kernels_quantise_as_the_library_does(numel, signed, factor, spread, zero_block, chunk, seed):
    """Codes and scales bit for bit, over sizes with short last blocks and tail chunks, values
    spread over up to 8 decades, and all-zero blocks."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator) * 10.0 ** (spread * (2 * torch.rand(numel, generator=generator) - 1))
    if zero_block:
        values[:256] = 0
    codes, scales = quantised(values if signed else values.abs(), signed)
    expected_codes, expected_scales = codes.clone(), scales.clone()
    quantise_(expected_codes, expected_scales, dequantised(codes, scales) * factor)
    maps, midpoints = kernel_tables(codes.device)
    rows = [torch.tensor([t.data_ptr()], dtype=torch.int64) for t in (codes, scales)]
    dtype = tl.int8 if signed else tl.uint8
    _rescale_kernel[(-(-numel // chunk),)](*rows, maps, midpoints, numel, factor, CHUNK=chunk, DTYPE=dtype)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(scales, expected_scales)


# --------------------------------------------------------------------------- fused == per-tensor


def _params(shapes, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def _train(optimizer, params, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    with chunking(QUANTISED_CHUNKING):
        for _ in range(steps):
            for p in params:
                # bf16 values: Adan's g_prev (bf16 under "8bit") is then the same whether the
                # interpreter truncates it or torch rounds it.
                p.grad = torch.randn(p.shape, generator=generator).bfloat16().to(p.dtype)
            optimizer.step()


def _make(name, fused, shapes, dtype, seed=0):
    cls, hyper, _ = OPTIMIZERS[name]
    params = _params(shapes, dtype, seed)
    return cls(params, **hyper, state_dtype="8bit", fused=fused, foreach=None if fused else False), params


def _effective(optimizer, p):
    """The parameter's value in float64: p + c where it has a Kahan buffer."""
    value = p.detach().double()
    comp = optimizer.state[p].get("kahan_comp")
    return value if comp is None else value + comp.double()


def _assert_states_agree(name, fused, reference, p, q):
    for key in OPTIMIZERS[name][2]:
        codes, ref_codes = fused.state[p][key], reference.state[q][key]
        scales, ref_scales = fused.state[p][f"{key}_scale"], reference.state[q][f"{key}_scale"]
        assert codes.dtype == ref_codes.dtype and codes.shape == ref_codes.shape and scales.shape == ref_scales.shape
        if not codes.numel():
            continue
        torch.testing.assert_close(scales, ref_scales, rtol=1e-3, atol=0)
        one_code = 2 * HALF_GAP[codes.dtype] * float(ref_scales.max())
        error = (dequantised(codes, scales) - dequantised(ref_codes, ref_scales)).abs()
        assert float(error.max()) <= 1.01 * one_code, key
        assert float((codes != ref_codes).float().mean()) <= 0.01, key


shape_lists = st.lists(
    st.one_of(st.just(()), st.just((0,)), st.integers(1, 700).map(lambda n: (n,)), st.tuples(st.integers(1, 30), st.integers(1, 30))),
    min_size=1,
    max_size=4,
)


@pytest.mark.filterwarnings("ignore:LAMB adapts no param group")
@pytest.mark.parametrize("name", OPTIMIZERS)
@settings(max_examples=4, deadline=None)
@given(shapes=shape_lists, dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_fused_matches_the_per_tensor_reference(name, shapes, dtype, seed):
    # The per-tensor Nesterov step adds its two terms to a bf16 parameter one after the other
    # (tests/fused/test_fused_state_dtype.py says more): not the same sum.
    assume(not (name == "LARS, nesterov" and dtype == torch.bfloat16))
    fused, params = _make(name, True, shapes, dtype, seed)
    reference, ref_params = _make(name, False, shapes, dtype, seed)
    start = [p.detach().double().clone() for p in params]
    _train(fused, params, 3, seed)
    _train(reference, ref_params, 3, seed)
    for p, q, p0 in zip(params, ref_params, start):
        assert fused.state[p].keys() == reference.state[q].keys()
        assert int(fused.state[p]["step"]) == int(reference.state[q]["step"]) == 3
        _assert_states_agree(name, fused, reference, p, q)
        if not p.numel():
            continue
        value, expected = _effective(fused, p), _effective(reference, q)
        error = (value - expected).abs()
        displacement = float((expected - p0).abs().max())
        # bf16: c itself is bf16, so p + c is the Kahan sum to 2⁻¹⁷ of |p| per step.
        rounding = 2**-14 * float(expected.abs().max()) if dtype == torch.bfloat16 else 1e-6
        assert float(error.max()) <= 2**-4 * displacement + rounding
        if dtype == torch.float32:
            tight = 1e-5 * expected.abs() + 1e-6
            assert float((error <= tight).float().mean()) >= 0.99


# --------------------------------------------------------------------------- checkpoints and steps


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


SHAPES = [(300,), (), (7, 40), (0,)]


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adan"])
def test_a_loaded_checkpoint_continues_bit_for_bit(name):
    """A fused 8-bit optimizer's state_dict round-trips: a twin that loads it steps identically,
    and the per-tensor reference loads the very codes and scales."""
    optimizer, params = _make(name, True, SHAPES, torch.float32)
    _train(optimizer, params, 2, seed=1)
    saved = _roundtrip(optimizer.state_dict())
    twin, twin_params = _make(name, True, SHAPES, torch.float32)
    reference, ref_params = _make(name, False, SHAPES, torch.float32)
    for target, target_params in ((twin, twin_params), (reference, ref_params)):
        with torch.no_grad():
            for t, p in zip(target_params, params):
                t.copy_(p)
        target.load_state_dict(saved)
    for q, p in zip(ref_params, params):
        assert all(torch.equal(reference.state[q][k], v) for k, v in optimizer.state[p].items())
    _train(optimizer, params, 2, seed=2)
    _train(twin, twin_params, 2, seed=2)
    for p, t in zip(params, twin_params):
        assert torch.equal(p, t)
        assert all(torch.equal(twin.state[t][k], v) for k, v in optimizer.state[p].items())


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adan"])
def test_codes_and_scales_are_pooled_and_the_plan_is_reused(name):
    optimizer, params = _make(name, True, SHAPES, torch.float32)
    _train(optimizer, params, 3, seed=1)
    for key in OPTIMIZERS[name][2]:
        for part in (key, f"{key}_scale"):
            tensors = [optimizer.state[p][part] for p in params]
            assert tensors[0]._base is not None and all(t._base is tensors[0]._base for t in tensors), part
    (plans,) = optimizer._fused_plan_caches
    assert plans.builds == 1  # after the first step's pooling, every step reuses the plan
    assert all(plan._pooled_bases is not None for plan in plans._plans.values())


def _lamb_tensors(numel=300):
    generator = torch.Generator().manual_seed(3)
    p, g = torch.randn(numel, generator=generator), torch.randn(numel, generator=generator)
    m, m_scales = quantised(0.1 * torch.randn(numel, generator=generator), signed=True)
    v, v_scales = quantised(0.01 * torch.rand(numel, generator=generator), signed=False)
    return p, g, m, m_scales, v, v_scales, torch.zeros((), dtype=torch.float32)


LAMB_HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                  grad_averaging=True, trust_clip=None, adapt=True, maximize=False)  # fmt: skip


def test_a_skipped_step_changes_nothing():
    """GradScaler's found_inf: no code, scale, parameter or counter changes."""
    p, g, m, m_scales, v, v_scales, step = _lamb_tensors()
    before = [t.clone() for t in (p, m, m_scales, v, v_scales, step)]
    with chunking(QUANTISED_CHUNKING):
        lamb([p], [g], [m], [v], [step], fused=True, exp_avg_scales=[m_scales], exp_avg_sq_scales=[v_scales],
             found_inf=torch.ones(()), grad_scale=torch.ones(()), **LAMB_HYPER)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip((p, m, m_scales, v, v_scales, step), before))


def test_the_functional_form_steps_8bit_fused_like_the_reference():
    tensors = [_lamb_tensors() for _ in range(2)]
    with chunking(QUANTISED_CHUNKING):
        for fused, (p, g, m, m_scales, v, v_scales, step) in zip((True, False), tensors):
            lamb([p], [g], [m], [v], [step], fused=fused, foreach=False if not fused else None,
                 exp_avg_scales=[m_scales], exp_avg_sq_scales=[v_scales], **LAMB_HYPER)  # fmt: skip
    (p, _, m, m_scales, *_), (q, _, n, n_scales, *_) = tensors
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert float((m != n).float().mean()) <= 0.01
    torch.testing.assert_close(m_scales, n_scales, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adan"])
def test_chunks_of_partial_blocks_are_refused_and_change_nothing(name):
    optimizer, params = _make(name, True, SHAPES, torch.float32)
    _train(optimizer, params, 1, seed=1)
    before = [p.detach().clone() for p in params]
    states = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    for p in params:
        p.grad = torch.ones_like(p)
    with chunking(Chunking(chunk_size=128, num_warps=1)), pytest.raises(ValueError, match="chunk_size=128"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for p in params:
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in states[p].items())


def test_the_functional_form_needs_the_scales_of_every_quantised_state():
    p, g, m, m_scales, v, _, step = _lamb_tensors()
    before = [t.clone() for t in (p, m, m_scales, step)]
    with chunking(QUANTISED_CHUNKING), pytest.raises(ValueError, match="scales of every quantised state"):
        lamb([p], [g], [m], [v], [step], fused=True, exp_avg_scales=[m_scales], **LAMB_HYPER)
    assert all(torch.equal(a, b) for a, b in zip((p, m, m_scales, step), before))


def test_sharded_tensors_are_refused():
    from largebatch.optimizers._sharding import ShardReduction

    p, g, m, m_scales, v, v_scales, step = _lamb_tensors()
    with pytest.raises(ValueError, match="sharded"):
        lamb([p], [g], [m], [v], [step], fused=True, exp_avg_scales=[m_scales], exp_avg_sq_scales=[v_scales],
             shard_reduction=ShardReduction(()), **LAMB_HYPER)  # fmt: skip


def test_scales_of_the_wrong_size_are_refused():
    p, g, m, m_scales, v, v_scales, step = _lamb_tensors()
    with chunking(QUANTISED_CHUNKING), pytest.raises(RuntimeError, match="scales of 8-bit states"):
        lamb([p], [g], [m], [v], [step], fused=True, exp_avg_scales=[m_scales[:1]], exp_avg_sq_scales=[v_scales],
             **LAMB_HYPER)  # fmt: skip


def test_a_channels_last_parameter_is_refused_and_changes_nothing():
    """Blocks are row-major runs on every path; the kernels walk storage order, which for a
    channels_last weight is another: refused (the non-fused paths take it)."""
    weight = torch.nn.Parameter(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last))
    optimizer = LAMB([weight], lr=0.01, weight_decay=0.01, state_dtype="8bit", fused=True)
    before = weight.detach().clone()
    weight.grad = torch.ones_like(weight)
    with chunking(QUANTISED_CHUNKING), pytest.raises(ValueError, match="contiguous parameters; tensor 0"):
        optimizer.step()
    assert torch.equal(weight, before) and not optimizer.state[weight]
