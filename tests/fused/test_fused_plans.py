"""Step plans across steps: owned by the optimizer, checked on every step with the same error as a
build, refused steps that change nothing, found_inf as a flag, no rebuilds or uploads in steady
state, and the optimizer-level rules of fused steps (no fused/non-fused mix, meta parameters)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _fused_cases import DEVICE, requires_kernels
from largebatch import LAMB, LARS, Adan

pytestmark = requires_kernels

OPTIMIZERS = {
    "lamb": lambda params, **kw: LAMB(params, lr=0.01, weight_decay=0.01, fused=True, **kw),
    "lamb+clip": lambda params, **kw: LAMB(params, lr=0.01, weight_decay=0.01, max_grad_norm=0.5, fused=True, **kw),
    "lars": lambda params, **kw: LARS(params, lr=0.5, momentum=0.9, fused=True, **kw),
    "adan": lambda params, **kw: Adan(params, lr=0.01, max_grad_norm=0.5, fused=True, **kw),
}
EACH_OPTIMIZER = pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
SHAPES = [(8, 8), (37,), (3, 5), ()]


def _params(seed: int = 0, shapes=SHAPES) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=generator).to(DEVICE)) for s in shapes]


def _new_grads(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(DEVICE)


def _snapshot(optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    for state in optimizer.state.values():
        tensors += [v.clone() for v in state.values()]
    return tensors


def _stepped_once(make, params=None):
    """(params, an optimizer from `make` that has taken one step on them)."""
    params = _params() if params is None else params
    optimizer = make(params)
    _new_grads(params, 1)
    optimizer.step()
    return params, optimizer


def _unchanged(before, optimizer) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, _snapshot(optimizer)))


def _plans(optimizer):
    return optimizer._fused_plan_caches


def _counts(optimizer) -> tuple[int, int]:
    return sum(c.builds for c in _plans(optimizer)), sum(c.uploads for c in _plans(optimizer))


@EACH_OPTIMIZER
def test_steady_state_rebuilds_nothing_and_uploads_only_moved_gradient_rows(make):
    params, optimizer = _stepped_once(make)
    builds, uploads = _counts(optimizer)
    assert builds == 1
    for _ in range(3):  # the same gradient tensors, accumulated into in place
        for p in params:
            p.grad.mul_(0.5)
        optimizer.step()
    assert _counts(optimizer) == (builds, uploads)
    for seed in range(3):  # fresh gradient tensors each step: one row moves
        _new_grads(params, 10 + seed)
        optimizer.step()
        assert _counts(optimizer) == (builds, uploads + seed + 1)


def test_the_plan_follows_moved_tensors_and_steps_like_a_new_optimizer():
    """Fresh gradients and reloaded states at new addresses: the reused plan's uploaded rows give
    the bits a newly built plan gives."""
    results = []
    for reuse in (True, False):
        params = _params()
        optimizer = OPTIMIZERS["adan"](params)
        for seed in range(4):
            _new_grads(params, seed)
            if not reuse:
                state = copy.deepcopy(optimizer.state_dict())
                optimizer = OPTIMIZERS["adan"](params)
                optimizer.load_state_dict(state)
            optimizer.step()
        results.append(_snapshot(optimizer))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_more_groups_than_the_old_global_cache_never_rebuild():
    groups = [{"params": _params(seed, [(5,), (3, 2)])} for seed in range(70)]
    optimizer = OPTIMIZERS["lamb+clip"](groups)
    for step in range(3):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p) if step == 0 else p.grad.mul_(0.9)
        optimizer.step()
        assert _counts(optimizer) == (70, 0)


@EACH_OPTIMIZER
def test_a_transposed_gradient_at_the_planned_address_gets_the_build_error(make):
    params, optimizer = _stepped_once(make)
    before = _snapshot(optimizer)
    square = params[0]
    square.grad = square.grad.t()  # same data_ptr, strides (1, 8)
    with pytest.raises(RuntimeError, match="laid out like its parameter") as reused:
        optimizer.step()
    assert _unchanged(before, optimizer)
    fresh = make(params)
    with pytest.raises(RuntimeError) as built:
        fresh.step()
    assert str(reused.value) == str(built.value)


@pytest.mark.parametrize("make", [OPTIMIZERS["lamb"], OPTIMIZERS["adan"]], ids=["lamb", "adan"])
def test_a_smaller_state_view_at_the_live_address_is_refused(make):
    params, optimizer = _stepped_once(make)
    state = optimizer.state[params[1]]
    whole = state["exp_avg"]
    before = _snapshot(optimizer)
    state["exp_avg"] = whole[:36]  # same address, one element short
    with pytest.raises(RuntimeError, match="laid out like its parameter"):
        optimizer.step()
    state["exp_avg"] = whole
    assert _unchanged(before, optimizer)
    optimizer.step()  # the whole tensor back: steps again
    assert float(state["step"]) == 2.0


def test_an_in_place_layout_change_of_a_state_is_seen():
    params, optimizer = _stepped_once(OPTIMIZERS["lamb"])
    optimizer.state[params[0]]["exp_avg"].t_()  # same object, same address, transposed
    with pytest.raises(RuntimeError, match="laid out like its parameter"):
        optimizer.step()


@EACH_OPTIMIZER
def test_a_refused_step_changes_no_group_and_no_counter(make):
    """The bad tensor is in the last group: the first group, checked first, must not have moved."""
    first, second = _params(0), _params(1)
    optimizer = make([{"params": first}, {"params": second}])
    _new_grads(first + second, 1)
    optimizer.step()
    before = _snapshot(optimizer)
    second[0].data = second[0].data.t().contiguous().t()  # param now column-major, its states row-major
    _new_grads(first + second, 2)
    with pytest.raises(RuntimeError, match="laid out like its parameter"):
        optimizer.step()
    after = _snapshot(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    steps = [optimizer.state[p]["step"] for p in first + second]
    assert all(float(s) == 1.0 for s in steps)


@EACH_OPTIMIZER
def test_a_float64_parameter_is_refused_at_step_before_anything_moves(make):
    params, optimizer = _stepped_once(make)
    before = _snapshot(optimizer)
    params[2].data = params[2].data.double()
    params[2].grad = params[2].grad.double()
    with pytest.raises(RuntimeError, match="dtype"):
        optimizer.step()
    assert _unchanged(before, optimizer)


@EACH_OPTIMIZER
def test_found_inf_of_two_devices_skips_the_step_and_keeps_the_counters(make):
    params, optimizer = _stepped_once(make)
    before = _snapshot(optimizer)
    optimizer.grad_scale = torch.tensor(1.0, device=DEVICE)
    optimizer.found_inf = torch.tensor(2.0, device=DEVICE)  # GradScaler's sum over two devices
    optimizer.step()
    assert _unchanged(before, optimizer)
    optimizer.found_inf = torch.tensor(0.0, device=DEVICE)
    optimizer.step()
    assert all(float(optimizer.state[p]["step"]) == 2.0 for p in params)


def test_fused_and_non_fused_groups_are_refused_together():
    with pytest.raises(ValueError, match="fused=True and fused=False/None"):
        LAMB([{"params": _params(0)}, {"params": _params(1), "fused": False}], fused=True)
    optimizer = LAMB(_params(0), fused=True)
    with pytest.raises(ValueError, match="two optimizers"):
        optimizer.add_param_group({"params": _params(1), "fused": False})
    assert len(optimizer.param_groups) == 1
    plain = LARS(_params(0), momentum=0.9)
    with pytest.raises(ValueError, match="fused=True and fused=False/None"):
        plain.add_param_group({"params": _params(1), "fused": True})
    assert len(plain.param_groups) == 1


def test_gradscaler_steps_a_fused_optimizer_of_several_groups_whole():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(DEVICE)
    decay, no_decay = list(model[0].parameters()), list(model[1].parameters())
    optimizer = LAMB([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.01, fused=True)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**4)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(5, 4, device=DEVICE)).square().sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(float(optimizer.state[p]["step"]) == 1.0 for p in model.parameters())


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan])
def test_meta_parameters_construct_and_step_after_to_empty(cls):
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    optimizer = cls(model.parameters(), lr=0.01, fused=True)
    model.weight.grad = torch.zeros_like(model.weight)
    with pytest.raises(RuntimeError, match="meta"):
        optimizer.step()
    assert not any(optimizer.state.values())  # the refused step made no state
    # Materialise in place, so the optimizer's parameter objects are the model's (plain
    # to_empty makes new Parameters, for torch's optimizers too; FSDP2 keeps its own).
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=DEVICE)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert model.weight is optimizer.param_groups[0]["params"][0]
    reference_model = nn.Linear(4, 3).to(DEVICE)
    with torch.no_grad():
        for p, r in zip(model.parameters(), reference_model.parameters()):
            p.copy_(r)
    reference = cls(reference_model.parameters(), lr=0.01, foreach=False)
    for m in (model, reference_model):
        m.zero_grad(set_to_none=True)
        m(torch.ones(2, 4, device=DEVICE)).sum().backward()
    optimizer.step()
    reference.step()
    for p, r in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, r)


def test_plans_survive_a_state_dict_round_trip_and_add_param_group():
    params, optimizer = _stepped_once(OPTIMIZERS["lamb"])
    plans = list(_plans(optimizer))
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new state tensors, same sizes
    optimizer.step()
    assert _plans(optimizer)[0] is plans[0] and _counts(optimizer)[0] == 1
    extra = _params(5, [(4,)])
    _new_grads(extra, 2)
    optimizer.add_param_group({"params": extra})
    optimizer.step()
    assert _plans(optimizer)[0] is plans[0] and _counts(optimizer)[0] == 2
    optimizer.step()
    assert _counts(optimizer)[0] == 2


def test_a_deep_copy_builds_its_own_plans_and_steps_identically():
    params, optimizer = _stepped_once(OPTIMIZERS["adan"])
    twin_params = [nn.Parameter(p.detach().clone()) for p in params]
    twin = OPTIMIZERS["adan"](twin_params)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    clone = copy.deepcopy(optimizer)
    assert "_fused_plan_caches" not in clone.__dict__
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    optimizer.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


@EACH_OPTIMIZER
def test_a_graph_that_saved_a_parameter_refuses_to_backward_after_the_fused_step(make):
    """The kernels write through raw pointers; the step bumps the version counters as torch's
    in-place ops (and its fused optimizers) do, so autograd sees the parameter changed."""
    params, optimizer = _stepped_once(make)
    loss = sum((p * p).sum() for p in params)
    loss.backward(retain_graph=True)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
