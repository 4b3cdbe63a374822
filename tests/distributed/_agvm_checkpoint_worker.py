"""Worker for test_distributed_agvm_checkpoint.py: on two gloo ranks, AGVM around AdamW on an FSDP2
model trains uninterrupted, and again with a torch.distributed.checkpoint save after 5 steps and a
load into a fresh model and optimizer (plain and flattened optimizer state dicts); rank 0 saves the
full parameters, factors and step counts of every run.

Usage: python _agvm_checkpoint_worker.py OUT_FILE STORE_FILE
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

sys.path.insert(0, os.path.dirname(__file__))
from _sharded_worker import WORLD, agvm_halves, fsdp_model, full_params, leave_without_finalisation  # noqa: E402

from largebatch import AGVM, agvm_param_groups  # noqa: E402

SAVE_AT = 5
# start_step=0: DCP's zero-gradient state initialisation of a fresh optimizer would be a
# measuring step without halves if AGVM counted it as training.
AGVM_OPTIONS = dict(start_step=0, interval=2, momentum=0.5)


def make_agvm(model: nn.Module) -> AGVM:
    return AGVM(torch.optim.AdamW(agvm_param_groups(model, weight_decay=0.01), lr=0.02), **AGVM_OPTIONS)


def train(model: nn.Module, agvm: AGVM, rank: int, first: int, stop: int) -> None:
    for step, ((xa, ya), (xb, yb)) in enumerate(agvm_halves(rank)):
        if first <= step < stop:
            agvm.zero_grad()
            agvm.backward_halves(lambda: nn.functional.mse_loss(model(xa), ya), lambda: nn.functional.mse_loss(model(xb), yb))
            agvm.step()


def summary(model: nn.Module, agvm: AGVM) -> dict:
    return {"params": full_params(model), "factors": agvm.scale_factors, "num_steps": agvm.num_steps}


def resumed_run(rank: int, steps: int, checkpoint: str, options: StateDictOptions) -> dict:
    model = fsdp_model()
    agvm = make_agvm(model)
    train(model, agvm, rank, 0, SAVE_AT)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, agvm, options=options)},
             checkpoint_id=checkpoint)  # fmt: skip
    del model, agvm

    model = fsdp_model()
    agvm = make_agvm(model)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, agvm, options=options)}
    initialised = agvm.num_steps  # after DCP's state initialisation of the fresh optimizer
    dcp.load(state, checkpoint_id=checkpoint)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, agvm, state["optim"], options=options)
    loaded = agvm.num_steps
    train(model, agvm, rank, SAVE_AT, steps)
    return summary(model, agvm) | {"num_steps_initialised": initialised, "num_steps_loaded": loaded}


def run(rank: int, out: str, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    steps = sum(1 for _ in agvm_halves(rank))
    model = fsdp_model()
    agvm = make_agvm(model)
    train(model, agvm, rank, 0, steps)
    results = {"uninterrupted": summary(model, agvm)}
    for flatten in (False, True):
        checkpoint = os.path.join(os.path.dirname(out), f"dcp_flatten_{flatten}")
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        results[f"resumed/flatten={flatten}"] = resumed_run(rank, steps, checkpoint, options)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # no rank tears its gloo pairs down while the other still uses them
    dist.destroy_process_group()
    leave_without_finalisation()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD)
