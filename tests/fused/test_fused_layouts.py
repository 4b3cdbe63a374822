"""The kernels' table layout: vector alignment decided per tensor, several chunks per program,
bias corrections from the per-tensor count pass at large step counts.

Oracles: the per-tensor reference (largebatch.optimizers.functional, foreach=False), and the
fused step itself on separate, aligned copies of the same tensors, which must give the same bits
whatever the alignment and however many chunks a program walks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _fused_cases import DEVICE, TEST_CHUNKING, requires_kernels
from largebatch.fused import Chunking, chunking
from largebatch.fused._plan import StepPlan
from largebatch.optimizers.functional import adan, lamb, lars

pytestmark = requires_kernels

CHUNK = TEST_CHUNKING.chunk_size
SIZES = [(), (0,), (5,), (CHUNK,), (2 * CHUNK + 3,), (3, CHUNK + 1)]


def _lamb(params, grads, states, steps, fused):
    lamb(params, grads, *states[:2], steps, fused=fused, foreach=False, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6,
         weight_decay=0.01, bias_correction=True, grad_averaging=True, trust_clip=None, adapt=True, maximize=False,
         grad_clip_coef=torch.tensor(0.5, device=DEVICE))  # fmt: skip


def _lars(params, grads, states, steps, fused):
    lars(params, grads, states[0], steps, fused=fused, foreach=False, lr=0.5, momentum=0.9, dampening=0.0,
         nesterov=True, weight_decay=1e-4, trust_coefficient=0.01, eps=1e-8, trust_clip=False, adapt=True,
         lr_in_momentum=False, maximize=False)  # fmt: skip


def _adan(params, grads, states, steps, fused):
    adan(params, grads, *states, steps, fused=fused, foreach=False, lr=0.01, beta1=0.98, beta2=0.92, beta3=0.99,
         eps=1e-8, weight_decay=0.02, no_prox=False, maximize=False, grad_clip_coef=None)  # fmt: skip


STEPPERS = pytest.mark.parametrize("step", [_lamb, _lars, _adan], ids=["lamb", "lars", "adan"])


def _misaligned_copies(tensors, offsets):
    """Copies of `tensors` as views of one flat buffer, tensor i starting `offsets[i]` fp32
    elements past a 16-byte boundary (0: aligned, 1-3: not), so that aligned and misaligned
    tensors sit side by side in one list."""
    starts, position = [], 0
    for tensor, offset in zip(tensors, offsets):
        position += -position % 4 + offset  # the next 16-byte boundary, then the offset
        starts.append(position)
        position += tensor.numel()
    flat = torch.zeros(position + 4, device=DEVICE)
    views = [flat[start : start + t.numel()].view(t.shape) for t, start in zip(tensors, starts)]
    for view, tensor in zip(views, tensors):
        view.copy_(tensor)
    return views


def _run(step, params, grads_per_step, n_states, steps_from=0.0, fused=True, misaligned=None):
    params = [p.clone() for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(n_states)]
    steps = [torch.full((), steps_from, device=DEVICE) for _ in params]
    if misaligned is not None:
        params = _misaligned_copies(params, misaligned)
        states = [_misaligned_copies(state, misaligned[::-1]) for state in states]
    for grads in grads_per_step:
        if misaligned is not None:
            grads = _misaligned_copies(grads, misaligned)
        step(params, grads, states, steps, fused)
    return params + [t for state in states for t in state] + steps


N_STATES = {_lamb: 2, _lars: 1, _adan: 4}


@STEPPERS
@settings(max_examples=3, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    misaligned=st.lists(st.integers(0, 3), min_size=len(SIZES), max_size=len(SIZES)),
    chunks_per_program=st.sampled_from([1, 2, 8]),
)
def test_misaligned_and_aligned_tensors_side_by_side_step_like_aligned_copies(step, seed, misaligned, chunks_per_program):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator).to(DEVICE) for s in SIZES]
    grads = [[torch.randn(s, generator=generator).to(DEVICE) for s in SIZES] for _ in range(3)]
    n_states = N_STATES[step]
    with chunking(Chunking(CHUNK, 1, chunks_per_program)):
        mixed = _run(step, params, grads, n_states, misaligned=misaligned)
    aligned = _run(step, params, grads, n_states)  # separate tensors, two chunks per program
    assert all(torch.equal(a, b) for a, b in zip(mixed, aligned))
    reference = _run(step, params, grads, n_states, fused=False)
    for a, e in zip(aligned, reference):
        if e.numel():
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def test_the_table_marks_exactly_the_misaligned_tensors():
    tensors = [torch.zeros(s, device=DEVICE) for s in SIZES]
    offsets = [0, 1, 0, 2, 3, 0]
    views = _misaligned_copies(tensors, offsets)
    plan = StepPlan([views, [t.clone() for t in tensors]], n_elementwise=2, n_table=2, owned_from=2, chunk_size=CHUNK)
    expected = [int(v.data_ptr() % 16 == 0) for v in views]  # an empty view's follows its address too
    assert plan.aligned.tolist() == expected
    assert expected[2:] == [1, 0, 0, 1]


@pytest.mark.parametrize("chunks_per_program", [1, 4, 64])
def test_every_chunk_is_walked_once_however_many_a_program_takes(chunks_per_program):
    """Σ g² over the chunks (each chunk's partial written by exactly one program), with programs
    that walk past the end of the table."""
    from largebatch.fused._norms import grad_squares

    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=generator).to(DEVICE) for s in [*SIZES, (7 * CHUNK + 1,)]]
    plan = StepPlan([grads], n_elementwise=1, n_table=1, owned_from=1, chunk_size=CHUNK)
    with chunking(Chunking(CHUNK, 1, chunks_per_program)):
        squares = grad_squares(plan, plan.pointers[0], torch.float32, None)
    expected = torch.stack([g.double().square().sum() for g in grads])
    torch.testing.assert_close(squares.reshape(-1).double(), expected, rtol=1e-6, atol=0.0)


@STEPPERS
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps_from=st.sampled_from([999.0, 2.0**20, 2.0**24 - 8]))
def test_bias_corrections_at_large_step_counts_match_the_reference(step, seed, steps_from):
    """Counters far along (β^t from 0.999^1000 ≈ 0.37 down to 0): the count pass's float64
    corrections == the reference's, and the counters advance exactly (fp32 counts every integer
    up to 2^24)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator).to(DEVICE) for s in SIZES]
    grads = [[torch.randn(s, generator=generator).to(DEVICE) for s in SIZES] for _ in range(2)]
    n_states = N_STATES[step]
    fused = _run(step, params, grads, n_states, steps_from=steps_from)
    reference = _run(step, params, grads, n_states, steps_from=steps_from, fused=False)
    for a, e in zip(fused, reference):
        if e.numel():
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
    assert [float(s) for s in fused[-len(SIZES) :]] == [steps_from + 2] * len(SIZES)
