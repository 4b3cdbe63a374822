"""create_optimizer: names, batch-size scaling of the lr, groups, AGVM wrapping, errors."""

from __future__ import annotations

import doctest
import importlib
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch.factory import create_optimizer
from largebatch.optimizers import LAMB, LARS, AdaGradNorm, Adan
from largebatch.optimizers.agvm import AGVM

CLASSES = {
    "lamb": LAMB,
    "lars": LARS,
    "adan": Adan,
    "adagradnorm": AdaGradNorm,
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}
# The rule each optimizer should get: linear for SGD-like (Goyal et al. 2017), sqrt for adaptive.
EXPONENT = {"lamb": 0.5, "lars": 1.0, "adan": 0.5, "adagradnorm": 0.5, "sgd": 1.0, "adamw": 0.5}
# Each class's constructor default weight decay, written out.
DEFAULT_DECAY = {"lamb": 0.01, "lars": 0.0, "adan": 0.0, "adagradnorm": 0.0, "sgd": 0.0, "adamw": 0.01}
WITH_ADAPTATION = {"lamb", "lars"}


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def group_kinds(optimizer):
    return sorted((len(g["params"]), g["weight_decay"], g.get("layer_adaptation")) for g in optimizer.param_groups)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_name_builds_its_class_with_the_papers_groups(name):
    optimizer = create_optimizer(TwoPart(), name.upper())
    assert type(optimizer) is CLASSES[name]
    adaptation = (True, False) if name in WITH_ADAPTATION else (None, None)
    if name == "lars":  # DEFAULT_EXCLUSION: LARS adapts the tensors it does not decay
        adaptation = (True, True)
    # decayed: the two Linear weights; excluded: two biases + LayerNorm weight and bias.
    assert group_kinds(optimizer) == sorted([(2, DEFAULT_DECAY[name], adaptation[0]), (4, 0.0, adaptation[1])])
    assert optimizer.param_groups[0]["lr"] == CLASSES[name]([torch.zeros(1)]).defaults["lr"]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_agvm_names_wrap_the_base_with_one_module_per_child(name):
    optimizer = create_optimizer(TwoPart(), f"agvm-{name}", lr=0.1, weight_decay=0.05, agvm_kwargs={"interval": 3})
    assert isinstance(optimizer, AGVM) and type(optimizer.base_optimizer) is CLASSES[name]
    assert optimizer.module_names == ("backbone", "head") and optimizer.interval == 3
    by_module = {}
    for group in optimizer.param_groups:
        by_module.setdefault(group["agvm_module"], []).append((len(group["params"]), group["weight_decay"]))
    # backbone: Linear weight decayed; its bias, LayerNorm weight and bias not. head: weight / bias.
    assert by_module == {"backbone": [(1, 0.05), (3, 0.0)], "head": [(1, 0.05), (1, 0.0)]}


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(CLASSES)),
    lr=st.floats(1e-5, 10.0),
    base_batch_size=st.integers(1, 1024),
    factor=st.integers(1, 64),
)
def test_lr_is_scaled_by_the_rule_of_the_optimizer(name, lr, base_batch_size, factor):
    batch_size = base_batch_size * factor
    optimizer = create_optimizer(
        [torch.zeros(2, requires_grad=True)], name, lr, batch_size=batch_size, base_batch_size=base_batch_size
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr * factor ** EXPONENT[name], rel=1e-12)


def test_the_choice_is_logged_and_a_given_rule_wins(caplog):
    with caplog.at_level(logging.INFO, logger="largebatch.factory"):
        optimizer = create_optimizer(TwoPart(), "lars", 0.1, batch_size=1024, base_batch_size=256)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)
    assert "linear rule (suggested for LARS)" in caplog.text and "0.4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="largebatch.factory"):
        optimizer = create_optimizer(TwoPart(), "lars", 0.1, batch_size=1024, base_batch_size=256, scaling_rule="sqrt")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert "sqrt rule (given)" in caplog.text


def test_exclusions_and_kwargs_are_passed_on():
    model = TwoPart()
    optimizer = create_optimizer(
        model, "lamb", 0.01, weight_decay=0.1, exclude_from_decay=["head.*"], exclude_from_adaptation=(),
        betas=(0.8, 0.9), max_grad_norm=1.0,
    )
    assert group_kinds(optimizer) == [(2, 0.0, True), (4, 0.1, True)]
    assert all(g["betas"] == (0.8, 0.9) and g["max_grad_norm"] == 1.0 for g in optimizer.param_groups)


def test_plain_parameters_and_groups_are_passed_unchanged():
    w, b = torch.zeros(3, 3, requires_grad=True), torch.zeros(3, requires_grad=True)
    groups = [{"params": [w]}, {"params": [b], "weight_decay": 0.0}]
    optimizer = create_optimizer(groups, "adamw", 1e-3, weight_decay=0.2)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
    assert [g["params"] for g in optimizer.param_groups] == [[w], [b]]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        create_optimizer(TwoPart(), "lion")
    for name in CLASSES:
        assert name in str(error.value)
    assert "agvm-" in str(error.value)
    with pytest.raises(ValueError, match="agvm-agvm-sgd"):
        create_optimizer(TwoPart(), "agvm-agvm-sgd")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0.1,), dict(batch_size=512), "base_batch_size"),
        ((None,), dict(batch_size=512, base_batch_size=256), "lr"),
        ((0.1,), dict(scaling_rule="sqrt"), "scaling_rule"),
        ((0.1,), dict(batch_size=512, base_batch_size=256, scaling_rule="cubic"), "rule"),
        ((0.1,), dict(agvm_kwargs={"interval": 2}), "agvm_kwargs"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_optimizer(TwoPart(), "lamb", *args, **kwargs)


def test_exclusions_need_a_model_and_an_adaptive_optimizer():
    with pytest.raises(ValueError, match="exclude_from_decay"):
        create_optimizer([torch.zeros(2, requires_grad=True)], "lamb", exclude_from_decay=["*"])
    with pytest.raises(ValueError, match="exclude_from_adaptation"):
        create_optimizer(TwoPart(), "adamw", exclude_from_adaptation=["*"])


@pytest.mark.parametrize("module", ["largebatch.factory", "largebatch.grouping"])
def test_docstring_examples_run(module):
    # By module path: a top-level export of the function param_groups would shadow the attribute.
    result = doctest.testmod(importlib.import_module(module), extraglobs={"nn": nn})
    assert result.attempted > 0 and result.failed == 0
