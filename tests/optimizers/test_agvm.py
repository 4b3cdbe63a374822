"""AGVM: the factors against a float64 transcription of the paper's formulas, the wrapper's
contract (base step untouched before start_step, lr restored, state_dict, GradScaler,
LRScheduler, groups helper), and DDP with two gloo processes against hand computation."""

import copy
import datetime
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch.optimizers.adan import Adan
from largebatch.optimizers.agvm import (
    AGVM,
    AGVMCommState,
    agvm_comm_hook,
    agvm_param_groups,
)
from largebatch.optimizers.lamb import LAMB

# --- the oracle: the paper's / official hook's formulas, float64, written out plainly ----------


def oracle_disagreement(halves_a, halves_b, denominators=None):
    """d = 1 - cos(g_A, g_B) over one module's flattened parameters."""
    a = np.concatenate([np.asarray(h, dtype=np.float64).ravel() for h in halves_a])
    b = np.concatenate([np.asarray(h, dtype=np.float64).ravel() for h in halves_b])
    if denominators is not None:
        denom = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in denominators])
        a, b = a / denom, b / denom
    cosine = a @ b / max(np.sqrt(a @ a) * np.sqrt(b @ b), 1e-8)
    return 1.0 - cosine


def oracle_adam_denominator(v, g, beta2, eps):
    """sqrt(β2 v + (1-β2) g²) + eps with g the step's mean gradient."""
    v, g = np.asarray(v, dtype=np.float64), np.asarray(g, dtype=np.float64)
    return np.sqrt(beta2 * v + (1 - beta2) * g * g) + eps


def oracle_scale_update(scale, disagreements, reference, momentum, low=0.5, high=10.0, eps=1e-6):
    """s_i <- μ s_i + (1-μ) sqrt(clamp((d_ref + 1e-6)/(d_i + 1e-6), low, high))."""
    new = []
    for s, d in zip(scale, disagreements):
        ratio = (disagreements[reference] + eps) / (d + eps)
        r = math.sqrt(min(max(ratio, low), high))
        new.append(momentum * s + (1 - momentum) * r)
    return new


# --- helpers ----------------------------------------------------------------------------------


def make_modules(shapes_per_module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes] for shapes in shapes_per_module]


def linear_loss(params, grads):
    """A loss whose gradient w.r.t. params is exactly grads."""
    return lambda: sum((p * g).sum() for p, g in zip(params, grads))


def correlated_halves(shapes, correlation, gen):
    """(g_A, g_B) lists for one module: g_B = c g_A + (1-c) noise, so d spans (0, 2)."""
    a = [torch.randn(s, generator=gen) for s in shapes]
    b = [correlation * x + (1 - correlation) * torch.randn(s, generator=gen) for x, s in zip(a, shapes)]
    return a, b


module_shapes = st.lists(
    st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple), min_size=1, max_size=2),
    min_size=1,
    max_size=4,
)


# --- the formulas -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    shapes=module_shapes,
    seed=st.integers(0, 2**16),
    correlations=st.lists(st.floats(0.0, 0.9), min_size=4, max_size=4),
    momentum=st.floats(0.0, 0.97),
    low=st.floats(0.1, 1.0),
    high_over_low=st.floats(1.0, 30.0),
    reference_pick=st.integers(0, 3),
    steps=st.integers(1, 3),
)
def test_factors_match_formulas_for_sgd(shapes, seed, correlations, momentum, low, high_over_low, reference_pick, steps):
    modules = make_modules(shapes, seed)
    reference = reference_pick % len(modules)
    clamp = (low, low * high_over_low)
    base = torch.optim.SGD([{"params": ps} for ps in modules], lr=0.01)
    agvm = AGVM(base, interval=1, start_step=0, momentum=momentum, clamp=clamp, reference=reference)
    assert not agvm.use_adam
    gen = torch.Generator().manual_seed(seed + 1)
    expected = [1.0] * len(modules)
    for _ in range(steps):
        pairs = [correlated_halves(shapes[i], correlations[i], gen) for i in range(len(modules))]
        flat_params = [p for ps in modules for p in ps]
        agvm.zero_grad()
        agvm.backward_halves(
            linear_loss(flat_params, [g for a, _ in pairs for g in a]),
            linear_loss(flat_params, [g for _, b in pairs for g in b]),
        )
        d = [oracle_disagreement([x.numpy() for x in a], [x.numpy() for x in b]) for a, b in pairs]
        expected = oracle_scale_update(expected, d, reference, momentum, *clamp)
        agvm.step()
    # both sides work in float64 on the same float32 halves
    np.testing.assert_allclose(agvm.scale_factors.numpy(), expected, rtol=1e-9)


ADAM_FAMILY = {
    # name: (factory, the β of exp_avg_sq written out here, eps)
    "adamw": (lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-3), 0.99, 1e-3),
    "lamb": (lambda groups: LAMB(groups, lr=1e-2, betas=(0.8, 0.97), eps=1e-3), 0.97, 1e-3),
    # Adan's betas are (moment, gradient difference, second moment): the normaliser uses β3.
    "adan": (lambda groups: Adan(groups, lr=1e-2, betas=(0.98, 0.92, 0.95), eps=1e-3), 0.95, 1e-3),
}


