"""ConAdv against hand-written oracles: FGSM/PGD at the right (stale) weights and through the right
BatchNorm, the training loop bit for bit, the state round trip, GradScaler, BatchNorm statistics
and argument validation."""

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch import LAMB
from largebatch.adversarial import AuxiliaryBatchNorm, ConAdv, convert_to_auxiliary_batchnorm

loss_fn = nn.functional.cross_entropy


def plain_model(seed: int = 0, batchnorm: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def make_model(seed: int = 0) -> nn.Sequential:
    """Linear, BatchNorm with an adversarial twin (the paper's main BN / adv BN), Tanh, Linear."""
    return convert_to_auxiliary_batchnorm(plain_model(seed))


def view(model: nn.Sequential, twin: str) -> nn.Sequential:
    """The converted model with each AuxiliaryBatchNorm replaced by its ``twin`` ("main" or
    "adversarial"): the same modules, written out without the layer's routing."""
    return nn.Sequential(*[getattr(m, twin) if isinstance(m, AuxiliaryBatchNorm) else m for m in model])


def batches(count: int, size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(count)]


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_x of the loss on a throw-away copy of the model (its BatchNorm statistics may move)."""
    model = copy.deepcopy(model)
    x = x.clone().requires_grad_(True)
    loss_fn(model(x), y).backward()
    return x.grad


def pgd(model: nn.Module, x, y, epsilon: float, norm: str, steps: int = 1, step_size: float | None = None):
    """Plain PGD from δ = 0 (FGSM for one step of size ε), written out per example."""
    alpha = epsilon / steps if step_size is None else step_size
    delta = torch.zeros_like(x)
    for _ in range(steps):
        g = input_gradient(model, x + delta, y)
        if norm == "linf":
            delta = (delta + alpha * g.sign()).clamp(-epsilon, epsilon)
        else:
            rows = []
            for d_i, g_i in zip(delta, g):
                n = g_i.norm()
                d_i = d_i + (alpha * g_i / n if n > 0 else 0 * g_i)
                rows.append(d_i * min(1.0, epsilon / float(d_i.norm())) if d_i.norm() > 0 else d_i)
            delta = torch.stack(rows)
    return x + delta


@settings(max_examples=25)
@given(epsilon=st.floats(1e-3, 1.0), norm=st.sampled_from(["linf", "l2"]), seed=st.integers(0, 100))
def test_staleness_0_is_an_fgsm_step_at_the_current_weights(epsilon, norm, seed):
    model = make_model(seed)
    (x, y), = batches(1, seed=seed)
    buffers = [b.clone() for b in model.buffers()]
    got = ConAdv(model, loss_fn, epsilon=epsilon, norm=norm, staleness=0).perturb(x, y)
    # Through the adversarial BatchNorm, as the paper's code does (its attack runs with adv=True).
    torch.testing.assert_close(got, pgd(view(model, "adversarial"), x, y, epsilon, norm), rtol=1e-6, atol=1e-6)
    # The perturbation changes nothing in the model: no statistics moved, no gradient written.
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert all(p.grad is None for p in model.parameters())


@settings(max_examples=15)
@given(steps=st.integers(2, 4), norm=st.sampled_from(["linf", "l2"]), ratio=st.floats(0.3, 1.5), seed=st.integers(0, 50))
def test_pgd_steps_match_the_oracle_and_stay_in_the_ball(steps, norm, ratio, seed):
    model, (x, y) = make_model(seed), batches(1, seed=seed)[0]
    epsilon = 0.3
    conadv = ConAdv(model, loss_fn, epsilon=epsilon, norm=norm, staleness=0, steps=steps, step_size=ratio * epsilon)
    got = conadv.perturb(x, y)
    expected = pgd(view(model, "adversarial"), x, y, epsilon, norm, steps, ratio * epsilon)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    size = (got - x).abs().amax(1) if norm == "linf" else (got - x).norm(dim=1)
    assert (size <= epsilon * (1 + 1e-6)).all()


class Column(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_batch_of_scalars_is_perturbed_per_example(norm):
    torch.manual_seed(0)
    model = nn.Sequential(Column(), nn.Linear(1, 3))
    x, y = torch.randn(6), torch.randint(0, 3, (6,))
    got = ConAdv(model, loss_fn, epsilon=0.1, norm=norm, staleness=0).perturb(x, y)
    g = input_gradient(model, x, y)
    torch.testing.assert_close(got, x + 0.1 * g.sign(), rtol=0, atol=1e-7)  # one entry: L2 step = sign step


def test_input_range_clamps_the_perturbed_inputs():
    model, (x, y) = make_model(), batches(1)[0]
    got = ConAdv(model, loss_fn, epsilon=0.5, staleness=0, input_range=(-0.2, 0.3)).perturb(x.clamp(-0.2, 0.3), y)
    assert got.min() >= -0.2 and got.max() <= 0.3


@settings(max_examples=10)
@given(staleness=st.integers(1, 3), seed=st.integers(0, 50))
def test_staleness_tau_perturbs_at_the_weights_of_tau_steps_back(staleness, seed):
    """At step t the perturbation is FGSM at θ_{max(t-τ, 0)}: the weights before that step's update."""
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    conadv = ConAdv(model, loss_fn, epsilon=0.1, staleness=staleness)
    history = []  # θ_t: copies of the model at the start of each step
    for t, (x, y) in enumerate(batches(5, seed=seed)):
        history.append(copy.deepcopy(model))
        expected = pgd(view(history[max(t - staleness, 0)], "adversarial"), x, y, 0.1, "linf")
        torch.testing.assert_close(conadv.perturb(x, y), expected, rtol=0, atol=0)
        if t > staleness:  # and not the current weights' step (the weights do move)
            assert not torch.equal(expected, pgd(view(model, "adversarial"), x, y, 0.1, "linf"))
        optimizer.zero_grad()
        conadv.backward(x, y)
        optimizer.step()


def hand_written_step(model, stale_model, x, y, epsilon, weight, batchnorm):
    """ConAdv's step written out: FGSM at the stale copy, then two forwards. Auxiliary: the clean
    one through the main BN, the adversarial one through the adversarial twin (whose statistics it
    moves); shared: both through the one BN, whose statistics the clean one alone moves."""
    if batchnorm == "auxiliary":
        x_adv = pgd(view(stale_model, "adversarial"), x, y, epsilon, "linf")
        loss = (1 - weight) * loss_fn(view(model, "main")(x), y) + weight * loss_fn(view(model, "adversarial")(x_adv), y)
        loss.backward()
        return loss
    x_adv = pgd(stale_model, x, y, epsilon, "linf")
    clean = loss_fn(model(x), y)
    saved = [b.clone() for b in model.buffers()]
    loss = (1 - weight) * clean + weight * loss_fn(model(x_adv), y)
    loss.backward()
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
    return loss


@pytest.mark.parametrize("batchnorm", ["auxiliary", "shared"])
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, LAMB])
@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_training_equals_the_hand_written_loop_bit_for_bit(optimizer_class, staleness, batchnorm):
    build = make_model if batchnorm == "auxiliary" else plain_model
    models = [build(3), build(3)]
    optimizers = [optimizer_class(m.parameters(), lr=0.05) for m in models]
    conadv = ConAdv(models[0], loss_fn, epsilon=0.2, staleness=staleness, adversarial_weight=0.3, batchnorm=batchnorm)
    snapshots = []
    for t, (x, y) in enumerate(batches(6)):
        snapshots.append(copy.deepcopy(models[1]))
        for opt in optimizers:
            opt.zero_grad()
        got = conadv.backward(x, y).loss
        expected = hand_written_step(models[1], snapshots[max(t - staleness, 0)], x, y, 0.2, 0.3, batchnorm)
        assert torch.equal(got, expected.detach())
        for opt in optimizers:
            opt.step()
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)


