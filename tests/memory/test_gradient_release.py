"""Gradient release (largebatch.memory): in fp32 it gives the parameters and states of backward()
then step(), bit for bit, on every path; what it cannot do exactly it refuses before anything
changes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch import AGVM, LAMB, LARS, AdaGradNorm, Adan
from largebatch.memory import prepare_for_gradient_release
from optimizers._cases import ADAGRAD_NORM_CASE, ADAN_CASE, IGNORE_NO_ADAPTATION_WARNING, LAMB_CASE, LARS_CASE
from optimizers._cases import make_param, shape_specs

pytestmark = pytest.mark.filterwarnings(IGNORE_NO_ADAPTATION_WARNING)

PER_TENSOR_CASES = [LAMB_CASE, LARS_CASE, ADAN_CASE]


class Tensors(nn.Module):
    """A model that is a list of parameters; micro-batch k's loss reaches the ones `reach[k]` lists."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in params])

    def loss(self, targets: list[torch.Tensor], reach: list[bool]) -> torch.Tensor:
        # gradient target + p·|target|: depends on the parameter, so the steps compound
        terms = [(p * t).sum() + 0.5 * (p * p * t.abs()).sum() for p, t, r in zip(self.weights, targets, reach) if r]
        return torch.stack(terms).sum()


def _groups(case, model: Tensors) -> list[dict]:
    if case is ADAGRAD_NORM_CASE:  # one accumulator per tensor: the only AdaGrad-Norm release takes
        return [{"params": [p]} for p in model.weights]
    return [{"params": list(model.weights)}]


def _train(case, hyper, params, schedule, options, release: bool):
    """`schedule`: per step, per micro-batch, (targets, reach). Returns the model and optimizer."""
    model = Tensors(params)
    optimizer = case.cls(_groups(case, model), **case.to_kwargs(hyper), **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t))
    handle = prepare_for_gradient_release(model, optimizer) if release else None
    for micro_batches in schedule:
        for k, (targets, reach) in enumerate(micro_batches):
            if handle is None:
                model.loss(targets, reach).backward()
            else:
                with handle.accumulating(k < len(micro_batches) - 1):
                    model.loss(targets, reach).backward()
        if handle is None:
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
    return model, optimizer


def _assert_identical(reference, released) -> None:
    (ref_model, ref_opt), (rel_model, rel_opt) = reference, released
    for p, q in zip(ref_model.weights, rel_model.weights):
        assert torch.equal(p, q), (p - q).abs().max()
        assert q.grad is None  # released
    _assert_same_state(ref_opt.state_dict(), rel_opt.state_dict())


