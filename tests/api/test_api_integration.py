"""largebatch's optimizers work unchanged with torch.compile(model), torch.amp.GradScaler and every
torch.optim.lr_scheduler (DDP is in test_api_ddp.py). On CPU."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

from largebatch.optimizers import LAMB, LARS, AdaGradNorm, Adan

OPTIMIZERS = {
    "LAMB": lambda params: LAMB(params, lr=0.01, weight_decay=0.01),
    "LARS": lambda params: LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-4),
    "Adan": lambda params: Adan(params, lr=0.01, weight_decay=0.02),
    "AdaGradNorm": lambda params: AdaGradNorm(params, lr=0.1),
}
STEPS = 5


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).to(dtype)


def make_data(dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=generator, dtype=dtype)
    return x, x[:, :1].sin() + 0.1 * torch.randn(32, 1, generator=generator, dtype=dtype)


def train(forward, params, optimizer, x, y, steps=STEPS):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(forward(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- torch.compile


@pytest.fixture(scope="module")
def compiled_model():
    """One model compiled once (default inductor backend) and reused by every optimizer: its
    parameters are reset in place, which keeps the compiled graph valid (no recompilation)."""
    model = make_model(torch.float64)
    return model, torch.compile(model), [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_training_a_compiled_model_matches_eager(name, compiled_model):
    model, compiled, initial = compiled_model
    x, y = make_data(torch.float64)
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), initial):
            p.copy_(p0)
    compiled_losses = train(compiled, list(model.parameters()), OPTIMIZERS[name](model.parameters()), x, y)
    compiled_params = [p.detach().clone() for p in model.parameters()]

    eager = make_model(torch.float64)
    eager_losses = train(eager, list(eager.parameters()), OPTIMIZERS[name](eager.parameters()), x, y)
    # Inductor may fuse and reorder the float64 reductions of forward and backward.
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-9, atol=1e-12)
    for got, expected in zip(compiled_params, eager.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert compiled_losses[-1] < compiled_losses[0]


# --------------------------------------------------------------------------- GradScaler


def scaled_training(name, x, y, inject_inf_at=None):
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    snapshots, scales = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step == inject_inf_at:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        snapshots.append([p.detach().clone() for p in model.parameters()])
        scales.append(scaler.get_scale())
    return snapshots, scales


def unscaled_training(name, x, y):
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    for _ in range(STEPS):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grad_scaler_unscales_exactly_and_skips_non_finite_steps(name):
    x, y = make_data()
    snapshots, scales = scaled_training(name, x, y)
    # Scaling by a power of two and unscaling is exact: the same parameters as without a scaler.
    for got, expected in zip(snapshots[-1], unscaled_training(name, x, y)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert scales == [2.0**10, 2.0**11, 2.0**11, 2.0**12, 2.0**12]  # grows every growth_interval=2 steps

    snapshots_inf, scales_inf = scaled_training(name, x, y, inject_inf_at=2)
    for before, after in zip(snapshots_inf[1], snapshots_inf[2]):
        torch.testing.assert_close(after, before, rtol=0, atol=0)  # step 2 skipped
    assert scales_inf[2] == scales[1] / 2  # backoff after the inf


# --------------------------------------------------------------------------- lr schedulers


def scheduler_classes():
    """Every concrete scheduler class torch.optim.lr_scheduler defines."""
    abstract = {lr_scheduler.LRScheduler, getattr(lr_scheduler, "_LRScheduler", None)}
    found = []
    for _, cls in inspect.getmembers(lr_scheduler, inspect.isclass):
        concrete = issubclass(cls, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)) and cls not in abstract
        if concrete and cls.__module__ == lr_scheduler.__name__:
            found.append(cls)
    return found


def cycles_momentum(optimizer):
    return "momentum" in optimizer.defaults or "betas" in optimizer.defaults


def two_schedulers(opt):
    return [lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(opt, gamma=0.9)]


# How to build the schedulers that need arguments; every other class is built as cls(optimizer).
SCHEDULER_BUILDERS = {
    "ChainedScheduler": lambda cls, opt: cls(two_schedulers(opt), optimizer=opt),
    "SequentialLR": lambda cls, opt: cls(opt, schedulers=two_schedulers(opt), milestones=[2]),
    "CosineAnnealingLR": lambda cls, opt: cls(opt, T_max=4),
    "CosineAnnealingWarmRestarts": lambda cls, opt: cls(opt, T_0=3),
    "CyclicLR": lambda cls, opt: cls(
        opt, base_lr=0.001, max_lr=0.01, step_size_up=2, cycle_momentum=cycles_momentum(opt)
    ),
    "OneCycleLR": lambda cls, opt: cls(opt, max_lr=0.01, total_steps=STEPS + 1, cycle_momentum=cycles_momentum(opt)),
    "ExponentialLR": lambda cls, opt: cls(opt, gamma=0.9),
    "LambdaLR": lambda cls, opt: cls(opt, lr_lambda=lambda epoch: 1.0 / (epoch + 1)),
    "MultiplicativeLR": lambda cls, opt: cls(opt, lr_lambda=lambda epoch: 0.9),
    "MultiStepLR": lambda cls, opt: cls(opt, milestones=[2, 4]),
    "StepLR": lambda cls, opt: cls(opt, step_size=2),
    "ReduceLROnPlateau": lambda cls, opt: cls(opt, patience=0, factor=0.5),
}


def lr_trajectory(scheduler_cls, optimizer, params):
    build = SCHEDULER_BUILDERS.get(scheduler_cls.__name__, lambda cls, opt: cls(opt))
    scheduler = build(scheduler_cls, optimizer)
    generator = torch.Generator().manual_seed(2)
    lrs = []
    for step in range(STEPS):
        for p in params:  # the lr does not depend on the gradients: random ones, no backward needed
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            scheduler.step(float(step))  # a worsening metric: reduces the lr every step
        else:
            scheduler.step()
        lrs.append([group["lr"] for group in optimizer.param_groups])
    return lrs


def two_tensor_groups():
    return [torch.zeros(4, 3, requires_grad=True)], [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize("scheduler_cls", scheduler_classes(), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_lr_scheduler_drives_our_lr_as_it_drives_sgds(name, scheduler_cls):
    weights, biases = two_tensor_groups()
    optimizer = OPTIMIZERS[name]([{"params": weights}, {"params": biases, "lr": 0.05}])
    first_beta = [group.get("betas", (None,))[0] for group in optimizer.param_groups]
    ours = lr_trajectory(scheduler_cls, optimizer, weights + biases)

    weights, biases = two_tensor_groups()
    reference = torch.optim.SGD(
        [{"params": weights}, {"params": biases, "lr": 0.05}], lr=optimizer.defaults["lr"], momentum=0.9
    )
    expected = lr_trajectory(scheduler_cls, reference, weights + biases)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    for group, beta in zip(optimizer.param_groups, first_beta):
        optimizer._validate_group(group)  # whatever the scheduler wrote (cycled momentum, betas) is valid
        if scheduler_cls.__name__ in ("CyclicLR", "OneCycleLR") and beta is not None:
            assert group["betas"][0] != beta and len(group["betas"]) == len(optimizer.defaults["betas"])
    assert all(torch.isfinite(p).all() for group in optimizer.param_groups for p in group["params"])