@pytest.mark.parametrize("name", sorted(ADAM_FAMILY))
@settings(max_examples=10, deadline=None)
@given(
    shapes=module_shapes,
    seed=st.integers(0, 2**16),
    correlations=st.lists(st.floats(0.0, 0.9), min_size=4, max_size=4),
    warm_steps=st.integers(0, 2),
)
def test_factors_match_formulas_for_adam_family(name, shapes, seed, correlations, warm_steps):
    factory, beta2, eps = ADAM_FAMILY[name]
    modules = make_modules(shapes, seed)
    momentum = 0.5
    agvm = AGVM(factory([{"params": ps} for ps in modules]), interval=1, start_step=warm_steps, momentum=momentum)
    assert agvm.use_adam
    flat_params = [p for ps in modules for p in ps]
    gen = torch.Generator().manual_seed(seed + 1)
    expected = [1.0] * len(modules)
    for step in range(warm_steps + 2):
        pairs = [correlated_halves(shapes[i], correlations[i], gen) for i in range(len(modules))]
        agvm.zero_grad()
        agvm.backward_halves(
            linear_loss(flat_params, [g for a, _ in pairs for g in a]),
            linear_loss(flat_params, [g for _, b in pairs for g in b]),
        )
        if step >= warm_steps:
            d = []
            for ps, (a, b) in zip(modules, pairs):
                # v as the base holds it before this step (zero before its first step)
                vs = [agvm.state[p]["exp_avg_sq"].numpy() if agvm.state.get(p) else np.zeros(p.shape) for p in ps]
                means = [(x.double() + y.double()).numpy() / 2 for x, y in zip(a, b)]
                denominators = [oracle_adam_denominator(v, g, beta2, eps) for v, g in zip(vs, means)]
                d.append(oracle_disagreement([x.numpy() for x in a], [y.numpy() for y in b], denominators))
            expected = oracle_scale_update(expected, d, 0, momentum)
        agvm.step()
    np.testing.assert_allclose(agvm.scale_factors.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_adan_normaliser_reads_the_third_beta():
    shapes = [[(6,)], [(4,)]]
    modules = make_modules(shapes, seed=7)
    betas = (0.98, 0.5, 0.99)  # β2 (gradient difference) far from β3 (second moment)
    agvm = AGVM(Adan([{"params": ps} for ps in modules], lr=1e-2, betas=betas, eps=1e-8), interval=1, start_step=3)
    params = [ps[0] for ps in modules]
    gen = torch.Generator().manual_seed(8)
    for _ in range(4):
        pairs = [correlated_halves(shapes[i], 0.3, gen) for i in range(2)]
        vs = [agvm.state[p]["exp_avg_sq"].numpy().copy() if agvm.state.get(p) else None for p in params]
        agvm.zero_grad()
        agvm.backward_halves(linear_loss(params, [a[0] for a, _ in pairs]), linear_loss(params, [b[0] for _, b in pairs]))
        agvm.step()

    def expected_with(beta):
        d = []
        for v, (a, b) in zip(vs, pairs):
            g = (a[0].double() + b[0].double()).numpy() / 2
            d.append(oracle_disagreement([a[0].numpy()], [b[0].numpy()], [oracle_adam_denominator(v, g, beta, 1e-8)]))
        return oracle_scale_update([1.0, 1.0], d, 0, 0.97)

    np.testing.assert_allclose(agvm.scale_factors.numpy(), expected_with(betas[2]), rtol=1e-6)
    assert abs(expected_with(betas[1])[1] - expected_with(betas[2])[1]) > 1e-4  # the check can tell them apart


def _one_measuring_step(halves_per_module, momentum=0.9):
    modules = make_modules([[h[0].shape] for h in halves_per_module])
    agvm = AGVM(torch.optim.SGD([{"params": ps} for ps in modules], lr=0.1), interval=1, start_step=0, momentum=momentum)
    params = [ps[0] for ps in modules]
    agvm.backward_halves(
        linear_loss(params, [a for a, _ in halves_per_module]), linear_loss(params, [b for _, b in halves_per_module])
    )
    agvm.step()
    return agvm.scale_factors.tolist()


def test_identical_halves_give_zero_disagreement_and_the_upper_clamp():
    gen = torch.Generator().manual_seed(3)
    noisy = (torch.randn(7, generator=gen), torch.randn(7, generator=gen))
    same = torch.randn(5, generator=gen)
    scale = _one_measuring_step([noisy, (same, same.clone())], momentum=0.9)
    # d = 0 for module 1: (d_ref + 1e-6) / 1e-6 is far above 10, so r = sqrt(10)
    assert scale == pytest.approx([1.0, 0.9 + 0.1 * math.sqrt(10.0)], rel=1e-12)


def test_identical_halves_on_the_reference_give_the_lower_clamp():
    gen = torch.Generator().manual_seed(4)
    same = torch.randn(5, generator=gen)
    noisy = (torch.randn(7, generator=gen), torch.randn(7, generator=gen))
    scale = _one_measuring_step([(same, same.clone()), noisy], momentum=0.9)
    assert scale == pytest.approx([1.0, 0.9 + 0.1 * math.sqrt(0.5)], rel=1e-12)


# --- the wrapper's step -----------------------------------------------------------------------


def _loaded_factors(agvm, factors):
    state = agvm.state_dict()
    for group, module in zip(state["param_groups"], agvm._group_modules):
        group["agvm_scale_factor"] = factors[module]
    agvm.load_state_dict(state)


def test_lr_scaled_during_the_step_and_restored_exactly():
    modules = make_modules([[(3,)], [(2, 2)], [(4,)]])
    lrs = [0.1, 0.3, torch.tensor(0.7)]
    base = torch.optim.SGD([{"params": ps, "lr": lr} for ps, lr in zip(modules, lrs)], lr=1.0)
    agvm = AGVM(base, static=True, start_step=0)
    factors = [1.0, 0.8123, 2.9]
    _loaded_factors(agvm, factors)
    before = [group["lr"] for group in agvm.param_groups]  # the loaded groups' own objects
    seen = []
    agvm.base_optimizer.register_step_pre_hook(lambda opt, a, k: seen.append([float(g["lr"]) for g in opt.param_groups]))
    for p in (p for ps in modules for p in ps):
        p.grad = torch.ones_like(p)
    agvm.step()
    assert seen == [pytest.approx([float(lr) * s for lr, s in zip(lrs, factors)], rel=1e-7)]
    assert all(group["lr"] is lr for group, lr in zip(agvm.param_groups, before))
    assert [float(lr) for lr in before] == [float(lr) for lr in lrs]


BASES = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
    "lamb": lambda groups: LAMB(groups, lr=1e-2),
    "adan": lambda groups: Adan(groups, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(BASES))
@pytest.mark.parametrize("wrapper_options", [{"start_step": 100}, {"start_step": 0, "static": True}])
def test_all_factors_one_gives_the_base_step_exactly(name, wrapper_options):
    shapes = [[(4, 3), (3,)], [(2, 3)]]
    plain_params, wrapped_params = make_modules(shapes), make_modules(shapes)
    plain = BASES[name]([{"params": ps} for ps in plain_params])
    wrapped = AGVM(BASES[name]([{"params": ps} for ps in wrapped_params]), **wrapper_options)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        for p, q in zip(sum(plain_params, []), sum(wrapped_params, [])):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        plain.step()
        wrapped.step()
    for p, q in zip(sum(plain_params, []), sum(wrapped_params, [])):
        assert torch.equal(p, q)
    assert wrapped.num_steps == 4


def test_factors_act_from_start_step_on_and_freeze_after_stop_step():
    modules = make_modules([[(3,)], [(2,)]])
    base = torch.optim.SGD([{"params": ps} for ps in modules], lr=0.5)
    agvm = AGVM(base, start_step=2, stop_step=3, interval=1)
    seen = []
    base.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[1]["lr"]))
    ref, other = (ps[0] for ps in modules)
    for step in range(6):
        agvm.zero_grad()
        loss_a = lambda: (ref * torch.tensor([1.0, 2, 3])).sum() + (other * torch.tensor([1.0, 1])).sum()  # noqa: E731
        loss_b = lambda: ref.sum() + (other * torch.tensor([1.0, -1])).sum()  # noqa: E731
        agvm.backward_halves(loss_a, loss_b)
        agvm.step()
    factor = agvm.scale_factors[1].item()
    assert factor != 1.0
    assert seen[:2] == [0.5, 0.5] and seen[3] == seen[4] == seen[5] == 0.5 * factor != seen[2]


