"""What the kahan_sum tests of the per-tensor/foreach paths (tests/optimizers/test_kahan.py) and
of the fused path (tests/fused/test_fused_kahan.py) share: runs on bf16/fp16 parameters (with
the odd fp32 one) and the comparison of two paths' parameters and compensated values."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from optimizers._cases import make_grads, make_param, shape_specs

STEPS = 5


def run_steps(case, hyper, params, grad_steps, device="cpu", **options):
    """STEPS steps of `case` on copies of `params` on `device`; returns the optimizer and its
    parameters."""
    copies = [p.to(device, copy=True).requires_grad_() for p in params]
    optimizer = case.cls(copies, **case.to_kwargs(hyper), **options)
    for grads in grad_steps:
        for p, g in zip(copies, grads):
            p.grad = torch.empty_like(p).copy_(torch.from_numpy(g))  # laid out like p, as autograd makes it
        optimizer.step()
    return optimizer, copies


def compensated_value(optimizer, param):
    comp = optimizer.state[param].get("kahan_comp")
    return param.detach().float() if comp is None else param.detach().float() + comp.float()


def assert_kahan_close(actual, expected, start):
    """(optimizer, params) pairs of two paths, from the parameters `start`, agree: each parameter
    to a few ulps of its dtype (the repo's bf16 bound: the paths round differently, and an ulp
    apart carries on), its compensated value p + c to 1/8 ulp of the tensor's largest element
    (the buffers take up what the rounding of p differed by) plus 8 ulps of the distance moved
    (the per-tensor path computes the update in several 16-bit ops, each rounded, the fused one
    in fp32), and both have buffers exactly for the bf16/fp16 parameters."""
    (opt_a, params_a), (opt_e, params_e) = actual, expected
    for a, e, s in zip(params_a, params_e, start):
        assert a.dtype == e.dtype
        low_precision = e.dtype in (torch.bfloat16, torch.float16)
        assert ("kahan_comp" in opt_a.state[a]) == ("kahan_comp" in opt_e.state[e]) == low_precision
        eps = torch.finfo(e.dtype).eps
        scale = float(e.detach().abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(a.detach(), e.detach(), rtol=4 * eps, atol=2 * eps * scale + 1e-6)
        if low_precision:
            compensated = compensated_value(opt_e, e)
            moved = float((compensated - s.to(compensated.device).float()).abs().max()) if e.numel() else 0.0
            atol = eps * scale / 8 + 8 * eps * moved + 1e-6
            torch.testing.assert_close(compensated_value(opt_a, a), compensated, rtol=0, atol=atol)


@st.composite
def kahan_runs(draw, case):
    """Hyper-parameters with a small lr (where compensation matters), bf16/fp16 parameters and
    the odd fp32 one in the same group, and STEPS steps of gradients."""
    hyper = draw(case.hyper)
    hyper["lr"] = draw(st.sampled_from([1e-4, 1e-3, 0.01]))
    if "trust_coefficient" in hyper:
        # LARS with η = 1 steps a one-element tensor to exactly 0 (w − ‖w‖/‖g + λw‖·(g + λw)),
        # where the local rate jumps (r = 1 at ‖w‖ = 0): two paths then part by rounding's sign.
        hyper["trust_coefficient"] = draw(st.sampled_from([1e-3, 0.02]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    if dtype == torch.float16:
        # An eps below fp16's smallest subnormal (6e-8) is 0 in the per-tensor fp16 path, whose
        # update then overflows (inf; NaN once compensated) where the fused one, in fp32, does not.
        hyper["eps"] = max(hyper["eps"], 1e-3)
    specs = draw(st.lists(st.tuples(shape_specs, st.booleans()), min_size=1, max_size=4))
    params = [make_param(kind, shape, rng, torch.float32 if fp32 else dtype) for (kind, shape), fp32 in specs]
    return hyper, params, make_grads(params, STEPS, rng)
