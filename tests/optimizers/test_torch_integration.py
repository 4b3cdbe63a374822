"""The optimizers behave like torch.optim ones: params forms, closures, schedulers, GradScaler, compile."""

import math

import pytest
import torch
from torch import nn

from largebatch import LAMB, LARS, AdaGradNorm, Adan
from largebatch.optimizers import functional
from largebatch.schedules import LinearWarmup

ALL = [LAMB, LARS, Adan, AdaGradNorm]
BY_NAME = pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _train(model, opt, steps=3, *, scaler=None, scheduler=None):
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 4), torch.randn(16, 2)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if scheduler is not None:
            scheduler.step()


@BY_NAME
def test_params_as_tensors_named_parameters_and_groups_agree(cls):
    """The three ways of passing params give the same training run."""
    results = []
    for form in ("tensors", "named", "groups"):
        model = _model()
        if form == "tensors":
            params = model.parameters()
        elif form == "named":
            params = model.named_parameters()
        else:
            # one dict holding everything: AdaGrad-Norm's accumulator is per group by definition
            params = [{"params": list(model.parameters())}]
        opt = cls(params, lr=0.01)
        _train(model, opt)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@BY_NAME
def test_per_group_hyper_parameters_apply_to_their_group_only(cls):
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = cls([{"params": [a], "lr": 0.0}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(3))
    assert not torch.equal(b.detach(), torch.ones(3))


def test_lamb_layer_adaptation_false_excludes_a_group():
    """An excluded group steps with r = 1 even though it has weight decay."""
    w0 = torch.full((4,), 10.0, dtype=torch.float64)
    w, v = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = LAMB([{"params": [w]}, {"params": [v], "layer_adaptation": False}], lr=0.1, weight_decay=0.5, eps=0.0)
    w.grad, v.grad = torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    opt.step()
    u = 1.0 + 0.5 * w0  # Adam's first step is sign(g) = 1; plus decay
    torch.testing.assert_close(v.detach(), w0 - 0.1 * u)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * (w0.norm() / u.norm()) * u)


@BY_NAME
def test_closure_loss_is_returned_and_none_grads_are_skipped(cls):
    used, unused = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = cls([used, unused], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(2.0)
    assert unused.grad is None and unused not in opt.state
    assert torch.equal(unused.detach(), torch.ones(2))
    assert not torch.equal(used.detach(), torch.ones(2))


@BY_NAME
def test_step_state_is_a_0dim_float32_tensor_and_buffers_match_params(cls):
    p = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
    opt = cls([p])
    p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    step = opt.state[p]["step"]
    assert step.shape == () and step.dtype == torch.float32 and step.item() == 2
    for key, value in opt.state[p].items():
        if key not in ("step", "sum_sq"):
            assert value.shape == p.shape and value.dtype == p.dtype, key


@BY_NAME
def test_setstate_fills_defaults_of_older_pickles(cls):
    opt = cls([torch.ones(2, requires_grad=True)])
    state = opt.__getstate__()
    for group in state["param_groups"]:
        for key in ("maximize", "foreach", "capturable", "differentiable", "fused"):
            del group[key]
    fresh = cls.__new__(cls)
    fresh.__setstate__(state)
    assert fresh.param_groups[0]["maximize"] is False and fresh.param_groups[0]["fused"] is None


@BY_NAME
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_works_with_lr_schedulers(cls, tensor_lr):
    """A scheduler's lr is the one the step uses, float or tensor: StepLR to 0 freezes the params."""
    model = _model()
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    opt = cls(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.0)
    _train(model, opt, steps=2, scheduler=scheduler)
    assert float(opt.param_groups[0]["lr"]) == 0.0
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor_lr
    frozen = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, steps=2)
    for a, b in zip(frozen, model.parameters()):
        assert torch.equal(a, b)


def _momentum(group):
    """What OneCycleLR cycles: SGD-style momentum, or beta1 of the betas."""
    return group["momentum"] if "momentum" in group else group["betas"][0] if "betas" in group else None


def _schedule(model, opt, scheduler, steps):
    """(lr, momentum) of the first group at each of `steps` training steps, each then stepping `scheduler`."""
    history = []
    for _ in range(steps):
        history.append((float(opt.param_groups[0]["lr"]), _momentum(opt.param_groups[0])))
        _train(model, opt, steps=1)
        scheduler.step()
    return history


