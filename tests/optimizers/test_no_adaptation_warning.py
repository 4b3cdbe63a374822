"""A LAMB or LARS that adapts no group at all is Adam or SGD: it says so, once, at construction."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from largebatch import LAMB, LARS, AdaGradNorm, Adan


def params():
    return [torch.zeros(3, requires_grad=True)]


def hf_trainer_groups(weight_decay):
    """The two groups Hugging Face Trainer builds, both with TrainingArguments.weight_decay."""
    return [{"params": params(), "weight_decay": weight_decay}, {"params": params(), "weight_decay": 0.0}]


def caught(build):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        build()
    return [r for r in records if "adapts no param group" in str(r.message)]


@pytest.mark.parametrize(
    "build, fix",
    [
        (lambda: LAMB(hf_trainer_groups(0.0), lr=1e-3), "always_adapt=True"),
        (lambda: LAMB(params(), weight_decay=0.0), "always_adapt=True"),
        (lambda: LAMB(params(), layer_adaptation=False), "always_adapt=True"),
        (lambda: LARS(params(), layer_adaptation=False), "layer_adaptation=True"),
    ],
    ids=["lamb-hf-default-weight-decay", "lamb-wd0", "lamb-no-layer-adaptation", "lars-no-layer-adaptation"],
)
def test_warns_once_with_the_reason_and_the_fix(build, fix):
    records = caught(build)
    assert len(records) == 1
    assert records[0].category is UserWarning
    message = str(records[0].message)
    assert fix in message
    if "LAMB" in message:
        assert "weight_decay" in message and "Adam" in message
    else:
        assert "SGD" in message
    assert records[0].filename == __file__  # points at the user's line, not at largebatch


@pytest.mark.parametrize(
    "build",
    [
        lambda: LAMB(hf_trainer_groups(0.01)),
        lambda: LAMB(params()),
        lambda: LAMB(params(), weight_decay=0.0, always_adapt=True),
        lambda: LARS(params()),
        lambda: LARS([{"params": params(), "layer_adaptation": False}, {"params": params()}]),
        lambda: Adan(params()),
        lambda: AdaGradNorm(params()),
    ],
    ids=["lamb-hf-decay", "lamb-default", "lamb-always-adapt", "lars-default", "lars-one-group-adapts", "adan", "adagrad_norm"],
)
def test_no_warning_when_some_group_adapts(build):
    assert caught(build) == []


def test_the_readme_hugging_face_section_says_it():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### With Hugging Face Trainer and Lightning", 1)[1].split("\n### ", 1)[0]
    text = " ".join(section.split())
    assert "TrainingArguments.weight_decay" in text and "exactly as Adam" in text
    assert "always_adapt=True" in text and "warns" in text
