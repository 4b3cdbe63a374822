"""check_fused_supported and the errors a user meets when the fused path cannot run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from largebatch.fused import check_fused_supported

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unsupported_dtypes_are_named():
    with pytest.raises(RuntimeError, match="float64"):
        check_fused_supported([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])


def test_missing_triton_is_explained(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="needs Triton"):
        check_fused_supported([torch.zeros(2)])


def test_unknown_attribute_is_an_attribute_error():
    import largebatch.fused

    with pytest.raises(AttributeError, match="fused_sgd"):
        largebatch.fused.fused_sgd  # noqa: B018


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error():
    """In a process without TRITON_INTERPRET, CPU tensors are refused by the check (which the
    optimizers run in __init__), by the optimizer classes and by the step functions alike."""
    script = textwrap.dedent(
        """
        import torch
        from largebatch import LAMB, LARS, Adan
        from largebatch.fused import check_fused_supported, fused_lars

        def message(call):
            try:
                call()
            except RuntimeError as error:
                return str(error)
            return "no error"

        param = torch.zeros(3, requires_grad=True)
        print(message(lambda: check_fused_supported([param])))
        for cls in (LAMB, LARS, Adan):
            print(message(lambda: cls([param], fused=True)))
        print(message(lambda: fused_lars(
            [param.detach()], [torch.ones(3)], None, [torch.zeros(())], lr=0.1, momentum=0.0, dampening=0.0,
            nesterov=False, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8, trust_clip=False, adapt=True,
            lr_in_momentum=False, maximize=False, grad_scale=None, found_inf=None)))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5
    for line in lines:
        assert "TRITON_INTERPRET=1" in line and "CPU" in line, line