@BY_NAME
def test_chained_and_onecycle_schedulers_run(cls):
    """OneCycleLR cycles lr and momentum (LARS) or beta1 (LAMB, Adan; AdaGrad-Norm has neither)
    exactly as on torch.optim, and our LinearWarmup chains with torch's cosine by multiplication."""
    cycles_momentum = cls is not AdaGradNorm

    def onecycle(opt):
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=8, cycle_momentum=cycles_momentum, base_momentum=0.8, max_momentum=0.9
        )

    model = _model()
    opt = cls(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    history = _schedule(model, opt, onecycle(opt), steps=8)
    peer = _model()
    if cls is LARS:
        peer_opt = torch.optim.SGD(peer.parameters(), lr=0.1, momentum=0.9)
    elif cycles_momentum:
        peer_opt = torch.optim.Adam(peer.parameters(), lr=0.1)
    else:
        peer_opt = torch.optim.SGD(peer.parameters(), lr=0.1)
    expected = _schedule(peer, peer_opt, onecycle(peer_opt), steps=8)
    lrs = [lr for lr, _ in history]
    assert lrs == pytest.approx([lr for lr, _ in expected], rel=1e-12)
    assert lrs.index(max(lrs)) not in (0, 7) and lrs[-1] < lrs[0]  # up, then down below the start
    if cycles_momentum:
        assert [m for _, m in history] == pytest.approx([m for _, m in expected], rel=1e-12)
        assert len({m for _, m in history}) > 1  # the momentum moved
    if cls is Adan:
        assert len(opt.param_groups[0]["betas"]) == 3  # beta2, beta3 kept
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))

    model = _model()
    opt = cls(model.parameters(), lr=0.1)
    warmup = LinearWarmup(opt, warmup_steps=3)  # factors 1/3, 2/3, 1, then 1
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    chained = _schedule(model, opt, torch.optim.lr_scheduler.ChainedScheduler([warmup, cosine], optimizer=opt), 7)
    expected = [0.1 * min(t + 1, 3) / 3 * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(7)]
    assert [lr for lr, _ in chained] == pytest.approx(expected, rel=1e-9, abs=1e-15)


@BY_NAME
def test_grad_scaler_matches_unscaled_training(cls):
    """GradScaler (CPU) unscales before our step: a power-of-two scale gives the identical run."""
    plain, scaled = _model(), _model()
    _train(plain, cls(plain.parameters(), lr=0.01))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _train(scaled, cls(scaled.parameters(), lr=0.01), scaler=scaler)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@BY_NAME
def test_grad_scaler_skips_the_step_on_inf(cls):
    model = _model()
    opt = cls(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(2, 4)).sum()
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**3
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert all("step" not in opt.state[p] for p in model.parameters())


@pytest.mark.slow
@BY_NAME
def test_compiled_step_matches_eager(cls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(3)]
    runs = []
    for compiled in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        opt = cls(params, lr=0.01, foreach=False)
        step = torch.compile(opt.step) if compiled else opt.step
        for i in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.5 * (i + 1)) + 0.1 * p.detach()
            step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@BY_NAME
def test_differentiable_step_lets_gradients_through(cls):
    """With differentiable=True the step is part of the graph: d(new param)/d(old param) exists."""
    leaf = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    param = leaf.clone()  # non-leaf, so in-place updates are recorded by autograd
    param.grad = torch.tensor([0.5, 0.5, -1.0], dtype=torch.float64)
    opt = cls([param], lr=0.1, differentiable=True)
    opt.step()
    param.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert not torch.equal(leaf.grad, torch.zeros(3, dtype=torch.float64))


def test_functional_forms_are_exported():
    assert {"lamb", "lars", "adan", "adagrad_norm"} <= set(functional.__all__)
    p = torch.ones(2)
    functional.lars([p], [torch.ones(2)], None, [torch.tensor(0.0)], lr=1.0, momentum=0.0, dampening=0.0,
                    nesterov=False, weight_decay=0.0, trust_coefficient=0.5, eps=0.0, trust_clip=False,
                    adapt=True, lr_in_momentum=False, maximize=False)
    torch.testing.assert_close(p, torch.full((2,), 0.5))
