"""The kernels compile for an H100 (sm_90) — front end, LLVM, ptxas — with vectorised loads.

The interpreter (how the other tests run) accepts code a GPU compile would reject, and says
nothing about vectorisation; this compiles without needing a GPU. It runs _compile_kernels.py in
a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="this triton build has no NVIDIA backend"
)
def test_every_kernel_variant_compiles_for_sm90_with_vector_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "_compile_kernels.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    variants = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(variants) >= 16
    failed = {v["name"]: v["error"] for v in variants if v["error"]}
    assert not failed, failed
    # Every chunk kernel's aligned full-chunk path loads 16-byte vectors (the per-tensor passes,
    # segment sums, step counts and the clipping coefficient, read a few kilobytes and need not).
    per_tensor = ("segment sums", "clip coefficient", "lamb count", "adan count")
    scalar_only = [v["name"] for v in variants if not v["name"].startswith(per_tensor) and v["vector_loads"] == 0]
    assert not scalar_only, scalar_only
