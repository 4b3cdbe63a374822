"""The foreach implementation equals the per-tensor reference on random shapes, dtypes, hyper-parameters."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _cases import CASE_IDS, CASES, IGNORE_NO_ADAPTATION_WARNING, make_grads, make_param, run_torch, shape_specs

pytestmark = pytest.mark.filterwarnings(IGNORE_NO_ADAPTATION_WARNING)

STEPS = 5
# Same operations in the same order, so fp32/fp64 agree to rounding; bf16 (8-bit mantissa) can
# differ by an ulp where the two paths reduce norms in a different order, and that ulp can move
# the next steps a little: the bf16 bound is relative to the parameter scale.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=20)
@given(data=st.data())
def test_foreach_equals_per_tensor(case, dtype, data):
    hyper = data.draw(case.hyper, label="hyper")
    specs = data.draw(st.lists(shape_specs, min_size=1, max_size=6), label="shapes")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    params = [make_param(kind, shape, rng, dtype) for kind, shape in specs]
    grad_steps = make_grads(params, STEPS, rng)

    reference = run_torch(case, hyper, params, grad_steps, foreach=False)
    multi = run_torch(case, hyper, params, grad_steps, foreach=True)
    for r, m in zip(reference, multi):
        assert r.dtype == m.dtype == dtype
        torch.testing.assert_close(m, r, **TOLERANCES[dtype])
