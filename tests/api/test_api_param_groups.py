"""param_groups: every trainable parameter in exactly one group, with the papers' exclusions."""

from __future__ import annotations

import fnmatch

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch.optimizers import LAMB
from largebatch.grouping import param_groups

# Layers the strategy builds models from: (factory, the parameters the default rule excludes).
LAYERS = {
    "linear": (lambda: nn.Linear(3, 3), {"bias"}),
    "linear_nobias": (lambda: nn.Linear(3, 3, bias=False), set()),
    "conv": (lambda: nn.Conv2d(3, 3, 1), {"bias"}),
    "batchnorm": (lambda: nn.BatchNorm1d(3), {"weight", "bias"}),
    "instancenorm": (lambda: nn.InstanceNorm1d(3, affine=True), {"weight", "bias"}),
    "layernorm_2d": (lambda: nn.LayerNorm((2, 3)), {"weight", "bias"}),  # 2-d weight, still a norm
    "groupnorm": (lambda: nn.GroupNorm(1, 3), {"weight", "bias"}),
    "rmsnorm": (lambda: nn.RMSNorm(3), {"weight"}),
    "embedding": (lambda: nn.Embedding(5, 3), set()),
}


def build(layer_names, frozen):
    """A Sequential of the named layers; `frozen` indices get requires_grad=False. Also returns
    the names the default rule must exclude and the names of trainable parameters."""
    model = nn.Sequential(*(LAYERS[name][0]() for name in layer_names))
    excluded, trainable = set(), set()
    for index, name in enumerate(layer_names):
        for pname, p in model[index].named_parameters():
            full = f"{index}.{pname}"
            if index in frozen:
                p.requires_grad_(False)
                continue
            trainable.add(full)
            if pname in LAYERS[name][1]:
                excluded.add(full)
    return model, excluded, trainable


def names_of(model, params):
    by_identity = {p: name for name, p in model.named_parameters()}
    return [by_identity[p] for p in params]


@settings(max_examples=60, deadline=None)
@given(
    layer_names=st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=6),
    frozen=st.sets(st.integers(0, 5), max_size=2),
    weight_decay=st.sampled_from([0.0, 0.05]),
)
def test_default_rule_partitions_trainable_parameters(layer_names, frozen, weight_decay):
    model, excluded, trainable = build(layer_names, frozen)
    if not trainable:
        with pytest.raises(ValueError, match="trainable"):
            param_groups(model, weight_decay)
        return
    groups = param_groups(model, weight_decay)
    grouped = [name for group in groups for name in names_of(model, group["params"])]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter exactly once, no frozen one
    for group in groups:
        names = set(names_of(model, group["params"]))
        assert group["params"], "no empty group"
        if names & excluded:
            assert names <= excluded
            assert group["weight_decay"] == 0.0 and group["layer_adaptation"] is False
        else:
            assert group["weight_decay"] == weight_decay and group["layer_adaptation"] is True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LAMB adapts no param group")  # weight_decay 0 is drawn too
        LAMB(groups)  # the groups are valid optimizer input


@settings(max_examples=40, deadline=None)
@given(
    layer_names=st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=5),
    decay_patterns=st.lists(st.sampled_from(["*.bias", "0.*", "*weight", "1.*"]), max_size=2),
    adapt_patterns=st.lists(st.sampled_from(["*.bias", "2.*", "*weight"]), max_size=2),
)
def test_patterns_decide_decay_and_adaptation_independently(layer_names, decay_patterns, adapt_patterns):
    model, _, trainable = build(layer_names, frozen=set())
    groups = param_groups(model, 0.1, no_decay=decay_patterns, no_adaptation=adapt_patterns)
    seen = []
    for group in groups:
        for name in names_of(model, group["params"]):
            seen.append(name)
            matches = lambda patterns: any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
            assert group["weight_decay"] == (0.0 if matches(decay_patterns) else 0.1)
            assert group["layer_adaptation"] is (not matches(adapt_patterns))
    assert sorted(seen) == sorted(trainable)
    assert len({(g["weight_decay"], g["layer_adaptation"]) for g in groups}) == len(groups)  # no duplicate kind


def test_no_adaptation_follows_no_decay_by_default():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = param_groups(model, 0.1, no_decay=["0.*"])
    assert [(names_of(model, g["params"]), g["weight_decay"], g["layer_adaptation"]) for g in groups] == [
        (["1.weight", "1.bias"], 0.1, True),
        (["0.weight", "0.bias"], 0.0, False),
    ]


def test_a_callable_rule_and_no_adaptation_key():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    groups = param_groups(model, 0.1, no_decay=lambda name, p: name.endswith("bias"), layer_adaptation=False)
    assert all("layer_adaptation" not in g for g in groups)
    assert [(names_of(model, g["params"]), g["weight_decay"]) for g in groups] == [
        (["0.weight", "1.weight"], 0.1),
        (["0.bias", "1.bias"], 0.0),
    ]


def test_tied_parameters_count_once():
    encoder, decoder = nn.Embedding(4, 3), nn.Linear(3, 4, bias=False)
    decoder.weight = encoder.weight
    groups = param_groups(nn.ModuleDict({"encoder": encoder, "decoder": decoder}), 0.1)
    assert [len(g["params"]) for g in groups] == [1]
    torch.optim.SGD(groups, lr=0.1)  # torch would warn about a duplicated parameter


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay=True), "weight_decay"),
        (dict(weight_decay=0.1, no_decay="*.bias"), "no_decay"),
        (dict(weight_decay=0.1, no_adaptation=[1]), "no_adaptation"),
        (dict(weight_decay=0.1, no_adaptation=["*"], layer_adaptation=False), "no_adaptation"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        param_groups(nn.Linear(2, 2), **kwargs)
