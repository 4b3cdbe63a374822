"""CUDA graphs: a fused step captured with torch.cuda.graph and replayed equals eager steps.

CUDA only (compiled kernels; skipped under TRITON_INTERPRET=1 and without a GPU). What makes a
step capturable is checked on the CPU too (test_fused_plans.py): in steady state a step builds no
plan and uploads nothing, and the lr is read on the device when it is a tensor.
"""

from __future__ import annotations

import pytest
import torch

from largebatch import LAMB, LARS, Adan
from largebatch.fused._engine import INTERPRETED

pytestmark = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="CUDA graphs need compiled kernels on a CUDA GPU"
)

SHAPES = [(1024, 33), (4097,), (7, 5), ()]
OPTIMIZERS = {
    "lamb": lambda params, lr: LAMB(params, lr=lr, weight_decay=0.01, fused=True, capturable=True),
    "lamb+clip": lambda params, lr: LAMB(params, lr=lr, max_grad_norm=1.0, fused=True, capturable=True),
    "lars": lambda params, lr: LARS(params, lr=lr, momentum=0.9, nesterov=True, fused=True, capturable=True),
    "adan": lambda params, lr: Adan(params, lr=lr, max_grad_norm=1.0, fused=True, capturable=True),
}
WARMUP, REPLAYS = 3, 10


def _grads(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=generator).cuda() for s in SHAPES]


@pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_captured_steps_replay_like_eager_steps(make):
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(s, generator=generator).cuda() for s in SHAPES]
    eager_params = [torch.nn.Parameter(t.clone()) for t in initial]
    graph_params = [torch.nn.Parameter(t.clone()) for t in initial]
    eager = make(eager_params, torch.tensor(0.01, device="cuda"))
    lr = torch.tensor(0.01, device="cuda")  # under capture the lr must live on the device
    captured = make(graph_params, lr)
    for p in graph_params:
        p.grad = torch.zeros_like(p)  # static gradients, refilled before every replay

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP):  # warm-up: compiles the kernels, builds the plans
            for p, g in zip(graph_params, _grads(step)):
                p.grad.copy_(g)
            captured.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()

    for step in range(WARMUP):
        for p, g in zip(eager_params, _grads(step)):
            p.grad = g
        eager.step()
    for step in range(WARMUP, WARMUP + REPLAYS):
        grads = _grads(step)
        for p, g in zip(graph_params, grads):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager_params, grads):
            p.grad = g
        eager.step()
    torch.cuda.synchronize()
    for e, c in zip(eager_params, graph_params):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    for e, c in zip(eager_params, graph_params):
        assert float(captured.state[c]["step"]) == float(eager.state[e]["step"]) == WARMUP + REPLAYS
