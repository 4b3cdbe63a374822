"""A saved `step` of another dtype or device loads, and training continues as if uninterrupted.

torch's `Optimizer.load_state_dict` moves every state tensor to its parameter's device and dtype
except `step`, which it moves to the parameter's device as float32 only for capturable or fused
groups (`_process_value_according_to_param_policy`); largebatch's `__setstate__` turns a
plain-number step (older checkpoints, hand-made states) into a tensor. These tests check that
together this is enough: for every form a step may arrive in, the loaded optimizer continues
on the trajectory of one that was never saved. (That capturable steps compute the oracle's
numbers on every path is tested in tests/optimizers/test_against_oracle.py.)
"""

from __future__ import annotations

import io

import pytest
import torch

from largebatch.optimizers import LAMB, LARS, AdaGradNorm, Adan

OPTIMIZERS = {
    "LAMB": lambda params, **kw: LAMB(params, lr=0.01, weight_decay=0.01, **kw),
    "LARS": lambda params, **kw: LARS(params, lr=0.1, weight_decay=0.01, **kw),
    "Adan": lambda params, **kw: Adan(params, lr=0.01, weight_decay=0.01, **kw),
    "AdaGradNorm": lambda params, **kw: AdaGradNorm(params, lr=0.1, **kw),
}
# The forms a saved step takes: torch's float32, older/hand-written checkpoints, other frameworks.
STEP_FORMS = {
    "float32": lambda n: torch.tensor(float(n)),
    "float64": lambda n: torch.tensor(float(n), dtype=torch.float64),
    "int64": lambda n: torch.tensor(n),
    "int": lambda n: n,
    "float": lambda n: float(n),
}
STEPS_BEFORE, STEPS_AFTER = 3, 3


def gradients(shapes, steps, device):
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=generator, dtype=torch.float64).to(device) for s in shapes] for _ in range(steps)]


def run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def save_with_step_form(optimizer, form):
    state_dict = optimizer.state_dict()
    for state in state_dict["state"].values():
        state["step"] = STEP_FORMS[form](int(state["step"].item()))
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def check_resumes(name, form, capturable, foreach, save_device, load_device):
    shapes = [(3, 2), (4,)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(0), dtype=torch.float64) for s in shapes]
    grads = gradients(shapes, STEPS_BEFORE + STEPS_AFTER, "cpu")
    settings = dict(capturable=capturable, foreach=foreach)

    reference = [p.clone().to(load_device).requires_grad_() for p in init]
    uninterrupted = OPTIMIZERS[name](reference, **settings)
    run(uninterrupted, reference, [[g.to(load_device) for g in gs] for gs in grads])

    first = [p.clone().to(save_device).requires_grad_() for p in init]
    saving = OPTIMIZERS[name](first, **settings)
    run(saving, first, [[g.to(save_device) for g in gs] for gs in grads[:STEPS_BEFORE]])
    saved = save_with_step_form(saving, form)

    resumed_params = [p.detach().clone().to(load_device).requires_grad_() for p in first]
    resumed = OPTIMIZERS[name](resumed_params, **settings)
    resumed.load_state_dict(torch.load(io.BytesIO(saved), map_location=load_device))
    run(resumed, resumed_params, [[g.to(load_device) for g in gs] for gs in grads[STEPS_BEFORE:]])

    for got, expected in zip(resumed_params, reference):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    for p in resumed_params:
        step = resumed.state[p]["step"]
        assert torch.is_tensor(step) and step.item() == STEPS_BEFORE + STEPS_AFTER
        if capturable:  # torch's policy: float32, on the parameter's device
            assert step.dtype == torch.float32 and step.device == p.device


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("capturable", [False, True], ids=["cpu_step", "capturable"])
@pytest.mark.parametrize("form", sorted(STEP_FORMS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumes_whatever_form_the_step_was_saved_in(name, form, capturable, foreach):
    # An int64 step (torch.optim.Adam fails on it with foreach) is re-created as float32 on load.
    check_resumes(name, form, capturable, foreach, save_device="cpu", load_device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move states across devices")
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("capturable", [False, True], ids=["cpu_step", "capturable"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumes_on_another_device_after_map_location(name, capturable, foreach):
    """Saved on the CPU, loaded with map_location="cuda": a non-capturable step arrives on the GPU."""
    check_resumes(name, "float32", capturable, foreach, save_device="cpu", load_device="cuda")
