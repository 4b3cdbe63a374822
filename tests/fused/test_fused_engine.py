"""The multi-tensor engine: bucketing, step plans (tables), layout checks, the global gradient
norm, determinism. What plans do across steps is in test_fused_plans.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import _oracle as oracle
from _fused_cases import DEVICE, TEST_CHUNKING, random_tensors, requires_kernels, step_counters, tensor_specs
from largebatch.fused import Chunking, fused_adan, fused_grad_norm, fused_lamb, fused_lars
from largebatch.fused._plan import PlanCache, StepPlan, bucket_tensor_lists

pytestmark = requires_kernels
CHUNK = TEST_CHUNKING.chunk_size


def chunk_table(elementwise, scalars=(), chunk_size=CHUNK):
    """A plan built for one call, as a functional fused step builds it."""
    lists = [*elementwise, *scalars]
    return StepPlan(lists, n_elementwise=len(elementwise), n_table=len(lists), owned_from=min(2, len(elementwise)),
                    chunk_size=chunk_size)  # fmt: skip


def plan_in(plans, elementwise, chunk_size=CHUNK):
    """The plan of one bucket, made current through `plans` as an optimizer's step does."""
    ((bucket,),) = [plans.buckets("test", elementwise, n_elementwise=len(elementwise), n_table=len(elementwise),
                                  owned_from=min(2, len(elementwise)), chunk_size=chunk_size)]  # fmt: skip
    return bucket.plan


def test_buckets_split_by_device_and_every_lists_dtype_in_input_order():
    a, b, c, d = (torch.zeros(2, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float32, torch.float32))
    states = [torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)]
    groups = bucket_tensor_lists([[a, b, c, d], states])
    cpu = torch.device("cpu")
    assert list(groups) == [
        (cpu, (torch.float32, torch.float32)),
        (cpu, (torch.bfloat16, torch.float32)),
        (cpu, (torch.float32, torch.bfloat16)),
    ]
    params, group_states = groups[(cpu, (torch.float32, torch.float32))]
    assert params[0] is a and params[1] is d and group_states[1] is states[3]


def test_chunk_table_rows():
    sizes = [(), (0,), (CHUNK,), (CHUNK + 1,), (2, CHUNK + 3)]
    params = [torch.zeros(s, device=DEVICE) for s in sizes]
    grads = [torch.zeros(s, device=DEVICE) for s in sizes]
    steps = step_counters(sizes)
    table = chunk_table([params, grads], [steps])
    # 1 + 1 + 1 + 2 + 3 chunks (the empty tensor has one chunk of no elements, so that every
    # tensor has a first chunk; 2·(CHUNK+3) elements need three)
    assert table.chunk_tensors.tolist() == [0, 1, 2, 3, 3, 4, 4, 4]
    assert table.first_chunks.tolist() == [0, 1, 2, 3, 5, 8]
    assert table.numels.tolist() == [1, 0, CHUNK, CHUNK + 1, 2 * (CHUNK + 3)]
    assert table.aligned.tolist() == [1] * 5
    assert [row.tolist() for row in table.pointers] == [[t.data_ptr() for t in lst] for lst in (params, grads, steps)]
    assert (table.n_tensors, table.n_chunks) == (5, 8)


def test_uniform_lists_are_one_bucket_of_the_lists_themselves():
    params = [torch.zeros(2), torch.zeros(3)]
    steps = [torch.zeros(()), torch.zeros(())]
    ((key, (bucket_params, bucket_steps)),) = bucket_tensor_lists([params, steps]).items()
    assert key == (torch.device("cpu"), (torch.float32, torch.float32))
    assert bucket_params == params and bucket_steps == steps


def test_a_plan_is_reused_until_the_sizes_or_the_chunking_change_and_moved_rows_are_uploaded():
    params = [torch.zeros(CHUNK + 1, device=DEVICE), torch.zeros(3, device=DEVICE)]
    grads = [torch.zeros_like(p) for p in params]
    plans = PlanCache()
    first = plan_in(plans, [params, grads])
    assert plan_in(plans, [params, grads]) is first
    assert (plans.builds, plans.uploads) == (1, 0)
    grads[1] = torch.zeros_like(params[1])
    assert plan_in(plans, [params, grads]) is first
    assert (plans.builds, plans.uploads) == (1, 1)
    assert first.pointers[1].tolist() == [g.data_ptr() for g in grads]
    assert first.pointers[0].tolist() == [p.data_ptr() for p in params]
    assert plan_in(plans, [params, grads], chunk_size=2 * CHUNK) is not first
    assert plans.builds == 2
    resized = [torch.zeros(CHUNK + 2, device=DEVICE), params[1]]
    assert plan_in(plans, [resized, [torch.zeros_like(resized[0]), grads[1]]]).n_chunks == 3
    assert plans.builds == 3


def test_vector_alignment_is_decided_per_tensor_and_follows_moved_rows():
    flat = torch.zeros(64, device=DEVICE)
    aligned = [flat[0:4], flat[8:20]]
    assert chunk_table([aligned]).aligned.tolist() == [1, 1]
    assert chunk_table([[flat[0:4], flat[9:20]]]).aligned.tolist() == [1, 0]
    # A tensor is aligned only when it is in every list: here its gradient is not.
    assert chunk_table([aligned, [flat[32:36], flat[41:53]]]).aligned.tolist() == [1, 0]
    plans = PlanCache()
    plan = plan_in(plans, [aligned])
    assert plan.aligned.tolist() == [1, 1]
    assert plan_in(plans, [[flat[0:4], flat[9:21]]]) is plan  # same sizes: the plan follows the move
    assert plan.aligned.tolist() == [1, 0] and plan.aligned_tensors == [1, 0]
    assert plan_in(plans, [aligned]).aligned.tolist() == [1, 1]  # and back


