"""Ghost BatchNorm against nn.BatchNorm2d: forward + backward at batch 4096, ghost batches of 128.

The target (issue 5) is at most 1.2× nn.BatchNorm2d on the same input. The ghost forward moves
the batch into the channel dimension, so it pays two transposing copies in each direction on top
of BatchNorm itself. Run with:

    python -m pytest bench/test_ghost_batchnorm_bench.py --benchmark-group-by=param:device,param:layout

Both contiguous and channels_last inputs are measured; a channels_last input is compared with a
channels_last nn.BatchNorm2d (both outputs stay channels_last).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from largebatch.nn import GhostBatchNorm2d

BATCH = 4096
GHOST_BATCH = 128  # the ghost batch size of Hoffer et al.'s experiments
CHANNELS = 16
SPATIAL = 8  # small enough for CPU CI; the channel count and batch carry the ghost overhead

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _forward_backward(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> None:
    x.grad = None
    module(x).backward(upstream)
    if x.is_cuda:
        torch.cuda.synchronize()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["batchnorm", "ghost"])
def test_forward_backward(benchmark, device: str, kind: str, layout: str) -> None:
    torch.manual_seed(0)
    if kind == "ghost":
        module = GhostBatchNorm2d(CHANNELS, ghost_batch_size=GHOST_BATCH)
    else:
        module = nn.BatchNorm2d(CHANNELS)
    module = module.to(device)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(BATCH, CHANNELS, SPATIAL, SPATIAL, device=device).to(memory_format=memory_format)
    x.requires_grad_()
    upstream = torch.randn_like(x)  # in x's memory format
    benchmark.group = f"ghost-batchnorm-{device}-{layout}"
    benchmark.extra_info.update(batch=BATCH, ghost_batch=GHOST_BATCH, channels=CHANNELS, spatial=SPATIAL)
    benchmark.pedantic(_forward_backward, args=(module, x, upstream), rounds=10, warmup_rounds=2)
    assert x.grad is not None and x.grad.shape == x.shape