def test_measuring_steps_follow_start_and_interval():
    (params,) = make_modules([[(3,)]])
    agvm = AGVM(torch.optim.SGD(params, lr=0.1), start_step=3, interval=4, stop_step=12)
    measured = []
    for step in range(16):
        measured.append(agvm.measures_next_step)
        if agvm.measures_next_step:
            agvm.backward_halves(lambda: params[0].sum(), lambda: (2 * params[0]).sum())
        agvm.step()
    assert [k for k, m in enumerate(measured) if m] == [3, 7, 11]


def test_measuring_step_without_halves_raises():
    (params,) = make_modules([[(3,)]])
    agvm = AGVM(torch.optim.SGD(params, lr=0.1), start_step=0)
    params[0].sum().backward()
    with pytest.raises(RuntimeError, match="backward_halves"):
        agvm.step()


def test_module_without_gradient_keeps_its_factor_and_reference_without_one_raises():
    modules = make_modules([[(3,)], [(3,)], [(2,)]])
    agvm = AGVM(torch.optim.SGD([{"params": ps} for ps in modules], lr=0.1), start_step=0, interval=1, momentum=0.5)
    _loaded_factors(agvm, [1.0, 1.0, 1.7])
    ref, other, unused = (ps[0] for ps in modules)
    agvm.backward_halves(lambda: (ref * torch.tensor([1.0, 2, 3])).sum() + other.sum(), lambda: (ref + 3 * other).sum())
    agvm.step()
    assert agvm.scale_factors[2].item() == 1.7
    assert unused.grad is None
    agvm.zero_grad()
    agvm.backward_halves(lambda: other.sum(), lambda: (2 * other).sum())
    with pytest.raises(RuntimeError, match="reference module"):
        agvm.step()


