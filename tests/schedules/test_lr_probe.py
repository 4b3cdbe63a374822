"""probe_lr: the range it sweeps, its suggestion, and the exact restore of model and optimizer."""

import copy
import math

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch import LAMB, LARS
from largebatch.schedules.lr_probe import probe_lr


def net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))


def batches(seed, n=64, count=30):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)) for _ in range(count)]


def cross_entropy(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def snapshot(model, optimizer):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(optimizer.state_dict()),  # state_dict() holds the live state tensors
        torch.get_rng_state(),
    )


def assert_same(before, after):
    (m0, g0, o0, r0), (m1, g1, o1, r1) = before, after
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, g1))
    assert o0["param_groups"] == o1["param_groups"]
    assert o0["state"].keys() == o1["state"].keys()
    for key, state in o0["state"].items():
        for name, value in state.items():
            other = o1["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    assert torch.equal(r0, r1)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3)),
    lambda ps: LARS(ps, lr=2.0, momentum=0.9, weight_decay=1e-4),
    lambda ps: LAMB(ps, lr=1e-3),
])
@settings(max_examples=4, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(seed=st.integers(0, 1000), warm_steps=st.integers(0, 3))
def test_model_optimizer_grads_and_rng_are_restored_exactly(make, seed, warm_steps):
    model = net(seed)
    optimizer = make(model.parameters())
    for batch in batches(seed, count=warm_steps):  # some optimizer state and a .grad to restore
        optimizer.zero_grad()
        cross_entropy(model, batch).backward()
        optimizer.step()
    lr_object = optimizer.param_groups[0]["lr"]
    before = snapshot(model, optimizer)
    result = probe_lr(model, optimizer, batches(seed + 1), cross_entropy, min_lr=1e-5, max_lr=10.0, num_steps=20)
    assert_same(before, snapshot(model, optimizer))
    assert optimizer.param_groups[0]["lr"] is lr_object or not isinstance(lr_object, torch.Tensor)
    if isinstance(lr_object, torch.Tensor):
        assert lr_object.item() == pytest.approx(1e-3)
    assert model.training
    assert 1 <= len(result.lrs) <= 20 and result.suggested_lr == pytest.approx(result.best_lr / 10)


def test_restores_even_when_a_step_raises():
    model = net(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(model, optimizer)

    def failing(m, batch):
        if failing.calls == 3:
            raise RuntimeError("boom")
        failing.calls += 1
        return cross_entropy(m, batch)

    failing.calls = 0
    with pytest.raises(RuntimeError, match="boom"):
        probe_lr(model, optimizer, batches(1), failing, min_lr=1e-3, max_lr=1.0, num_steps=10)
    assert_same(before, snapshot(model, optimizer))


def test_lrs_are_geometric_and_other_groups_keep_their_ratio():
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=2.0)
    seen = []

    def loss(m, batch):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return m(batch).square().mean() * 0  # flat: nothing diverges, every step runs

    result = probe_lr(model, optimizer, [torch.ones(4, 2)] * 5, loss, min_lr=1e-4, max_lr=1.0, num_steps=5)
    assert result.lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert [pair[1] / pair[0] for pair in seen] == pytest.approx([0.25] * 5)
    assert [g["lr"] for g in optimizer.param_groups] == [2.0, 0.5]


def test_suggests_below_the_edge_of_a_quadratic_and_stops_on_divergence():
    # SGD on f(w) = w²/2 converges for lr < 2 and diverges above: the loss is lowest just below 2.
    w = nn.Parameter(torch.tensor([1.0]))
    holder = nn.Module()
    holder.w = w
    optimizer = torch.optim.SGD([w], lr=1.0)
    result = probe_lr(
        holder, optimizer, iter(lambda: None, 1), lambda m, _: 0.5 * (m.w**2).sum(), min_lr=1e-2, max_lr=100.0,
        num_steps=60, smoothing=0.0, safety_factor=4.0,
    )
    assert result.diverged and result.lrs[-1] < 100.0
    assert 0.3 < result.best_lr < 2.5 and result.suggested_lr == pytest.approx(result.best_lr / 4)
    assert w.item() == 1.0


def test_a_non_finite_loss_ends_the_probe():
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    losses = iter([1.0, 0.5, math.nan, 0.1])
    result = probe_lr(model, optimizer, range(4), lambda m, _: m.weight.sum() * 0 + next(losses),
                      min_lr=1e-3, max_lr=1.0, num_steps=4)
    assert result.diverged and len(result.lrs) == 3 and result.best_lr == result.lrs[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_lr": 0.0}, "min_lr"),
        ({"max_lr": float("inf")}, "max_lr"),
        ({"min_lr": 1.0, "max_lr": 0.5}, "max_lr"),
        ({"num_steps": 1}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
        ({"safety_factor": 0.5}, "safety_factor"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, match):
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    arguments = {"min_lr": 1e-3, "max_lr": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        probe_lr(model, optimizer, [torch.ones(1, 1)] * 3, lambda m, b: m(b).sum(), **arguments)
    assert optimizer.param_groups[0]["lr"] == 1.0


def test_an_empty_iterable_is_an_error_and_changes_nothing():
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    weight = model.weight.detach().clone()
    with pytest.raises(ValueError, match="batches"):
        probe_lr(model, optimizer, [], lambda m, b: m(b).sum(), min_lr=1e-3, max_lr=1.0)
    assert torch.equal(model.weight, weight)
