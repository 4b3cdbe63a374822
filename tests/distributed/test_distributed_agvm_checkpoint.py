"""AGVM under FSDP2 through torch.distributed.checkpoint on two gloo CPU ranks: save after 5 steps,
load into a fresh model and optimizer, continue: the same parameters, factors and step count as
the uninterrupted run, for plain and flattened optimizer state dicts."""

import os
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "_agvm_checkpoint_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
from _launch import run_worker  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_worker(WORKER, tmp_path_factory.mktemp("agvm_dcp") / "results.pt")


@pytest.mark.parametrize("flatten", [False, True])
def test_fsdp2_agvm_resumed_from_a_distributed_checkpoint_equals_the_uninterrupted_run(results, flatten):
    straight, resumed = results["uninterrupted"], results[f"resumed/flatten={flatten}"]
    assert not torch.equal(straight["factors"], torch.ones_like(straight["factors"]))  # the factors moved
    assert resumed["num_steps_initialised"] == 0  # DCP's state initialisation is not a step
    assert resumed["num_steps_loaded"] == 5
    assert resumed["num_steps"] == straight["num_steps"] == 10
    assert torch.equal(resumed["factors"], straight["factors"])
    for got, want in zip(resumed["params"], straight["params"], strict=True):
        assert torch.equal(got, want)