def test_backward_halves_accumulates_the_mean_gradient():
    (params,) = make_modules([[(3,), (2,)]])
    w, unused = params
    agvm = AGVM(torch.optim.SGD(params, lr=0.1))
    w.grad = torch.tensor([1.0, 1.0, 1.0])
    losses = agvm.backward_halves(lambda: (w * torch.tensor([2.0, 4, 6])).sum(), lambda: (w * 4).sum())
    assert torch.equal(w.grad, torch.tensor([4.0, 5.0, 6.0]))  # 1 + (a + b) / 2
    assert unused.grad is None
    assert torch.equal(losses[0], (w * torch.tensor([2.0, 4, 6])).sum().detach())


# --- checkpoints, schedulers, GradScaler --------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.cls = nn.Linear(8, 3)
        self.reg = nn.Linear(8, 1)

    def forward(self, x):
        f = self.backbone(x)
        return self.cls(f), self.reg(f).squeeze(1)

    def loss(self, x, y, t):
        return two_head_loss(self(x), y, t)


def two_head_loss(outputs, y, t):
    logits, value = outputs
    return nn.functional.cross_entropy(logits, y) + 4.0 * nn.functional.mse_loss(value, t)


def batch(step, half):
    gen = torch.Generator().manual_seed(1000 * step + half)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen), torch.randn(16, generator=gen)


def train(model, agvm, steps, first_step=0, scaler=None):
    history = []
    for step in range(first_step, first_step + steps):
        agvm.zero_grad()
        scale = scaler.scale if scaler is not None else (lambda loss: loss)
        agvm.backward_halves(lambda: scale(model.loss(*batch(step, 0))), lambda: scale(model.loss(*batch(step, 1))))
        if scaler is None:
            agvm.step()
        else:
            scaler.step(agvm)
            scaler.update()
        history.append(agvm.scale_factors.tolist())
    return history


def make_run(seed=0, **options):
    torch.manual_seed(seed)
    model = TwoHeads()
    base = torch.optim.AdamW(agvm_param_groups(model, weight_decay=0.01), lr=3e-2)
    options = {"interval": 2, "start_step": 1, "momentum": 0.8} | options
    return model, AGVM(base, **options)


def test_state_dict_round_trip_mid_run_continues_identically():
    model, agvm = make_run()
    train(model, agvm, 5)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(agvm.state_dict())
    assert [g["agvm_num_steps"] for g in saved_optimizer["param_groups"]] == [5] * 6
    continued = train(model, agvm, 6, first_step=5)

    resumed_model, resumed = make_run(seed=123)
    resumed_model.load_state_dict(saved_model)
    resumed.load_state_dict(saved_optimizer)
    saved_factors = [g["agvm_scale_factor"] for g in saved_optimizer["param_groups"][::2]]  # two groups a module
    assert resumed.scale_factors.tolist() == saved_factors != [1.0, 1.0, 1.0]
    assert resumed.num_steps == 5
    assert train(resumed_model, resumed, 6, first_step=5) == continued
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_with_other_modules_raises():
    _, agvm = make_run()
    state = agvm.state_dict()
    state["param_groups"][2]["agvm_module"] = "reg"
    with pytest.raises(ValueError, match=r"module 'reg', in this AGVM to module 'cls'"):
        agvm.load_state_dict(state)


def _legacy_state_dict(state):
    """The checkpoint layout of earlier versions: AGVM's state in a top-level "agvm" entry."""
    legacy = copy.deepcopy(state)
    first_groups = {}
    for group in legacy["param_groups"]:
        first_groups.setdefault(group["agvm_module"], group)
    legacy["agvm"] = {
        "module_names": list(first_groups),
        "scale_factors": [group["agvm_scale_factor"] for group in first_groups.values()],
        "num_steps": legacy["param_groups"][0]["agvm_num_steps"],
    }
    for group in legacy["param_groups"]:
        del group["agvm_scale_factor"], group["agvm_num_steps"]
    return legacy


def test_a_checkpoint_of_the_earlier_layout_loads_and_continues():
    model, agvm = make_run()
    train(model, agvm, 5)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), _legacy_state_dict(agvm.state_dict())
    continued = train(model, agvm, 4, first_step=5)
    resumed_model, resumed = make_run(seed=7)
    resumed_model.load_state_dict(saved_model)
    resumed.load_state_dict(saved_optimizer)
    assert resumed.num_steps == 5
    assert train(resumed_model, resumed, 4, first_step=5) == continued


def _assert_same_state(got, want):
    assert got.keys() == want.keys()
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, entries in want["state"].items():
        assert got["state"][index].keys() == entries.keys()
        for key, value in entries.items():
            assert torch.equal(got["state"][index][key], value)


