"""Worker for test_distributed_sharded_norms.py: two gloo ranks train the same model under FSDP2
(fully_shard), DDP and flat shards, and rank 0 saves the full parameters of every run.

Usage: python _sharded_worker.py OUT_FILE PORT
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import largebatch.optimizers._base as base_module
from largebatch import AGVM, LAMB, LARS, Adan

WORLD = 2
STEPS = 10
SETUPS = {
    "lamb": (LAMB, dict(lr=0.02, weight_decay=0.1)),
    "lars": (LARS, dict(lr=0.5, weight_decay=1e-3, trust_coefficient=0.02)),
    "adan_clip": (Adan, dict(lr=0.01, weight_decay=0.02, max_grad_norm=0.1)),
    "lamb_clip": (LAMB, dict(lr=0.02, weight_decay=0.1, max_grad_norm=0.1)),
}


IMPLEMENTATIONS = {"per_tensor": {"foreach": False}, "foreach": {"foreach": True}}
if os.environ.get("TRITON_INTERPRET") == "1":  # the fused kernels run on CPU tensors only interpreted
    IMPLEMENTATIONS["fused"] = {"fused": True}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 5 output rows: dim-0 shards of 3 and 2 rows, so the shards are uneven.
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def batches(rank: int):
    """Per-step (x, y) of this rank: the rank's half of a global batch of 16."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 4, generator=gen)
        yield x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]


def train(model, opt, rank, steps=None):
    for i, (x, y) in enumerate(batches(rank)):
        if steps is not None and not steps[0] <= i < steps[1]:
            continue
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def agvm_halves(rank: int):
    """Per step, this rank's two half batches (4 samples each) of its 8."""
    for x, y in batches(rank):
        yield (x[:4], y[:4]), (x[4:], y[4:])


def train_agvm(model, rank):
    """AGVM around SGD, measuring every step, the halves from AGVM.backward_halves."""
    base = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.2, momentum=0.9)
    agvm = AGVM(base, start_step=0, interval=1, momentum=0.5)
    for (xa, ya), (xb, yb) in agvm_halves(rank):
        agvm.zero_grad()
        agvm.backward_halves(lambda: nn.functional.mse_loss(model(xa), ya), lambda: nn.functional.mse_loss(model(xb), yb))
        agvm.step()
    return agvm.scale_factors


def full_params(model):
    return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def fsdp_model():
    model = make_model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def run(rank: int, out: str, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {}
    for name, (cls, kwargs) in SETUPS.items():
        for impl, options in IMPLEMENTATIONS.items():
            model = fsdp_model()
            train(model, cls(model.parameters(), **options, **kwargs), rank)
            results[f"fsdp/{name}/{impl}"] = full_params(model)

    # AGVM on FSDP2: the cosine sums of the local shards are completed across the ranks.
    model = fsdp_model()
    factors = train_agvm(model, rank)
    results["fsdp/agvm"] = full_params(model) + [factors]

    # The same LAMB run with the cross-rank reduction switched off: must differ.
    real = base_module.shard_reduction
    base_module.shard_reduction = lambda params, shard_group=None: None
    model = fsdp_model()
    train(model, LAMB(model.parameters(), **SETUPS["lamb"][1]), rank)
    results["fsdp/lamb/no_reduction"] = full_params(model)
    base_module.shard_reduction = real

    # DDP: whole parameters everywhere, nothing to reduce in the optimizer.
    model = DistributedDataParallel(make_model())
    train(model, LAMB(model.parameters(), **SETUPS["lamb"][1]), rank)
    results["ddp/lamb"] = full_params(model.module)

    # Flat shards (ZeRO style): each rank steps its half of every flattened parameter.
    whole = make_model()
    shards = []
    for p in whole.parameters():
        flat = p.detach().reshape(-1)
        half = (flat.numel() + 1) // 2
        shards.append(flat[rank * half : (rank + 1) * half].clone().requires_grad_())
    opt = LARS([{"params": shards, "shard_group": dist.group.WORLD}], **SETUPS["lars"][1])
    for x, y in batches(rank):
        whole.zero_grad()
        nn.functional.mse_loss(whole(x), y).backward()
        for p, shard in zip(whole.parameters(), shards):
            grad = p.grad.reshape(-1).clone()
            dist.all_reduce(grad)
            half = (grad.numel() + 1) // 2
            shard.grad = grad[rank * half : (rank + 1) * half] / WORLD
        opt.step()
        with torch.no_grad():  # gather the shards back into the whole model
            for p, shard in zip(whole.parameters(), shards):
                pieces = [torch.empty_like(shard) for _ in range(WORLD)]
                if shard.numel() * WORLD != p.numel():
                    pieces = [torch.empty((p.numel() + 1) // 2) for _ in range(WORLD)]
                    padded = torch.cat([shard.detach(), torch.zeros(pieces[0].numel() - shard.numel())])
                    dist.all_gather(pieces, padded)
                else:
                    dist.all_gather(pieces, shard.detach())
                p.copy_(torch.cat(pieces)[: p.numel()].reshape(p.shape))
    assert opt.state_dict()["param_groups"][0].get("shard_group") is None  # not pickled
    results["flat/lars"] = full_params(whole)

    # Distributed checkpoint: save after 5 steps, load into a fresh FSDP2 model and optimizer.
    model = fsdp_model()
    opt = LAMB(model.parameters(), **SETUPS["lamb"][1])
    train(model, opt, rank, steps=(0, 5))
    ckpt = os.path.join(os.path.dirname(out), "dcp")
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    resumed = fsdp_model()
    resumed_opt = LAMB(resumed.parameters(), **SETUPS["lamb"][1])
    state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(state, checkpoint_id=ckpt)
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
    train(resumed, resumed_opt, rank, steps=(5, STEPS))
    results["fsdp/lamb/resumed"] = full_params(resumed)

    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # no rank tears its gloo pairs down while the other still uses them
    dist.destroy_process_group()
    leave_without_finalisation()


def leave_without_finalisation() -> None:
    """End a rank whose checks all passed without interpreter finalisation, where gloo threads
    that still hold tensors can take the GIL and abort it (see tests/batching/_gloo.py)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD)
