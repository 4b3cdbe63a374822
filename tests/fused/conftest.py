"""tests/fused: the Triton kernels, run by the interpreter on CPU tensors (TRITON_INTERPRET=1,
which must be set before triton is imported: `TRITON_INTERPRET=1 python -m pytest tests/fused`),
or compiled on CUDA tensors when the variable is unset and a GPU is present.

Every test here runs with small chunks (see `_fused_cases.TEST_CHUNKING`): an interpreted program
costs milliseconds whatever its size, and small chunks give multi-chunk tensors and tail chunks
with small tensors.
"""

import pytest

from _fused_cases import TEST_CHUNKING
from largebatch.fused import chunking


@pytest.fixture(autouse=True, scope="module")
def _small_chunks():
    # Module scope: hypothesis rejects function-scoped fixtures around @given tests.
    with chunking(TEST_CHUNKING):
        yield