def _set_group_entry(key, value, groups=None):
    def edit(state):
        for i, group in enumerate(state["param_groups"]):
            if groups is None or i in groups:
                group[key] = value
    return edit


def _set_legacy_entry(key, value):
    def edit(state):
        legacy = _legacy_state_dict(state)
        legacy["agvm"][key] = value
        state.clear()
        state.update(legacy)
    return edit


def _drop_group(state):
    state["param_groups"].pop()


def _drop_key(key):
    def edit(state):
        del state["param_groups"][1][key]
    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set_group_entry("agvm_scale_factor", math.nan), "agvm_scale_factor.*finite number > 0, got nan"),
        (_set_group_entry("agvm_scale_factor", -2.0), "agvm_scale_factor.*> 0, got -2.0"),
        (_set_group_entry("agvm_scale_factor", 0.0), "agvm_scale_factor.*> 0, got 0.0"),
        (_set_group_entry("agvm_scale_factor", math.inf), "agvm_scale_factor.*finite"),
        (_set_group_entry("agvm_scale_factor", "1.0"), "agvm_scale_factor.*got '1.0'"),
        (_set_group_entry("agvm_scale_factor", True), "agvm_scale_factor.*got True"),
        (_set_group_entry("agvm_scale_factor", 1.5, groups={2}), "another group of module 'cls' has"),
        (_set_group_entry("agvm_num_steps", -3), "agvm_num_steps.*int >= 0, got -3"),
        (_set_group_entry("agvm_num_steps", 2.5), "agvm_num_steps.*int >= 0, got 2.5"),
        (_set_group_entry("agvm_num_steps", math.nan), "agvm_num_steps.*got nan"),
        (_set_group_entry("agvm_num_steps", None), "agvm_num_steps.*got None"),
        (_set_group_entry("agvm_num_steps", 9, groups={4}), "disagree on 'agvm_num_steps'"),
        (_drop_key("agvm_scale_factor"), r"\[1\] has no 'agvm_scale_factor'"),
        (_drop_key("agvm_module"), r"\[1\] has no 'agvm_module'"),
        (_drop_group, "has 5 groups, this AGVM 6"),
        # The earlier layout: the very values the issue found loaded (NaN, -2, []).
        (_set_legacy_entry("scale_factors", [math.nan, 1.0, 1.0]), "finite number > 0, got nan"),
        (_set_legacy_entry("scale_factors", [1.0, -2.0, 1.0]), "> 0, got -2.0"),
        (_set_legacy_entry("scale_factors", []), r"one factor per module \(3\), got \[\]"),
        (_set_legacy_entry("num_steps", math.nan), "agvm_num_steps.*got nan"),
        (_set_legacy_entry("num_steps", -1), "agvm_num_steps.*got -1"),
        (_set_legacy_entry("module_names", ["backbone", "reg", "cls"]), "modules"),
    ],
)
def test_load_state_dict_refuses_bad_agvm_entries_and_changes_nothing(edit, match):
    model, agvm = make_run()
    train(model, agvm, 4)
    saved = copy.deepcopy(agvm.state_dict())
    saved["param_groups"][0]["lr"] = 123.0  # a change the refused load must not half-apply
    edit(saved)
    before = copy.deepcopy(agvm.state_dict())
    with pytest.raises(ValueError, match=match):
        agvm.load_state_dict(saved)
    _assert_same_state(agvm.state_dict(), before)
    assert agvm.param_groups[0]["lr"] == 3e-2


def test_a_base_loaded_from_an_agvm_checkpoint_continues_it_and_a_bad_one_is_refused():
    model, agvm = make_run()
    train(model, agvm, 5)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(agvm.state_dict())
    continued = train(model, agvm, 4, first_step=5)

    torch.manual_seed(0)
    resumed_model = TwoHeads()
    resumed_model.load_state_dict(saved_model)
    base = torch.optim.AdamW(agvm_param_groups(resumed_model, weight_decay=0.01), lr=3e-2)
    base.load_state_dict(saved_optimizer)
    bad = copy.deepcopy(base.param_groups[3])
    base.param_groups[3]["agvm_scale_factor"] = -1.0
    with pytest.raises(ValueError, match=r"base_optimizer.param_groups\[3\]\['agvm_scale_factor'\]"):
        AGVM(base, interval=2, start_step=1, momentum=0.8)
    base.param_groups[3]["agvm_scale_factor"] = bad["agvm_scale_factor"]
    resumed = AGVM(base, interval=2, start_step=1, momentum=0.8)
    assert resumed.num_steps == 5
    assert train(resumed_model, resumed, 4, first_step=5) == continued


def test_add_param_group_refuses_agvm_entries_of_its_own():
    _, agvm = make_run()
    with pytest.raises(ValueError, match="agvm_scale_factor"):
        agvm.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "agvm_scale_factor": 2.0})
    assert len(agvm.param_groups) == 6


