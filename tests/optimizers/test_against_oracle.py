"""Each optimizer, every implementation, against the float64 numpy transcription of its equations."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _cases import CASE_IDS, CASES, IGNORE_NO_ADAPTATION_WARNING, make_grads, make_param, run_torch, shape_specs
from largebatch import LARS
from oracles.numpy_optimizers import lars as lars_oracle

pytestmark = pytest.mark.filterwarnings(IGNORE_NO_ADAPTATION_WARNING)

STEPS = 10
# Fused kernels run on CPU tensors only under the Triton interpreter (or on a CUDA device).
FUSED_RUNS = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
FUSED_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=25)
@given(data=st.data())
def test_matches_numpy_oracle(case, foreach, data):
    hyper = data.draw(case.hyper, label="hyper")
    specs = data.draw(st.lists(shape_specs, min_size=1, max_size=5), label="shapes")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    params = [make_param(kind, shape, rng, torch.float64) for kind, shape in specs]
    grad_steps = make_grads(params, STEPS, rng)

    got = run_torch(case, hyper, params, grad_steps, foreach=foreach)
    want = case.oracle([p.numpy() for p in params], grad_steps, **hyper)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-9, atol=1e-12)


CAPTURABLE_PATHS = [
    pytest.param(case, path, id=f"{case.name}-{path}")
    for case in CASES
    for path in ("per_tensor", "foreach", "fused")
    if path != "fused" or case.cls._has_fused
]


@pytest.mark.parametrize(("case", "path"), CAPTURABLE_PATHS)
@settings(max_examples=8)
@given(data=st.data())
def test_capturable_matches_numpy_oracle(case, path, data):
    """capturable=True keeps `step` (and the bias corrections) as tensors on the parameter's device,
    here the CPU: the numbers must still be the oracle's. Fused (which ignores `capturable`, its
    counters live on the device anyway) in fp32, the others in float64."""
    if path == "fused" and not FUSED_RUNS:
        pytest.skip("the fused kernels need TRITON_INTERPRET=1 or a CUDA device")
    hyper = data.draw(case.hyper, label="hyper")
    # fused needs gradients laid out like their parameters, as autograd makes them: no transposed views here
    shapes = shape_specs.filter(lambda spec: spec[0] != "transposed") if path == "fused" else shape_specs
    specs = data.draw(st.lists(shapes, min_size=1, max_size=4), label="shapes")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = torch.float32 if path == "fused" else torch.float64
    device = FUSED_DEVICE if path == "fused" else "cpu"
    params = [make_param(kind, shape, rng, dtype).to(device) for kind, shape in specs]
    steps = 4 if path == "fused" else STEPS
    grad_steps = make_grads(params, steps, rng)
    options = {"fused": True} if path == "fused" else {"foreach": path == "foreach"}

    got = run_torch(case, hyper, params, grad_steps, capturable=True, **options)
    want = case.oracle([p.cpu().double().numpy() for p in params], grad_steps, **hyper)
    # Capturable bias corrections 1 − β^t come from the float32 counter in float32: near β = 1 and
    # small t, 1 − β^t cancels, and its relative error is up to eps32 / (1 − β^t) ≈ 6e-5 (torch's
    # capturable Adam computes it the same way). That error is relative to each step's size, so it
    # adds up over the steps on parameters of order 1: atol 1e-4. Every mutant of the formula is
    # far outside this.
    tolerance = dict(rtol=2e-4, atol=1e-4)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.cpu().double().numpy(), w, **tolerance)


def test_lars_momentum_forms_differ_only_when_lr_changes():
    """The paper form (lr inside the buffer) equals the default form at constant lr, not when lr moves."""
    rng = np.random.default_rng(0)
    params = [torch.from_numpy(rng.standard_normal((4, 3)))]
    grad_steps = make_grads(params, 6, rng)
    lrs = [0.1, 0.1, 0.5, 0.5, 0.05, 0.05]

    for lr_in_momentum in (False, True):
        p = params[0].clone().requires_grad_()
        opt = LARS([p], lr=lrs[0], lr_in_momentum=lr_in_momentum, weight_decay=0.01)
        for lr, grads in zip(lrs, grad_steps):
            opt.param_groups[0]["lr"] = lr
            p.grad = torch.from_numpy(grads[0])
            opt.step()
        want = lars_oracle([params[0].numpy()], grad_steps, lr=None, lrs=lrs, momentum=0.9, weight_decay=0.01,
                           lr_in_momentum=lr_in_momentum)
        np.testing.assert_allclose(p.detach().numpy(), want[0], rtol=1e-10)

    constant = [lars_oracle([params[0].numpy()], grad_steps, lr=0.1, momentum=0.9, lr_in_momentum=f)[0] for f in (0, 1)]
    np.testing.assert_allclose(constant[0], constant[1], rtol=1e-10)
    varying = [lars_oracle([params[0].numpy()], grad_steps, lr=None, lrs=lrs, momentum=0.9, lr_in_momentum=f)[0]
               for f in (0, 1)]
    assert np.abs(varying[0] - varying[1]).max() > 1e-6
