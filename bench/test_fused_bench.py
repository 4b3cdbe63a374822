"""pytest-benchmark: one optimizer step of the fused LAMB, LARS and Adan against torch's fused
AdamW and SGD on BERT-large and ResNet-50 parameter shapes (fp32, CUDA only). Run with:

    python -m pytest bench/test_fused_bench.py --benchmark-group-by=param:shapes

`bash bench/gpu_check.sh` gives the same steps (host and device time, as a share of copy
bandwidth, with the targets), after checking the fused steps' correctness on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from bench.report import CANDIDATES, Candidate, parameters_with_grads
from bench.shapes import FULL_SIZE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels are benchmarked on CUDA only")

FUSED = [c for c in CANDIDATES.values() if c.implementation in ("largebatch fused", "torch fused")]
WARMUP_STEPS = 3  # Triton compiles on the first step


@pytest.mark.parametrize("shapes", list(FULL_SIZE))
@pytest.mark.parametrize("candidate", FUSED, ids=lambda c: f"{c.optimizer}-{c.implementation.replace(' ', '-')}")
def test_step(benchmark, shapes: str, candidate: Candidate) -> None:
    device = torch.device("cuda")
    optimizer = candidate.make(parameters_with_grads(FULL_SIZE[shapes], device))
    for _ in range(WARMUP_STEPS):
        optimizer.step()

    def step() -> None:
        optimizer.step()
        torch.cuda.synchronize(device)

    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=1)