def test_groups_changed_behind_agvms_back_are_refused_at_the_step():
    model, agvm = make_run()
    train(model, agvm, 1)
    plain = torch.optim.AdamW(agvm_param_groups(TwoHeads(), weight_decay=0.01), lr=3e-2)
    agvm.base_optimizer.load_state_dict(plain.state_dict())  # drops AGVM's entries from the groups
    with pytest.raises(RuntimeError, match="behind AGVM's back"):
        agvm.step()
    agvm.base_optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(RuntimeError, match="behind AGVM's back"):
        agvm.step()


# --- torch.distributed.checkpoint's state_dict API, in one process ------------------------------


@pytest.mark.parametrize("flatten", [False, True])
def test_distributed_checkpoint_api_round_trip_continues_identically(flatten):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, agvm = make_run(start_step=0)
    train(model, agvm, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(get_optimizer_state_dict(model, agvm, options=options))
    assert agvm.num_steps == 5
    continued = train(model, agvm, 4, first_step=5)

    resumed_model, resumed = make_run(seed=11, start_step=0)
    resumed_model.load_state_dict(saved_model)
    # DCP first creates the fresh optimizer's state with a zero-gradient step at lr 0: with
    # start_step=0 that step would measure (and find no halves) if AGVM took it for training.
    set_optimizer_state_dict(resumed_model, resumed, saved_optimizer, options=options)
    assert resumed.num_steps == 5
    assert resumed.scale_factors.tolist() == agvm_factors_after(saved_optimizer, flatten)
    assert train(resumed_model, resumed, 4, first_step=5) == continued
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def agvm_factors_after(saved, flatten):
    if flatten:
        names = ["backbone.0.weight", "cls.weight", "reg.weight"]
        return [saved[f"param_groups.{name}.agvm_scale_factor"] for name in names]
    return [group["agvm_scale_factor"] for group in saved["param_groups"][::2]]


def test_distributed_checkpoint_state_initialisation_is_not_a_step():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, agvm = make_run(start_step=0)
    saved = get_optimizer_state_dict(model, agvm)
    assert agvm.num_steps == 0 and agvm.state  # the base's state exists, AGVM did not count it
    assert all(group["agvm_num_steps"] == 0 for group in saved["param_groups"])
    assert [p.grad for p in model.parameters()] == [None] * 6

    # SGD without momentum keeps no state: DCP initialises it again mid-run, each time it saves.
    model = TwoHeads()
    sgd = AGVM(torch.optim.SGD(agvm_param_groups(model), lr=0.1), start_step=0, interval=2)
    train(model, sgd, 3)
    sgd.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    get_optimizer_state_dict(model, sgd)
    assert sgd.num_steps == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_real_first_step_at_lr_zero_still_counts():
    """A warmup from lr 0 with real gradients is training: it counts (and measures)."""
    model, agvm = make_run(start_step=0, interval=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(agvm, lambda step: step / 10)
    assert all(group["lr"] == 0.0 for group in agvm.param_groups)
    train(model, agvm, 1)
    scheduler.step()
    assert agvm.num_steps == 1 and agvm.scale_factors.tolist() != [1.0, 1.0, 1.0]


def test_deepcopy_steps_like_the_original():
    model, agvm = make_run()
    train(model, agvm, 3)
    model_copy, agvm_copy = copy.deepcopy((model, agvm))
    assert train(model_copy, agvm_copy, 3, first_step=3) == train(model, agvm, 3, first_step=3)


def test_lr_scheduler_sees_base_lrs_and_base_sees_scaled_lrs():
    model, agvm = make_run(start_step=0, interval=1)
    schedule = lambda epoch: 1.0 / (1 + epoch)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(agvm, schedule)
    seen = []
    agvm.base_optimizer.register_step_pre_hook(lambda opt, a, k: seen.append([g["lr"] for g in opt.param_groups]))
    for step in range(4):
        factors_before = agvm.scale_factors
        train(model, agvm, 1, first_step=step)
        assert factors_before.tolist() != agvm.scale_factors.tolist()
        group_factors = [agvm.scale_factors[agvm.module_names.index(g["agvm_module"])] for g in agvm.param_groups]
        expected_lr = 3e-2 * schedule(step)  # LambdaLR's own formula: base lr times the lambda
        # the base sees 0-dim tensor lrs (lr × s_i); compare their values
        assert [float(lr) for lr in seen[-1]] == pytest.approx([expected_lr * float(s) for s in group_factors], rel=1e-12)
        assert all(g["lr"] == expected_lr for g in agvm.param_groups)
        scheduler.step()


def test_grad_scaler_gives_the_unscaled_factors_and_a_skipped_step_changes_nothing():
    model, agvm = make_run()
    plain_history = train(model, agvm, 5)

    scaled_model, scaled_agvm = make_run()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    scaled_history = train(scaled_model, scaled_agvm, 5, scaler=scaler)
    np.testing.assert_allclose(scaled_history, plain_history, rtol=1e-6)
    for p, q in zip(model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    assert scaled_agvm.measures_next_step  # step 5: a measuring step, then made non-finite
    before = ([p.clone() for p in scaled_model.parameters()], scaled_agvm.scale_factors, scaled_agvm.num_steps)
    scaled_agvm.zero_grad()
    scaled_agvm.backward_halves(
        lambda: scaler.scale(scaled_model.loss(*batch(5, 0))) * float("inf"),
        lambda: scaler.scale(scaled_model.loss(*batch(5, 1))),
    )
    scaler.step(scaled_agvm)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert torch.equal(scaled_agvm.scale_factors, before[1])
    assert scaled_agvm.num_steps == before[2]
    for p, q in zip(scaled_model.parameters(), before[0]):
        assert torch.equal(p, q)


# --- modules: the helper, mappings, errors ------------------------------------------------------


def test_param_groups_helper_splits_decay_and_the_split_shares_one_factor():
    model, agvm = make_run(start_step=0, interval=1)
    groups = agvm.param_groups
    assert [(g["agvm_module"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("backbone", 0.01, 1),
        ("backbone", 0.0, 1),
        ("cls", 0.01, 1),
        ("cls", 0.0, 1),
        ("reg", 0.01, 1),
        ("reg", 0.0, 1),
    ]
    assert agvm.module_names == ("backbone", "cls", "reg")
    seen = []
    agvm.base_optimizer.register_step_pre_hook(lambda opt, a, k: seen.append([g["lr"] for g in opt.param_groups]))
    train(model, agvm, 2)
    lrs = seen[-1]
    assert lrs[0] == lrs[1] == 3e-2 and lrs[2] == lrs[3] != lrs[4] == lrs[5]


def test_param_groups_helper_with_patterns():
    model = TwoHeads()
    groups = agvm_param_groups(model, {"backbone": "backbone.*", "heads": ["cls.*", "reg.weight", "reg.bias"]})
    assert [g["agvm_module"] for g in groups] == ["backbone", "heads"]
    assert [len(g["params"]) for g in groups] == [2, 4]


@pytest.mark.parametrize(
    "patterns, match",
    [
        ({"a": "*", "b": "cls.*"}, "several modules"),
        ({"backbone": "backbone.*", "cls": "cls.*"}, "no module"),
        ({"backbone": "*", "empty": "nothing.*"}, "no trainable"),
    ],
)
def test_param_groups_helper_rejects_overlap_missing_and_empty(patterns, match):
    with pytest.raises(ValueError, match=match):
        agvm_param_groups(TwoHeads(), patterns)


def test_param_groups_helper_rejects_parameters_on_the_root_module():
    model = TwoHeads()
    model.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="'scale'"):
        agvm_param_groups(model)


def test_modules_mapping_orders_modules_and_picks_the_reference():
    model = TwoHeads()
    base = torch.optim.SGD([{"params": model.cls.parameters()}, {"params": model.backbone.parameters()},
                            {"params": model.reg.parameters()}], lr=0.1)  # fmt: skip
    mapping = {"backbone": model.backbone.parameters(), "heads": [*model.cls.parameters(), *model.reg.parameters()]}
    agvm = AGVM(base, mapping, reference="backbone")
    assert agvm.module_names == ("backbone", "heads")
    assert agvm._group_modules == [1, 0, 1]


@pytest.mark.parametrize(
    "mapping, match",
    [
        (lambda m: {"a": m.parameters(), "b": m.cls.parameters()}, "overlap"),
        (lambda m: {"a": [*m.backbone.parameters(), *m.cls.parameters()]}, "miss"),
        (lambda m: {"a": m.parameters(), "b": [nn.Parameter(torch.zeros(1))]}, "does not optimise"),
        (lambda m: {"a": m.backbone.parameters(), "b": [], "c": [*m.cls.parameters(), *m.reg.parameters()]}, "no parameters"),
        (lambda m: {"a": [*m.backbone.parameters(), m.cls.weight], "b": [m.cls.bias, *m.reg.parameters()]}, "spans"),
    ],
)
def test_modules_mapping_errors(mapping, match):
    model = TwoHeads()
    base = torch.optim.SGD([{"params": model.backbone.parameters()}, {"params": model.cls.parameters()},
                            {"params": model.reg.parameters()}], lr=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        AGVM(base, mapping(model))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"interval": 0}, "interval"),
        ({"start_step": -1}, "start_step"),
        ({"start_step": 5, "stop_step": 4}, "stop_step"),
        ({"momentum": 1.0}, "momentum"),
        ({"clamp": (2.0, 1.0)}, "clamp"),
        ({"clamp": (0.0, 1.0)}, "clamp"),
        ({"eps": 0.0}, "eps"),
        ({"reference": 3}, "reference"),
        ({"reference": "neck"}, "reference"),
        ({"use_adam": True}, "betas"),
    ],
)
def test_bad_arguments_raise(options, match):
    (params,) = make_modules([[(2,)]])
    with pytest.raises(ValueError, match=match):
        AGVM(torch.optim.SGD(params, lr=0.1), **options)


def test_use_adam_inference():
    (params,) = make_modules([[(2,)]])
    assert AGVM(torch.optim.AdamW(params)).use_adam
    assert not AGVM(torch.optim.SGD(params, lr=0.1)).use_adam
    lion_like = torch.optim.Adamax(params)  # betas, but keeps exp_inf, not exp_avg_sq
    params[0].grad = torch.ones(2)
    lion_like.step()
    assert not AGVM(lion_like).use_adam
    mixed = torch.optim.SGD([{"params": params[:1]}, {"params": [nn.Parameter(torch.zeros(1))], "betas": (0.9, 0.9)}], lr=0.1)
    with pytest.raises(ValueError, match="use_adam"):
        AGVM(mixed)


def test_add_param_group_joins_a_module_or_starts_one():
    model, agvm = make_run(start_step=0, interval=1)
    train(model, agvm, 2)
    factors = agvm.scale_factors.tolist()
    agvm.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "agvm_module": "cls"})
    agvm.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert agvm.module_names == ("backbone", "cls", "reg", "param_groups[7]")
    assert agvm.scale_factors.tolist() == factors + [1.0]
    assert agvm._group_modules[-2:] == [1, 3]