def _assert_same_state(expected: dict, actual: dict) -> None:
    assert expected["param_groups"] == actual["param_groups"]
    assert expected["state"].keys() == actual["state"].keys()
    for index, state in expected["state"].items():
        assert state.keys() == actual["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(value, actual["state"][index][key]), (index, key)


@st.composite
def runs(draw, case):
    """Parameters of drawn shapes and a schedule of steps of 1-3 micro-batches; a micro-batch may
    skip tensors, so some get their gradient only from micro-batches before the last."""
    hyper = draw(case.hyper)
    if "max_grad_norm" in hyper:
        hyper["max_grad_norm"] = None  # global clipping is refused (test_refused_optimizers)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = [make_param(kind, shape, rng, torch.float32) for kind, shape in draw(st.lists(shape_specs, min_size=1, max_size=4))]
    micro = draw(st.integers(1, 3))

    def reach() -> list[bool]:
        reached = draw(st.lists(st.booleans(), min_size=len(params), max_size=len(params)))
        reached[draw(st.integers(0, len(params) - 1))] = True  # every backward reaches something
        return reached

    schedule = [
        [([torch.from_numpy(rng.standard_normal(p.shape)).float() for p in params], reach()) for _ in range(micro)]
        for _ in range(draw(st.integers(1, 3)))
    ]
    return hyper, params, schedule


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("case", [*PER_TENSOR_CASES, ADAGRAD_NORM_CASE], ids=lambda c: c.name)
@settings(max_examples=30)
@given(data=st.data())
def test_release_is_bit_identical_to_backward_then_step(case, foreach, data):
    hyper, params, schedule = data.draw(runs(case))
    options = {"foreach": foreach}
    reference = _train(case, hyper, params, schedule, options, release=False)
    _assert_identical(reference, _train(case, hyper, params, schedule, options, release=True))


@pytest.mark.slow
@pytest.mark.parametrize("state_dtype", [None, "8bit"])
@pytest.mark.parametrize("case", PER_TENSOR_CASES, ids=lambda c: c.name)
@settings(max_examples=6)
@given(data=st.data())
def test_fused_release_is_bit_identical(case, state_dtype, data):
    from largebatch.fused import Chunking, chunking
    from largebatch.fused._engine import INTERPRETED

    if not INTERPRETED:
        pytest.skip("the fused kernels run on CPU tensors only under TRITON_INTERPRET=1")
    hyper, params, schedule = data.draw(runs(case))
    hyper["maximize"] = False  # a fused step takes maximize too; fewer draws keep this test short
    hyper["state_dtype"] = state_dtype
    if state_dtype:  # fused 8-bit states need contiguous parameters (tests/fused/test_fused_quantised.py)
        assume(all(p.is_contiguous() for p in params))
    # Several chunks per tensor; 8-bit states need chunks of whole 256-element blocks.
    with chunking(Chunking(chunk_size=256 if state_dtype else 16, num_warps=1)):
        reference = _train(case, hyper, params, schedule, {"fused": True}, release=False)
        _assert_identical(reference, _train(case, hyper, params, schedule, {"fused": True}, release=True))


# --------------------------------------------------------------------------- the handle


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _loss(model: nn.Module) -> torch.Tensor:
    return model(torch.ones(3, 4)).square().mean()


def test_remove_restores_backward_then_step():
    model = _mlp()
    optimizer = LAMB(model.parameters(), lr=0.1)
    with prepare_for_gradient_release(model, optimizer) as release:
        _loss(model).backward()
        assert all(p.grad is None for p in model.parameters())
        with pytest.raises(RuntimeError, match=r"step\(\) was called while gradient release is active"):
            optimizer.step()
    release.remove()  # idempotent
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.step()
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_accumulating_keeps_gradients_and_steps_nothing():
    model = _mlp()
    optimizer = Adan(model.parameters(), lr=0.1)
    release = prepare_for_gradient_release(model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    with release.accumulating():
        _loss(model).backward()
        with release.accumulating(False):  # nested: this one steps
            pass
        _loss(model).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is not None for p in model.parameters())
    assert not optimizer.state
    with pytest.raises(ValueError, match="Invalid enabled"):
        with release.accumulating(torch.tensor(True)):
            pass


def test_a_frozen_parameter_given_a_gradient_by_hand_is_stepped_as_step_would():
    def run(release: bool) -> list[torch.Tensor]:
        model = _mlp()
        model[2].bias.requires_grad_(False)
        optimizer = LAMB(model.parameters(), lr=0.1)
        if release:
            prepare_for_gradient_release(model, optimizer)
        model[2].bias.grad = torch.ones(1)
        _loss(model).backward()
        if not release:
            optimizer.step()
        return list(model.parameters())

    assert all(torch.equal(p, q) for p, q in zip(run(False), run(True)))


def test_frozen_parameters_are_left_alone():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    optimizer = LARS(model.parameters(), lr=0.1)
    prepare_for_gradient_release(model, optimizer)
    frozen = model[0].bias.detach().clone()
    _loss(model).backward()
    assert torch.equal(model[0].bias, frozen) and model[0].bias not in optimizer.state
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda ps: LAMB(ps, max_grad_norm=1.0), "Invalid max_grad_norm in param_groups\\[0\\]"),
        (lambda ps: Adan(ps, max_grad_norm=1.0), "Invalid max_grad_norm in param_groups\\[0\\]"),
        (lambda ps: AdaGradNorm(ps), "Invalid param_groups\\[0\\] of AdaGradNorm: 4 parameters share one accumulator"),
        (lambda ps: LAMB(ps, differentiable=True), "Invalid differentiable"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "gradient release steps LAMB, LARS, Adan, AdaGradNorm, got SGD"),
        (lambda ps: AGVM(LARS([{"params": ps, "agvm_module": "all"}], lr=0.1)), "AGVM sets each module's"),
        (lambda ps: LARS([{"params": ps, "agvm_module": "all"}], lr=0.1), "it belongs to an AGVM"),
    ],
)
def test_refused_optimizers(build, match):
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        prepare_for_gradient_release(model, build(list(model.parameters())))


