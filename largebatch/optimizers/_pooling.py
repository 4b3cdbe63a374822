"""A fused group's states, pooled: each state key's tensors as views of one buffer.

A fused step checks, every step, that the optimizer's own state tensors are the ones its plan
last checked and that no in-place op touched them since (`largebatch.fused._plan`: identity and
version counter). Views share their base's version counter, and an in-place op on any view bumps
it, so when every tensor of a state key is a view of one buffer the version check of that list
is one read instead of one per tensor: about a fifth of a fused Adan step's host work on
ResNet-50's 161 tensors.

Pooling copies the states into the buffer and puts the views in their place in each
parameter's state dict: values, shapes, strides and dtypes are unchanged, and so is
`state_dict()` (its tensors are the views; `torch.save` writes each buffer once). It runs when a
fused group's states are created and after `load_state_dict`, so a tensor taken from
`optimizer.state` before those points is not the state afterwards. Only states that every
parameter of the list has, all contiguous, of one dtype and device, are pooled; each view starts
on a 16-byte boundary (the kernels' vector loads). DTensor states are left as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._sharding import any_dtensor

__all__ = ["pool_states"]

_ALIGNMENT_BYTES = 16


def pool_states(params: Sequence[Tensor], states: Sequence[dict[str, Any]]) -> None:
    """Re-home, per state key, the tensors of `states` (those of `params`) as views of one buffer."""
    if not states or any_dtensor(params):
        return
    for key in list(states[0]):
        tensors = [state.get(key) for state in states]
        if not all(isinstance(t, Tensor) for t in tensors):
            continue
        first: Tensor = tensors[0]  # type: ignore[assignment]
        if any(t.dtype != first.dtype or t.device != first.device or not t.is_contiguous() for t in tensors):  # type: ignore[union-attr]
            continue
        if any_dtensor(tensors):  # type: ignore[arg-type]
            continue
        align = max(1, _ALIGNMENT_BYTES // first.element_size())
        sizes = [-(-t.numel() // align) * align for t in tensors]  # type: ignore[union-attr]
        buffer = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
        offset = 0
        for state, tensor, size in zip(states, tensors, sizes):
            view = buffer[offset : offset + tensor.numel()].view(tensor.shape)  # type: ignore[union-attr]
            state[key] = view.copy_(tensor)  # type: ignore[arg-type]
            offset += size