# --- DDP: two gloo processes --------------------------------------------------------------------

DDP_STEPS = 6
DDP_OPTIONS = {"interval": 2, "start_step": 1, "momentum": 0.6}


def _ddp_worker(rank, store_path, out_dir):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    torch.manual_seed(0)
    model = TwoHeads()
    # tiny buckets: several per step, so the hook's per-bucket bookkeeping is exercised
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1e-4)
    state = AGVMCommState()
    agvm = AGVM(torch.optim.AdamW(agvm_param_groups(model, weight_decay=0.01), lr=3e-2), comm_state=state, **DDP_OPTIONS)
    ddp.register_comm_hook(state, agvm_comm_hook)
    record = {"scale": [], "local_grads": [], "global_grads": [], "exp_avg_sq": []}
    for step in range(DDP_STEPS):
        x, y, t = batch(step, rank)
        # this rank's own gradient, outside DDP: the hand computation's input
        record["local_grads"].append(torch.autograd.grad(model.loss(x, y, t), list(model.parameters())))
        record["exp_avg_sq"].append([agvm.state[p]["exp_avg_sq"].clone() if agvm.state.get(p) else None for p in model.parameters()])
        agvm.zero_grad()
        two_head_loss(ddp(x), y, t).backward()
        record["global_grads"].append([p.grad.clone() for p in model.parameters()])
        agvm.step()
        record["scale"].append(agvm.scale_factors.tolist())
    record["params"] = [p.detach().clone() for p in model.parameters()]
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


