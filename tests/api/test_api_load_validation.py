"""load_state_dict checks the whole checkpoint before anything changes.

A corrupt checkpoint (bad step, negative second moment, wrong shape, invalid hyper-parameter,
wrong counts) and a state saved by another optimizer raise a ValueError saying what is wrong,
and the optimizer is left exactly as it was: same state, same groups, same live settings.
"""

from __future__ import annotations

import copy

import pytest
import torch

from largebatch import LAMB, LARS, AdaGradNorm, Adan

BUILDERS = {
    "LAMB": lambda params, **kw: LAMB(params, lr=0.01, weight_decay=0.01, **kw),
    "LARS": lambda params, **kw: LARS(params, lr=0.1, weight_decay=0.01, **kw),
    "Adan": lambda params, **kw: Adan(params, lr=0.01, weight_decay=0.01, **kw),
    "AdaGradNorm": lambda params, **kw: AdaGradNorm(params, lr=0.1, **kw),
}
SHAPES = [(3, 2), (4,)]


def trained(name, steps=2, **kw):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in SHAPES]
    opt = BUILDERS[name](params, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()
    return opt, params


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_equal_states(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert a["state"][key].keys() == b["state"][key].keys()
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), name


def assert_load_refused(opt, state_dict, match):
    before = snapshot(opt)
    live = [(group["lr"], group["foreach"]) for group in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    assert_equal_states(snapshot(opt), before)
    assert [(group["lr"], group["foreach"]) for group in opt.param_groups] == live


def corrupted(opt, edit):
    state_dict = copy.deepcopy(opt.state_dict())
    edit(state_dict)
    return state_dict


def set_step(value):
    def edit(sd):
        sd["state"][0]["step"] = value

    return edit


def set_state(key, value):
    def edit(sd):
        sd["state"][0][key] = value

    return edit


def set_group(key, value):
    def edit(sd):
        sd["param_groups"][0][key] = value

    return edit


def negate(key, param_id=0):
    def edit(sd):
        sd["state"][param_id][key] = -sd["state"][param_id][key] - 1.0

    return edit


CORRUPTIONS = {
    "step-None": (set_step(None), "step"),
    "step-nan": (set_step(torch.tensor(float("nan"))), "step"),
    "step-negative": (set_step(torch.tensor(-3.0)), "step"),
    "step-inf-float": (set_step(float("inf")), "step"),
    "step-string": (set_step("3"), "step"),
    "lr-negative": (set_group("lr", -1.0), "lr"),
    "lr-None": (set_group("lr", None), "lr"),
    "weight_decay-nan": (set_group("weight_decay", float("nan")), "weight_decay"),
    "maximize-not-bool": (set_group("maximize", "no"), "maximize"),
    "fewer-groups": (lambda sd: sd["param_groups"].pop(), "param groups"),
    "fewer-params": (lambda sd: sd["param_groups"][0]["params"].pop(), "parameters"),
    "unknown-param-id": (lambda sd: sd["state"].__setitem__(17, sd["state"][0]), "17"),
    "state-not-a-dict": (lambda sd: sd["state"].__setitem__(0, [1.0]), "not a dict"),
    "no-state-entry": (lambda sd: sd.pop("state"), "state"),
}
PER_OPTIMIZER = {
    "LAMB": {
        "exp_avg_sq-negative": (negate("exp_avg_sq"), "exp_avg_sq"),
        "exp_avg-wrong-shape": (set_state("exp_avg", torch.zeros(2, 3)), "exp_avg"),
        "exp_avg-not-a-tensor": (set_state("exp_avg", 0.0), "exp_avg"),
        "betas-out-of-range": (set_group("betas", (1.5, 2)), "betas"),
        "trust_clip-zero": (set_group("trust_clip", 0.0), "trust_clip"),
        "missing-exp_avg": (lambda sd: sd["state"][0].pop("exp_avg"), "exp_avg"),
    },
    "LARS": {
        "momentum_buffer-wrong-shape": (set_state("momentum_buffer", torch.zeros(6)), "momentum_buffer"),
        "trust_coefficient-None": (set_group("trust_coefficient", None), "trust_coefficient"),
        "max_grad_norm-set": (set_group("max_grad_norm", 1.0), "max_grad_norm"),
    },
    "Adan": {
        "exp_avg_sq-negative": (negate("exp_avg_sq"), "exp_avg_sq"),
        "prev_grad-wrong-shape": (set_state("prev_grad", torch.zeros(3)), "prev_grad"),
        "betas-out-of-range": (set_group("betas", (0.98, 1.5, 0.99)), "betas"),
    },
    "AdaGradNorm": {
        "sum_sq-negative": (set_state("sum_sq", torch.tensor(-1.0)), "sum_sq"),
        "sum_sq-nan": (set_state("sum_sq", torch.tensor(float("nan"))), "sum_sq"),
        "sum_sq-not-0-dim": (set_state("sum_sq", torch.ones(3, 2)), "sum_sq"),
        "sum_sq-missing": (lambda sd: sd["state"][0].pop("sum_sq"), "sum_sq"),
        "sum_sq-on-second-param": (lambda sd: sd["state"][1].__setitem__("sum_sq", torch.tensor(1.0)), "sum_sq"),
        "initial_accumulator_value-inf": (set_group("initial_accumulator_value", float("inf")), "initial_accumulator"),
    },
}
CASES = [(name, label, *case) for name in BUILDERS for label, case in {**CORRUPTIONS, **PER_OPTIMIZER[name]}.items()]


@pytest.mark.parametrize("name, label, edit, match", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_corrupt_checkpoint_is_refused_and_changes_nothing(name, label, edit, match):
    source, _ = trained(name, steps=3)
    target, _ = trained(name, steps=1, foreach=True)
    target.param_groups[0]["lr"] = 0.123  # differs from the checkpoint's: must survive a failed load
    assert_load_refused(target, corrupted(source, edit), match)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_valid_checkpoint_still_loads_and_is_not_aliased(name):
    source, _ = trained(name, steps=3)
    state_dict = copy.deepcopy(source.state_dict())
    kept = copy.deepcopy(state_dict)
    target, params = trained(name, steps=1)
    target.load_state_dict(state_dict)
    for p in params:
        p.grad = torch.ones(p.shape)
    target.step()  # updates the loaded state in place: never the checkpoint's tensors
    assert_equal_states(state_dict, kept)


def foreign_state(source: str):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in SHAPES]
    opt = {
        "LAMB": lambda: LAMB(params, weight_decay=0.01),
        "Adan": lambda: Adan(params),
        "SGD": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        "Adam": lambda: torch.optim.Adam(params),
    }[source]()
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize(
    "source, target", [("LAMB", "Adan"), ("Adan", "LAMB"), ("SGD", "LARS"), ("LAMB", "AdaGradNorm"), ("Adam", "LAMB")]
)
def test_a_foreign_state_is_refused_pointing_to_the_interop_loaders(source, target):
    opt, _ = trained(target, steps=1)
    assert_load_refused(opt, foreign_state(source), "largebatch.interop")


def test_a_live_setting_survives_a_refused_load():
    """The issue's case: a bad step used to raise after lr and foreach were already replaced."""
    source, _ = trained("LAMB", steps=2, foreach=True)
    target, _ = trained("LAMB", steps=1, foreach=False)
    target.param_groups[0]["lr"] = 0.5
    state_dict = corrupted(source, set_step(None))
    with pytest.raises(ValueError, match="step"):
        target.load_state_dict(state_dict)
    assert target.param_groups[0]["lr"] == 0.5 and target.param_groups[0]["foreach"] is False
