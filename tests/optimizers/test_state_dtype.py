"""The ``state_dtype`` option of LAMB, LARS and Adan: states are kept in the dtype asked for,
None is today's behaviour bit for bit, fp32 params + bf16 states track fp32 states closely,
state_dict round-trips bit-exactly and converts across options, bad values are refused.

(Per-tensor, foreach and fused against the float64 oracle: tests/fused/test_fused_state_dtype.py.)
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from largebatch import LAMB, LARS, Adan
from largebatch.optimizers._state_precision import check_state_dtype

OPTIMIZERS = {
    "LAMB": (LAMB, dict(lr=1e-3, weight_decay=0.01), ("exp_avg", "exp_avg_sq")),
    "LARS": (LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4), ("momentum_buffer",)),
    "Adan": (Adan, dict(lr=1e-3, weight_decay=0.01), ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")),
}
SHAPES = [(16, 8), (8,), (3, 2, 5)]


def _params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES]


def _train(optimizer, params, steps, seed=1):
    """`steps` steps on noisy quadratics: g = x − target + noise (targets and noise from `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=generator) for p in params]
    for _ in range(steps):
        for p, target in zip(params, targets):
            p.grad = (p.detach().float() - target + 0.5 * torch.randn(p.shape, generator=generator)).to(p.dtype)
        optimizer.step()


def _make(name, dtype, state_dtype, **extra):
    cls, hyper, keys = OPTIMIZERS[name]
    params = _params(dtype)
    return cls(params, **hyper, state_dtype=state_dtype, **extra), params, keys


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize(
    "dtype, state_dtype, expected",
    [
        (torch.float32, None, torch.float32),
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.float32, "bfloat16", torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.bfloat16, "fp32", torch.float32),
    ],
)
def test_states_have_the_dtype_asked_for(name, foreach, dtype, state_dtype, expected):
    optimizer, params, keys = _make(name, dtype, state_dtype, foreach=foreach)
    _train(optimizer, params, 2)
    for p in params:
        state = optimizer.state[p]
        assert p.dtype == dtype
        assert {key: state[key].dtype for key in keys} == {key: expected for key in keys}
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 2
    assert all(group["state_dtype"] in (None, expected) for group in optimizer.param_groups)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
def test_states_of_the_params_dtype_change_nothing(name, dtype, foreach):
    """state_dtype equal to the parameters' dtype is the default (None), bit for bit."""
    results = []
    for state_dtype in (None, dtype):
        optimizer, params, _ = _make(name, dtype, state_dtype, foreach=foreach)
        _train(optimizer, params, 4)
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _relative_drift(name, dtype, state_dtype, steps, foreach=False, **extra):
    reference, ref_params, _ = _make(name, torch.float32, None, foreach=foreach)
    optimizer, params, _ = _make(name, dtype, state_dtype, foreach=foreach, **extra)
    start = [p.detach().double().clone() for p in ref_params]
    _train(reference, ref_params, steps)
    _train(optimizer, params, steps)
    displacement = sum(float(((r.detach().double() - s) ** 2).sum()) for r, s in zip(ref_params, start)) ** 0.5
    error = sum(float(((p.detach().double() - r.detach().double()) ** 2).sum()) for p, r in zip(params, ref_params)) ** 0.5
    return error / displacement


@pytest.mark.parametrize("name, bound", [("LAMB", 0.02), ("LARS", 0.005), ("Adan", 0.02)])
def test_bf16_states_track_fp32_states(name, bound):
    """fp32 params + bf16 states stay within `bound` of the fp32-states run, relative to how far
    it moved, over 300 steps (measured: LAMB 0.36 %, LARS 0.09 %, Adan 0.53 %; README, "Memory");
    plain bf16 parameters (which need compensated updates, not fp32 states) drift 170× and more
    on the same problem, so the bound says something."""
    drift = _relative_drift(name, torch.float32, torch.bfloat16, 300)
    assert 0 < drift <= bound
    assert _relative_drift(name, torch.bfloat16, None, 300, kahan_sum=False) > 20 * drift


def _continued(optimizer, params, steps=2):
    _train(optimizer, params, steps, seed=7)
    return [p.detach().clone() for p in params]


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize(
    "dtype, state_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, None)]
)
def test_state_dict_round_trips_bit_exactly(name, dtype, state_dtype):
    optimizer, params, keys = _make(name, dtype, state_dtype)
    _train(optimizer, params, 3)
    saved = _roundtrip(optimizer.state_dict())
    restored, restored_params, _ = _make(name, dtype, state_dtype)
    with torch.no_grad():
        for p, q in zip(restored_params, params):
            p.copy_(q)
    restored.load_state_dict(saved)
    for p, q in zip(params, restored_params):
        for key in keys:
            a, b = optimizer.state[p][key], restored.state[q][key]
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(_continued(optimizer, params), _continued(restored, restored_params)))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("saved_dtype, live_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                     (None, torch.bfloat16), (torch.bfloat16, None)])  # fmt: skip
def test_loading_converts_to_this_optimizers_option(name, saved_dtype, live_dtype):
    saver, params, keys = _make(name, torch.float32, saved_dtype)
    _train(saver, params, 3)
    saved = _roundtrip(saver.state_dict())
    loader, loader_params, _ = _make(name, torch.float32, live_dtype)
    loader.load_state_dict(saved)
    expected = live_dtype or torch.float32
    for p, q in zip(params, loader_params):
        for key in keys:
            loaded = loader.state[q][key]
            assert loaded.dtype == expected
            assert torch.equal(loaded, saver.state[p][key].to(expected))
    assert [g["state_dtype"] for g in loader.param_groups] == [live_dtype]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoints_from_before_the_option_load_and_convert(name):
    saver, _, keys = _make(name, torch.float32, None)
    _train(saver, saver.param_groups[0]["params"], 2)
    saved = saver.state_dict()
    for group in saved["param_groups"]:
        del group["state_dtype"]
    loader, loader_params, _ = _make(name, torch.float32, torch.bfloat16)
    loader.load_state_dict(saved)
    assert all(loader.state[p][key].dtype == torch.bfloat16 for p in loader_params for key in keys)

    # An optimizer pickled before the option existed gets the default.
    state = saver.__getstate__()
    for group in state["param_groups"]:
        del group["state_dtype"]
    unpickled = pickle.loads(pickle.dumps(saver))
    unpickled.__setstate__(state)
    assert [g["state_dtype"] for g in unpickled.param_groups] == [None]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad", [torch.float16, torch.float64, torch.int8, "fp8", "half", 16, True])
def test_bad_state_dtype_is_refused(name, bad):
    cls, hyper, _ = OPTIMIZERS[name]
    with pytest.raises(ValueError, match="state_dtype"):
        cls(_params(torch.float32), **hyper, state_dtype=bad)
    optimizer = cls(_params(torch.float32), **hyper)
    with pytest.raises(ValueError, match="state_dtype"):
        optimizer.add_param_group({"params": _params(torch.float32, seed=3), "state_dtype": bad})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_refused_load_changes_nothing(name):
    optimizer, params, keys = _make(name, torch.float32, torch.bfloat16)
    _train(optimizer, params, 2)
    before = {key: [optimizer.state[p][key].clone() for p in params] for key in keys}
    saver, _, _ = _make(name, torch.float32, None)
    _train(saver, saver.param_groups[0]["params"], 1)
    broken = saver.state_dict()
    broken["state"][len(params) - 1][keys[0]] = torch.zeros(2)  # the wrong shape
    with pytest.raises(ValueError, match="shape"):
        optimizer.load_state_dict(broken)
    for key in keys:
        assert all(torch.equal(optimizer.state[p][key], b) and b.dtype == torch.bfloat16 for p, b in zip(params, before[key]))


#: The dtypes of the first group's states in the test below ("8bit": codes, and Adan's bf16 g_prev).
FIRST_GROUP_DTYPES = {"bf16": {torch.bfloat16}, "8bit": {torch.int8, torch.uint8, torch.bfloat16}}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("option", list(FIRST_GROUP_DTYPES))
def test_the_option_is_per_group_and_a_refused_step_creates_no_state(name, option):
    cls, hyper, keys = OPTIMIZERS[name]
    first, second = _params(torch.float32), _params(torch.float32, seed=5)
    optimizer = cls([{"params": first, "state_dtype": option}, {"params": second}], **hyper)
    for p in first + second:
        p.grad = torch.ones_like(p)
    second[0].grad = torch.ones_like(second[0]).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert not optimizer.state
    second[0].grad = torch.ones_like(second[0])
    optimizer.step()
    assert all(optimizer.state[p][key].dtype in FIRST_GROUP_DTYPES[option] for p in first for key in keys)
    assert all(optimizer.state[p][key].dtype == torch.float32 for p in second for key in keys)
    assert [g["state_dtype"] for g in optimizer.param_groups] == [check_state_dtype(option), None]