MODULE_OF_PARAMETER = [0, 0, 1, 1, 2, 2]  # TwoHeads.parameters(): backbone w, b; cls w, b; reg w, b
ADAMW_BETA2, ADAMW_EPS = 0.999, 1e-8  # AdamW's defaults, used by the workers


def _run_ddp_workers(tmp_path, timeout_s=120):
    context = mp.start_processes(
        _ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:  # a hang must not block CI
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP workers did not finish within {timeout_s} s")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.distributed
def test_ddp_factors_match_hand_computation_and_a_one_process_run(tmp_path):
    rank0, rank1 = _run_ddp_workers(tmp_path)
    assert rank0["scale"] == rank1["scale"]  # every rank applies identical factors
    for p, q in zip(rank0["params"], rank1["params"]):
        assert torch.equal(p, q)

    # by hand: g_A = rank 0's own gradient, g_B = rank 1's, normalised by AdamW's second moment
    expected, history = [1.0, 1.0, 1.0], []
    for step in range(DDP_STEPS):
        if step >= DDP_OPTIONS["start_step"] and (step - DDP_OPTIONS["start_step"]) % DDP_OPTIONS["interval"] == 0:
            halves = {m: ([], [], []) for m in range(3)}
            for i, module in enumerate(MODULE_OF_PARAMETER):
                a, b = rank0["local_grads"][step][i], rank1["local_grads"][step][i]
                v = rank0["exp_avg_sq"][step][i]
                v = np.zeros(a.shape) if v is None else v.numpy()
                g = rank0["global_grads"][step][i].numpy()
                halves[module][0].append(a.numpy())
                halves[module][1].append(b.numpy())
                halves[module][2].append(oracle_adam_denominator(v, g, ADAMW_BETA2, ADAMW_EPS))
            d = [oracle_disagreement(*halves[m]) for m in range(3)]
            expected = oracle_scale_update(expected, d, 0, DDP_OPTIONS["momentum"])
        history.append(expected)
    np.testing.assert_allclose(rank0["scale"], history, rtol=1e-5)
    assert rank0["scale"][-1] != [1.0, 1.0, 1.0]

    # one process, the same data as two halves through backward_halves
    model, agvm = make_run(**DDP_OPTIONS)
    single_history = train(model, agvm, DDP_STEPS)
    np.testing.assert_allclose(rank0["scale"], single_history, rtol=1e-5)
    for p, q in zip(rank0["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def test_hand_made_flat_shards_are_refused():
    """A group with shard_group (flat shards stepped by hand) is refused with a clear error."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "shard_group": object()}]
    with pytest.raises(ValueError, match="shard_group"):
        AGVM(torch.optim.SGD(groups, lr=0.1))
