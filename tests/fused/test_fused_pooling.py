"""A fused group's states are pooled (each key's tensors views of one aligned buffer), so its step
plan checks each state list with one version read; pooling changes no value and no check."""

import pytest
import torch

from largebatch import LAMB, LARS, Adan
from largebatch.fused import Chunking, chunking

SHAPES = [(), (7,), (0,), (5, 3), (40,)]
OPTIMIZERS = {
    "LAMB": (LAMB, {"lr": 0.1, "weight_decay": 0.01}),
    "LARS": (LARS, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
    "Adan": (Adan, {"lr": 0.01, "weight_decay": 0.02}),
}


def _run(name, fused, steps=3, params=None, optimizer=None):
    cls, hyper = OPTIMIZERS[name]
    if params is None:
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in SHAPES]
    if optimizer is None:
        optimizer = cls(params, **hyper, fused=fused, foreach=None if fused else False)
    generator = torch.Generator().manual_seed(len(optimizer.state))
    with chunking(Chunking(chunk_size=16, num_warps=1)):
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
    return params, optimizer


def _assert_pooled(optimizer, params):
    for key in optimizer.state[params[0]]:
        tensors = [optimizer.state[p][key] for p in params]
        base = tensors[0]._base
        assert base is not None and all(t._base is base for t in tensors), key
        assert all(t.data_ptr() % 16 == 0 for t in tensors), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_states_are_pooled_and_step_like_the_reference(name):
    fused_params, fused = _run(name, fused=True)
    reference_params, reference = _run(name, fused=False)
    _assert_pooled(fused, fused_params)
    key = "exp_avg" if name != "LARS" else "momentum_buffer"
    assert all(reference.state[p][key]._base is None for p in reference_params)  # not fused: not pooled
    for a, b in zip(fused_params, reference_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (plans,) = fused._fused_plan_caches
    assert all(plan._pooled_bases is not None for plan in plans._plans.values())  # one read per list


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_loaded_state_is_pooled_again_and_continues_identically(name):
    params, optimizer = _run(name, fused=True)
    saved = optimizer.state_dict()
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = OPTIMIZERS[name][0](twin_params, **OPTIMIZERS[name][1], fused=True)
    twin.load_state_dict(saved)
    _assert_pooled(twin, twin_params)
    _run(name, fused=True, params=params, optimizer=optimizer)
    _run(name, fused=True, params=twin_params, optimizer=twin)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_in_place_layout_change_of_one_pooled_state_is_refused(name):
    params, optimizer = _run(name, fused=True, steps=1)
    key = "exp_avg" if name != "LARS" else "momentum_buffer"
    square = next(p for p in params if p.dim() == 2)
    optimizer.state[square][key].t_()  # (5, 3) -> (3, 5): the view's shape changes, the buffer's version too
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="laid out like its parameter"):
        _run(name, fused=True, steps=1, params=params, optimizer=optimizer)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
