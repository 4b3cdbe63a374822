"""What the tests of largebatch.fused share: the device, the chunking, tensor-list strategies,
and the comparison of fused results with the float64 oracle."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st

from _oracle import Stored
from largebatch.fused import Chunking
from largebatch.fused._engine import INTERPRETED

# Interpreted kernels need CPU tensors, compiled ones CUDA tensors.
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
requires_kernels = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="the fused kernels need TRITON_INTERPRET=1 (set before triton is imported) or a CUDA GPU",
)

# 16 elements per chunk: a tensor of up to 3 chunks + 5 has a tail chunk and a few full ones.
# Two chunks per program: programs whose chunks belong to two tensors, and a last program with
# one chunk past the table when the count is odd.
TEST_CHUNKING = Chunking(chunk_size=16, num_warps=1, chunks_per_program=2)
MAX_NUMEL = 3 * TEST_CHUNKING.chunk_size + 5
STEPS = 5

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Allowed |fused − oracle| per element, in units of the storage dtype's epsilon, relative to the
# element (RELATIVE_ULPS) and to the largest element of the tensor (SCALE_ULPS). fp32: the kernels'
# fp32 arithmetic against float64 over five steps. bf16/fp16: the same values rounded to the
# dtype, plus the odd element that rounds one ulp apart and carries that through later steps.
RELATIVE_ULPS = {torch.float32: 64.0, torch.bfloat16: 4.0, torch.float16: 4.0}
SCALE_ULPS = {torch.float32: 64.0, torch.bfloat16: 2.0, torch.float16: 2.0}
# And the kernels' fp32 arithmetic errs relative to its operands, which cancellation can make far
# larger than a result (β1·m + g' near 0): in fp32 ulps of the largest value in the whole list,
# since every tensor's values are drawn alike.
LIST_SCALE_FP32_ULPS = 64.0


def pairwise_rows(names: tuple[str, ...]) -> list[dict[str, bool]]:
    """At most six settings of up to ten boolean options in which every pair of them takes all four value
    pairs (a covering array of strength 2), for `pytest.mark.parametrize`: each option is run both
    ways, and each combination of two, in 6 runs rather than 2**len(names).

    Column j is the j-th 3-element subset of rows 1..5 (row 0 is all False): two distinct 3-subsets
    of 5 rows meet, and neither contains the other."""
    subsets = list(itertools.combinations(range(1, 6), 3))
    assert len(names) <= len(subsets)
    rows = [{name: row in subset for name, subset in zip(names, subsets)} for row in range(6)]
    return [row for i, row in enumerate(rows) if row not in rows[:i]]  # with few options, rows repeat


def pairwise_settings(*names: str) -> pytest.MarkDecorator:
    """`pytest.mark.parametrize` of a `flags` dict over `pairwise_rows(names)`, ids naming the True ones."""
    return pytest.mark.parametrize(
        "flags", pairwise_rows(names), ids=lambda row: "-".join(name for name in names if row[name]) or "none"
    )


def _shapes() -> st.SearchStrategy[tuple[int, ...]]:
    numel = st.integers(1, MAX_NUMEL)
    return st.one_of(
        st.just(()),
        st.just((0,)),
        numel.map(lambda n: (n,)),
        st.tuples(st.integers(1, 7), st.integers(1, 7)),
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    )


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    state_dtype: torch.dtype


@st.composite
def tensor_specs(draw: st.DrawFn, max_tensors: int = 40) -> list[TensorSpec]:
    """1 to `max_tensors` tensors: one dtype for all or a mix; states in fp32 or the param dtype."""
    mixed = draw(st.booleans())
    common = draw(st.sampled_from(DTYPES))
    fp32_states = draw(st.booleans())
    # The count uniformly (a plain st.lists rarely draws more than a dozen): long lists matter.
    count = draw(st.integers(1, max_tensors))
    specs = []
    for shape in draw(st.lists(_shapes(), min_size=count, max_size=count)):
        dtype = draw(st.sampled_from(DTYPES)) if mixed else common
        specs.append(TensorSpec(shape, dtype, torch.float32 if fp32_states else dtype))
    return specs


def random_tensors(specs: list[TensorSpec], generator: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    return [(scale * torch.randn(s.shape, generator=generator, dtype=torch.float64)).to(s.dtype).to(DEVICE) for s in specs]


def zeros(specs: list[TensorSpec]) -> list[torch.Tensor]:
    """Fresh optimizer states, in each spec's state dtype."""
    return [torch.zeros(s.shape, dtype=s.state_dtype, device=DEVICE) for s in specs]


def step_counters(specs: list[TensorSpec]) -> list[torch.Tensor]:
    return [torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in specs]


def stored(tensors: list[torch.Tensor]) -> list[Stored]:
    return [Stored.of(t.cpu()) for t in tensors]


def assert_matches(actual: list[torch.Tensor], expected: list[Stored], what: str) -> None:
    list_scale = max((float(e.value.abs().max()) for e in expected if e.value.numel()), default=0.0)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.value.shape
        if a.numel() == 0:
            continue
        eps = torch.finfo(e.dtype).eps
        scale = e.value.abs().max()
        tolerance = (
            RELATIVE_ULPS[e.dtype] * eps * e.value.abs()
            + SCALE_ULPS[e.dtype] * eps * scale
            + LIST_SCALE_FP32_ULPS * torch.finfo(torch.float32).eps * list_scale
        )
        error = (a.cpu().double() - e.value).abs()
        assert bool((error <= tolerance).all()), (
            f"{what}[{i}] ({e.dtype}, {tuple(a.shape)}): max error {float(error.max()):.3g}, "
            f"max |expected| {float(scale):.3g}"
        )
