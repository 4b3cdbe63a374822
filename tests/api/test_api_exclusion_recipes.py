"""The exclusion recipes of create_optimizer and param_groups(excluded_lr) for LARS and LAMB."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch import LAMB, LARS, param_groups
from largebatch.factory import DEFAULT_EXCLUSION, EXCLUSION_RECIPES, LARC_TRUST_COEFFICIENT, create_optimizer


def conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 2))


# The model's tensors: conv and linear weights (decayed); conv bias, BN weight and bias, linear bias.
DECAYED, EXCLUDED = 2, 4


def summary(optimizer):
    """(number of params, lr, weight_decay, layer_adaptation) per group, in group order."""
    return [(len(g["params"]), g["lr"], g["weight_decay"], g["layer_adaptation"]) for g in optimizer.param_groups]


def test_each_recipe_gives_the_excluded_tensors_what_it_says():
    exclude = create_optimizer(conv_bn(), "lars", 2.0, weight_decay=1e-4, exclusion="exclude")
    assert summary(exclude) == [(DECAYED, 2.0, 1e-4, True), (EXCLUDED, 2.0, 0.0, False)]
    adapt = create_optimizer(conv_bn(), "lars", 2.0, weight_decay=1e-4, exclusion="adapt")
    assert summary(adapt) == [(DECAYED, 2.0, 1e-4, True), (EXCLUDED, 2.0, 0.0, True)]
    separate = create_optimizer(conv_bn(), "lars", 2.0, weight_decay=1e-4, exclusion="separate_lr", excluded_lr=0.1)
    assert summary(separate) == [(DECAYED, 2.0, 1e-4, True), (EXCLUDED, 0.1, 0.0, False)]
    clip = create_optimizer(conv_bn(), "lars", 0.1, weight_decay=1e-4, exclusion="clip")
    assert summary(clip) == [(DECAYED, 0.1, 1e-4, True), (EXCLUDED, 0.1, 0.0, False)]
    assert all(g["trust_clip"] and g["trust_coefficient"] == LARC_TRUST_COEFFICIENT for g in clip.param_groups)
    assert not any(g["trust_clip"] for g in adapt.param_groups)


def test_defaults_come_from_the_evidence_table():
    assert set(DEFAULT_EXCLUSION.values()) <= set(EXCLUSION_RECIPES)
    lars = create_optimizer(conv_bn(), "lars", 1.0)
    assert [g["layer_adaptation"] for g in lars.param_groups] == [True] * len(lars.param_groups)
    assert DEFAULT_EXCLUSION["LARS"] == "adapt"
    lamb = create_optimizer(conv_bn(), "lamb", 1e-3)
    assert [g["layer_adaptation"] for g in lamb.param_groups] == [True, DEFAULT_EXCLUSION["LAMB"] == "adapt"]


def test_lamb_adapt_turns_on_always_adapt_so_undecayed_groups_get_a_trust_ratio():
    model = conv_bn()
    lamb = create_optimizer(model, "lamb", 1e-2, exclusion="adapt")
    assert all(g["always_adapt"] and g["layer_adaptation"] for g in lamb.param_groups)
    model(torch.randn(5, 1, 4)).square().mean().backward()
    bn_weight = model[1].weight
    before = bn_weight.detach().clone()
    lamb.step()
    # Adam's first update has ‖u‖ = √n (every |m̂/√v̂| = 1); r = ‖w‖/‖u‖ makes the step lr·‖w‖,
    # where the "exclude" recipe (r = 1) would step by lr·√n.
    assert float((bn_weight.detach() - before).norm()) == pytest.approx(1e-2 * float(before.norm()), rel=1e-3)


def test_separate_lr_is_scaled_with_lr_by_the_rule():
    opt = create_optimizer(
        conv_bn(), "lars", 2.0, batch_size=1024, base_batch_size=256, exclusion="separate_lr", excluded_lr=0.1
    )
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(8.0), pytest.approx(0.4)]
    lamb = create_optimizer(
        conv_bn(), "lamb", 1e-3, batch_size=1024, base_batch_size=256, exclusion="separate_lr", excluded_lr=4e-4
    )
    assert [g["lr"] for g in lamb.param_groups] == [pytest.approx(2e-3), pytest.approx(8e-4)]


def test_a_users_adaptation_rule_overrides_the_default_recipe():
    opt = create_optimizer(conv_bn(), "lars", 1.0, exclude_from_adaptation=["3.*"])
    assert {(len(g["params"]), g["layer_adaptation"]) for g in opt.param_groups} >= {(1, False)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exclusion": "none"}, "exclusion must be one of"),
        ({"exclusion": "separate_lr"}, "excluded_lr"),
        ({"exclusion": "adapt", "excluded_lr": 0.1}, "excluded_lr"),
        ({"excluded_lr": 0.1}, "excluded_lr"),
        ({"exclusion": "adapt", "exclude_from_adaptation": ["*"]}, "exclude_from_adaptation"),
        ({"exclusion": "separate_lr", "excluded_lr": -1.0}, "excluded_lr"),
        ({"exclusion": "separate_lr", "excluded_lr": float("nan")}, "excluded_lr"),
    ],
)
def test_bad_recipe_arguments_raise_a_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_optimizer(conv_bn(), "lars", 1.0, **kwargs)


def test_recipes_need_a_layer_adaptive_optimizer_and_a_model():
    with pytest.raises(ValueError, match="exclusion"):
        create_optimizer(conv_bn(), "sgd", 0.1, exclusion="adapt")
    with pytest.raises(ValueError, match="excluded_lr"):
        create_optimizer(conv_bn(), "adamw", 0.1, excluded_lr=0.1)
    with pytest.raises(ValueError, match="clip"):
        create_optimizer(conv_bn(), "lamb", 1e-3, exclusion="clip")
    with pytest.raises(ValueError, match="nn.Module"):
        create_optimizer(list(conv_bn().parameters()), "lars", 1.0, exclusion="adapt")
    # Plain parameters with no recipe asked for are passed on as before.
    assert type(create_optimizer(list(conv_bn().parameters()), "lars", 1.0)) is LARS


@settings(max_examples=30, deadline=None)
@given(lr=st.floats(0.0, 10.0), decay=st.floats(0.0, 0.1))
def test_param_groups_excluded_lr_goes_to_exactly_the_unadapted_groups(lr, decay):
    groups = param_groups(conv_bn(), decay, excluded_lr=lr)
    assert [("lr" in g, g["layer_adaptation"]) for g in groups] == [(False, True), (True, False)]
    assert groups[1]["lr"] == lr
    # Built into LARS: the decayed group takes the optimizer's lr, the excluded one its own.
    opt = LARS(groups, lr=3.0)
    assert [g["lr"] for g in opt.param_groups] == [3.0, lr]
    with pytest.raises(ValueError, match="excluded_lr"):
        param_groups(conv_bn(), decay, excluded_lr=lr, layer_adaptation=False)


def test_lamb_recipes_build_lamb():
    for recipe in ("exclude", "adapt", "separate_lr"):
        extra = {"excluded_lr": 1e-4} if recipe == "separate_lr" else {}
        assert type(create_optimizer(conv_bn(), "lamb", 1e-3, exclusion=recipe, **extra)) is LAMB