def test_shared_batchnorm_statistics_come_from_clean_batches_unless_asked():
    (x, y), = batches(1)
    for updates in (False, True):
        model, reference = plain_model(), plain_model()
        ConAdv(model, loss_fn, epsilon=0.2, staleness=0, batchnorm="shared", adversarial_updates_buffers=updates).backward(x, y)
        x_adv = pgd(reference, x, y, 0.2, "linf")
        with torch.no_grad():
            reference(x)
            if updates:
                reference(x_adv)
        for a, b in zip(model.buffers(), reference.buffers()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("updates", [None, False])
def test_auxiliary_batchnorm_keeps_each_twin_to_its_own_batches(updates):
    """Main BN: clean batches' statistics and the clean loss's gradient only; the adversarial twin:
    the adversarial batch's (its running statistics only if the adversarial pass may update buffers)."""
    (x, y), = batches(1)
    model, reference = make_model(), make_model()
    ConAdv(model, loss_fn, epsilon=0.2, staleness=0, adversarial_weight=0.5, adversarial_updates_buffers=updates).backward(x, y)
    x_adv = pgd(view(reference, "adversarial"), x, y, 0.2, "linf")
    clean = loss_fn(view(reference, "main")(x), y)
    saved = [b.clone() for b in reference[1].adversarial.buffers()]
    (0.5 * clean + 0.5 * loss_fn(view(reference, "adversarial")(x_adv), y)).backward()
    if updates is False:
        with torch.no_grad():
            for b, s in zip(reference[1].adversarial.buffers(), saved):
                b.copy_(s)
    else:
        assert not torch.equal(reference[1].adversarial.running_mean, saved[0])  # the twin's statistics moved
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(model[1].main.weight.grad, model[1].adversarial.weight.grad)
    assert not model[1].adversarial_active  # evaluation and plain steps use the main BN again


def test_converted_model_computes_what_the_original_did():
    original, (x, _) = plain_model(), batches(1)[0]
    converted = convert_to_auxiliary_batchnorm(copy.deepcopy(original))
    assert isinstance(converted[1], AuxiliaryBatchNorm) and converted[1].main is not converted[1].adversarial
    assert torch.equal(converted[1].adversarial.weight, original[1].weight)
    for mode in ("train", "eval"):
        getattr(original, mode)(), getattr(converted, mode)()
        assert torch.equal(converted(x), original(x))
    assert convert_to_auxiliary_batchnorm(converted) is converted and isinstance(converted[1].main, nn.BatchNorm1d)
    assert isinstance(convert_to_auxiliary_batchnorm(nn.BatchNorm1d(3)), AuxiliaryBatchNorm)


def test_a_failing_adversarial_pass_leaves_the_main_batchnorm_routed():
    model, (x, y) = make_model(), batches(1)[0]
    calls = []

    def failing_on_the_adversarial_pass(output, target):
        calls.append(model[1].adversarial_active)
        if len(calls) == 3:  # perturbation, clean, adversarial
            raise RuntimeError("boom")
        return loss_fn(output, target)

    with pytest.raises(RuntimeError, match="boom"):
        ConAdv(model, failing_on_the_adversarial_pass, epsilon=0.1, staleness=0).backward(x, y)
    assert calls == [True, False, True] and not model[1].adversarial_active


def test_adversarial_weight_1_trains_on_adversarial_examples_only():
    model, (x, y) = make_model(), batches(1)[0]
    losses = ConAdv(model, loss_fn, epsilon=0.2, staleness=0, adversarial_weight=1.0).backward(x, y)
    assert losses.clean is None and torch.equal(losses.loss, losses.adversarial)
    reference = view(make_model(), "adversarial")
    loss_fn(reference(pgd(reference, x, y, 0.2, "linf")), y).backward()
    assert model[1].main.weight.grad is None  # the main BN saw no batch
    for p, q in zip([p for p in model.parameters() if p.grad is not None], reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def run_steps(model, optimizer, conadv, data):
    for x, y in data:
        optimizer.zero_grad()
        conadv.backward(x, y)
        optimizer.step()


@pytest.mark.parametrize("staleness", [1, 3])
def test_state_dict_round_trip_mid_run_continues_identically(staleness):
    data = batches(7)
    model = make_model()
    optimizer = LAMB(model.parameters(), lr=0.05)
    conadv = ConAdv(model, loss_fn, epsilon=0.2, staleness=staleness)
    run_steps(model, optimizer, conadv, data)

    model_b = make_model()
    optimizer_b = LAMB(model_b.parameters(), lr=0.05)
    conadv_b = ConAdv(model_b, loss_fn, epsilon=0.2, staleness=staleness)
    run_steps(model_b, optimizer_b, conadv_b, data[:2])  # step 2 < staleness 3: a part-filled history
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": optimizer_b.state_dict(), "conadv": conadv_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model_c = make_model(seed=9)
    optimizer_c = LAMB(model_c.parameters(), lr=0.05)
    conadv_c = ConAdv(model_c, loss_fn, epsilon=0.2, staleness=staleness)
    model_c.load_state_dict(saved["model"])
    optimizer_c.load_state_dict(saved["opt"])
    conadv_c.load_state_dict(saved["conadv"])
    run_steps(model_c, optimizer_c, conadv_c, data[2:])
    for a, b in zip(model.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_is_not_changed_by_later_steps():
    model, optimizer = make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    conadv = ConAdv(model, loss_fn, epsilon=0.2, staleness=1)
    run_steps(model, optimizer, conadv, batches(2))
    state = conadv.state_dict()
    kept = copy.deepcopy(state)
    run_steps(model, optimizer, conadv, batches(2, seed=5))
    assert state["step"] == kept["step"] == 2
    for a, b in zip(state["snapshots"][0].values(), kept["snapshots"][0].values()):
        assert torch.equal(a, b)


def bad_states(good):
    wrong_shape = copy.deepcopy(good)
    wrong_shape["snapshots"][-1]["0.weight"] = torch.zeros(2, 2)
    wrong_dtype = copy.deepcopy(good)
    wrong_dtype["snapshots"][0]["0.bias"] = wrong_dtype["snapshots"][0]["0.bias"].double()
    missing = copy.deepcopy(good)
    del missing["snapshots"][0]["3.weight"]
    return {
        "missing key": {k: v for k, v in good.items() if k != "step"},
        "extra key": {**good, "epsilon": 0.1},
        "staleness": {**good, "staleness": 3},
        "step": {**good, "step": -1},
        "count": {**good, "step": 1},
        "shape": wrong_shape,
        "dtype": wrong_dtype,
        "names": missing,
        "not a mapping": [1, 2],
    }


BAD_STATE_CASES = ("missing key", "extra key", "staleness", "step", "count", "shape", "dtype", "names", "not a mapping")


@pytest.mark.parametrize("case", BAD_STATE_CASES)
def test_a_bad_state_dict_raises_and_changes_nothing(case):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    conadv = ConAdv(model, loss_fn, epsilon=0.2, staleness=2)
    run_steps(model, optimizer, conadv, batches(3))
    good = conadv.state_dict()
    other = ConAdv(make_model(4), loss_fn, epsilon=0.2, staleness=2)
    run_steps(other.model, torch.optim.SGD(other.model.parameters(), lr=0.1), other, batches(1))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError):
        other.load_state_dict(bad_states(good)[case])
    after = other.state_dict()
    assert after["step"] == before["step"] == 1 and len(after["snapshots"]) == 1
    for a, b in zip(after["snapshots"][0].values(), before["snapshots"][0].values()):
        assert torch.equal(a, b)


def test_grad_scaler_gives_the_unscaled_step_and_skips_on_overflow():
    data = batches(3)
    runs = {}
    for name, scaler in {"plain": None, "scaled": torch.amp.GradScaler("cpu", init_scale=2.0**12)}.items():
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        conadv = ConAdv(model, loss_fn, epsilon=0.2, staleness=1)
        for x, y in data:
            optimizer.zero_grad()
            losses = conadv.backward(x, y, scaler=scaler)
            assert int(losses.nonfinite_inputs) == 0
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
        runs[name] = model
    # Power-of-two scales are exact: the scaled run is the plain run.
    for a, b in zip(runs["plain"].state_dict().values(), runs["scaled"].state_dict().values()):
        assert torch.equal(a, b)

    # A loss times the scale past fp32's range: input gradients overflow (no perturbation step, and
    # counted), the parameter gradients too, so scaler.step skips the update and the scale comes down.
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    conadv = ConAdv(model, lambda output, target: 1e30 * loss_fn(output, target), epsilon=0.2, staleness=0)
    x, y = data[0]
    assert torch.equal(conadv.perturb(x, y, scaler=scaler), x)
    losses = conadv.backward(x, y, scaler=scaler)
    assert int(losses.nonfinite_inputs) == len(x) and math.isfinite(float(losses.loss))
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**99
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, before[name])


def test_runs_under_bfloat16_autocast():
    model, (x, y) = make_model(), batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conadv = ConAdv(model, loss_fn, epsilon=0.2, staleness=0)
        x_adv = conadv.perturb(x, y)
        losses = conadv.backward(x, y)
    assert x_adv.dtype == x.dtype and torch.isfinite(x_adv).all() and not torch.equal(x_adv, x)
    assert math.isfinite(float(losses.loss)) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"epsilon": True}, "epsilon"),
        ({"norm": "l1"}, "norm"),
        ({"staleness": -1}, "staleness"),
        ({"staleness": 1.0}, "staleness"),
        ({"steps": 0}, "steps"),
        ({"step_size": float("nan")}, "step_size"),
        ({"adversarial_weight": 0.0}, "adversarial_weight"),
        ({"adversarial_weight": 1.5}, "adversarial_weight"),
        ({"input_range": (1.0, 0.0)}, "input_range"),
        ({"input_range": (0.0, 1.0, 2.0)}, "input_range"),
        ({"input_range": ("a", 1.0)}, "input_range"),
        ({"batchnorm": "ghost"}, "batchnorm"),
        ({"adversarial_updates_buffers": 1}, "adversarial_updates_buffers"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConAdv(make_model(), loss_fn, **{"epsilon": 0.1, **kwargs})


def test_batchnorm_mode_and_model_must_agree():
    with pytest.raises(ValueError, match=r"without an adversarial twin: \['1'\].*convert_to_auxiliary_batchnorm"):
        ConAdv(plain_model(), loss_fn, epsilon=0.1)
    with pytest.raises(ValueError, match="AuxiliaryBatchNorm"):
        ConAdv(make_model(), loss_fn, epsilon=0.1, batchnorm="shared")
    with pytest.raises(ValueError, match="BatchNorm module"):
        AuxiliaryBatchNorm(nn.Linear(2, 2))
    # Without BatchNorm both modes are the same step.
    for mode in ("auxiliary", "shared"):
        ConAdv(plain_model(batchnorm=False), loss_fn, epsilon=0.1, batchnorm=mode)


def test_a_model_in_eval_mode_raises_and_takes_no_step():
    model, (x, y) = make_model(), batches(1)[0]
    conadv = ConAdv(model, loss_fn, epsilon=0.1)
    model.eval()
    with pytest.raises(ValueError, match="eval mode"):
        conadv.backward(x, y)
    assert conadv.state_dict()["step"] == 0 and all(p.grad is None for p in model.parameters())