def test_views_into_one_buffer_step_like_separate_tensors():
    """Parameters that are views at unaligned offsets of one flat buffer (as some wrappers keep
    them) give the same bits as separate tensors."""
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(3 + CHUNK + 1 + 2 * CHUNK, generator=generator).to(DEVICE)
    views = [flat[3 : 3 + CHUNK + 1], flat[3 + CHUNK + 1 :].view(2, CHUNK)]
    separate = [v.clone() for v in views]
    grads = [torch.randn(v.shape, generator=generator).to(DEVICE) for v in views]
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01, trust_coefficient=0.01,
                 eps=1e-8, trust_clip=False, adapt=True, lr_in_momentum=False, maximize=False, grad_scale=None,
                 found_inf=None)  # fmt: skip
    for params in (views, separate):
        fused_lars(params, grads, [torch.zeros_like(p) for p in params], step_counters(params), **hyper)
    assert all(torch.equal(v, s) for v, s in zip(views, separate))


def test_layout_errors_name_the_problem():
    param = torch.zeros(4, 6, device=DEVICE)
    with pytest.raises(RuntimeError, match="dense"):
        chunk_table([[param[:, ::2]]])
    with pytest.raises(RuntimeError, match="laid out like its parameter"):
        chunk_table([[param], [torch.zeros(6, 4, device=DEVICE).t()]])
    with pytest.raises(RuntimeError, match="step counter"):
        chunk_table([[param]], [[torch.zeros((), dtype=torch.float64, device=DEVICE)]])


def test_channels_last_parameters_with_matching_states_are_accepted():
    param = torch.randn(2, 3, 4, 5, device=DEVICE).to(memory_format=torch.channels_last)
    state = torch.zeros_like(param, memory_format=torch.preserve_format)
    assert chunk_table([[param], [state]]).n_chunks == math.ceil(param.numel() / CHUNK)


@pytest.mark.parametrize(
    "field,value", [("chunk_size", 24), ("num_warps", 0), ("chunk_size", True), ("chunks_per_program", 3)]
)
def test_chunking_must_be_powers_of_two(field, value):
    kwargs = {"chunk_size": 16, "num_warps": 1, field: value}
    with pytest.raises(ValueError, match=field):
        Chunking(**kwargs)


@settings(max_examples=6, deadline=None)
@given(specs=tensor_specs(), seed=st.integers(0, 2**31 - 1), grad_scale=st.sampled_from([None, 8.0, 65536.0]))
def test_grad_norm_matches_float64_and_reruns_bit_identically(specs, seed, grad_scale):
    grads = random_tensors(specs, torch.Generator().manual_seed(seed), scale=grad_scale or 1.0)
    scale = None if grad_scale is None else torch.tensor(grad_scale, device=DEVICE)
    norm = fused_grad_norm(grads, scale)
    assert norm.dtype == torch.float32 and norm.shape == () and norm.device == grads[0].device
    expected = oracle.grad_norm([g.cpu() for g in grads], grad_scale)
    assert float(norm) == pytest.approx(expected, rel=1e-5, abs=1e-30)
    assert torch.equal(fused_grad_norm(grads, scale), norm)


def test_grad_norm_of_no_gradient_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        fused_grad_norm([])


DETERMINISM_SIZES = [(), (0,), (CHUNK,), (3 * CHUNK + 5,), (7, 9)]


def _lamb(params, grads, states, steps):
    fused_lamb(params, grads, *states[:2], steps, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
               bias_correction=True, grad_averaging=True, trust_clip=None, adapt=True, maximize=False,
               grad_clip_coef=fused_grad_norm(grads).reciprocal().clamp(max=1.0), grad_scale=None, found_inf=None)  # fmt: skip


def _lars(params, grads, states, steps):
    fused_lars(params, grads, states[0], steps, lr=0.5, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-4,
               trust_coefficient=0.001, eps=1e-8, trust_clip=False, adapt=True, lr_in_momentum=False, maximize=False,
               grad_scale=None, found_inf=None)  # fmt: skip


def _adan(params, grads, states, steps):
    fused_adan(params, grads, *states, steps, lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.02,
               no_prox=False, maximize=False, grad_clip_coef=None, grad_scale=None, found_inf=None)  # fmt: skip


@pytest.mark.parametrize("step", [_lamb, _lars, _adan], ids=["lamb", "lars", "adan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reruns_are_bit_identical(step, dtype):
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=generator).to(dtype).to(DEVICE) for s in DETERMINISM_SIZES]
        states = [[torch.zeros_like(p) for p in params] for _ in range(4)]
        steps = step_counters(params)
        for _ in range(3):
            grads = [torch.randn(s, generator=generator).to(dtype).to(DEVICE) for s in DETERMINISM_SIZES]
            step(params, grads, states, steps)
        runs.append(params + [t for state in states for t in state])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
