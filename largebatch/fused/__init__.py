"""Fused Triton steps for LAMB, LARS and Adan (`fused=True` in the optimizers).

One multi-tensor engine (`_engine`: chunk and pointer tables, one launch per pass), deterministic
per-tensor norms (`_norms`), and one small module of kernels per optimizer. Arithmetic is fp32
whatever the storage dtype (fp32, bf16, fp16); nothing synchronises with the host, and
GradScaler's `grad_scale`/`found_inf` are applied in-kernel, as torch's fused AdamW does.

Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before this package
is imported), which is how the tests run without a GPU.

The step functions import Triton, so they are loaded on first use: `check_fused_supported`
works (and explains what is missing) without Triton installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from ._engine import Chunking, chunking
    from ._norms import fused_grad_norm
    from .adan import fused_adan
    from .lamb import fused_lamb
    from .lars import fused_lars

__all__ = [
    "Chunking",
    "check_fused_supported",
    "chunking",
    "fused_adan",
    "fused_grad_norm",
    "fused_lamb",
    "fused_lars",
]

_LAZY = {
    "Chunking": "._engine",
    "chunking": "._engine",
    "fused_grad_norm": "._norms",
    "fused_adan": ".adan",
    "fused_lamb": ".lamb",
    "fused_lars": ".lars",
}


def _require_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            "fused=True needs Triton, which is not installed (`pip install triton`; CUDA builds of torch "
            "bring it); use fused=False"
        )


def check_fused_supported(params: Iterable[Tensor]) -> None:
    """Raise RuntimeError, saying why, when the fused kernels cannot step `params`.

    They need Triton; parameters of dtype float32, bfloat16 or float16; and CUDA tensors, or
    CPU tensors when TRITON_INTERPRET=1 was set before largebatch.fused was first imported.
    """
    _require_triton()
    from ._engine import check_device, check_dtype

    for param in params:
        check_dtype(param.dtype)
        check_device(param.device)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _require_triton()
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups (every fused step makes some) skip this function
    return value