@pytest.mark.parametrize("module", [nn.Embedding(5, 3, sparse=True), nn.EmbeddingBag(5, 3, sparse=True)])
def test_refuses_a_sparse_embedding_before_registering_anything(module):
    model = nn.Sequential(module, nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"Invalid model: 0 \(Embedding(Bag)?\) has sparse=True"):
        prepare_for_gradient_release(model, LAMB(model.parameters()))
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_refuses_step_hooks_it_would_never_run():
    model = _mlp()
    optimizer = LAMB(model.parameters())
    optimizer.register_step_post_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"0 step pre-hook\(s\) and 1 post-hook\(s\)"):
        prepare_for_gradient_release(model, optimizer)


def test_refuses_a_second_release_of_one_optimizer():
    model = _mlp()
    optimizer = LARS(model.parameters(), lr=0.1)
    first = prepare_for_gradient_release(model, optimizer)
    with pytest.raises(ValueError, match="already prepared for gradient release"):
        prepare_for_gradient_release(model, optimizer)
    first.remove()
    prepare_for_gradient_release(model, optimizer).remove()


def _unchanged_after(model: nn.Module, optimizer, error: type[Exception], match: str) -> None:
    """backward raises at its first hook, before any parameter or state changes."""
    params, state = copy.deepcopy((list(model.parameters()), optimizer.state_dict()))
    with pytest.raises(error, match=match):
        _loss(model).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params))
    _assert_same_state(state, optimizer.state_dict())


def test_options_set_after_prepare_are_refused_before_anything_steps():
    model = _mlp()
    optimizer = LAMB(model.parameters(), lr=0.1)
    prepare_for_gradient_release(model, optimizer)
    _loss(model).backward()  # a first released step
    optimizer.param_groups[0]["max_grad_norm"] = 1.0
    _unchanged_after(model, optimizer, ValueError, "Invalid max_grad_norm")
    optimizer.param_groups[0]["max_grad_norm"] = None
    optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    _unchanged_after(model, optimizer, ValueError, "the optimizer's parameters changed")


def test_refuses_a_frozen_parameter_that_requires_grad_later():
    model = _mlp()
    model[2].bias.requires_grad_(False)
    optimizer = LAMB(model.parameters(), lr=0.1)
    prepare_for_gradient_release(model, optimizer)
    model[2].bias.requires_grad_(True)
    _unchanged_after(model, optimizer, ValueError, "a frozen parameter that now requires grad")


def test_non_reentrant_checkpointing_is_exact():
    from torch.utils.checkpoint import checkpoint

    def run(release: bool) -> list[torch.Tensor]:
        model = _mlp()
        optimizer = LARS(model.parameters(), lr=0.1, momentum=0.9)
        if release:
            prepare_for_gradient_release(model, optimizer)
        for _ in range(2):
            checkpoint(model, torch.ones(3, 4), use_reentrant=False).square().mean().backward()
            if not release:
                optimizer.step()
                optimizer.zero_grad()
        return list(model.parameters())

    assert all(torch.equal(p, q) for p, q in zip(run(False), run(True)))


def test_readme_example_runs_and_equals_accumulation_then_step():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Memory: gradient release\n") :]
    (example,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 10)], re.S)
    torch.manual_seed(0)
    loader = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(3)]
    reference, model = _mlp(), _mlp()
    optimizer = LAMB(reference.parameters(), lr=1e-3, weight_decay=0.01)
    for x, y in loader:
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            nn.functional.mse_loss(reference(xs), ys).backward()
        optimizer.step()
        optimizer.zero_grad()
    namespace = {"model": model, "loader": loader, "loss_fn": nn.functional.mse_loss}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["opt"].state[model[0].weight]["step"].item() == len(loader)
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), model.parameters()))
