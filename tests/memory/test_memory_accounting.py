"""bench.memory's accounting: the peak it reports for a known allocation pattern, the bytes per
parameter of real optimizers against their definitions, and gradient release's lower peak (an
allocation count, not a timing) with bit-identical fp32 parameters."""

from __future__ import annotations

import pytest
import torch

from bench.memory import OPTIMIZERS, bytes_per_parameter, peak_allocated_bytes, peak_of_step

MB = 10**6


def test_peak_counts_what_is_live_at_once():
    kept = []

    def pattern() -> None:
        first = torch.empty(MB, dtype=torch.uint8)
        kept.append(torch.empty(2 * MB, dtype=torch.uint8))
        del first  # 3 MB was the peak; the next allocation fits under it
        kept.append(torch.empty(MB // 2, dtype=torch.uint8))

    assert peak_allocated_bytes(pattern) == 3 * MB


def test_measured_bytes_per_parameter_match_the_states_definitions():
    width, depth = 32, 2
    rows = {row["config"]: row for row in bytes_per_parameter(width, depth)}
    numel = depth * (width * width + width) + width + 1
    counters = (2 * depth + 2) * 4 / numel  # one fp32 step counter per tensor
    fp32 = rows["fp32"]
    # weights + full-size states: LAMB m, v; LARS momentum; Adan m, diff, v, previous gradient
    for name, full_states in {"LAMB": 2, "LARS": 1, "Adan": 4}.items():
        assert fp32[name] == pytest.approx(4 + 4 * full_states + counters, rel=1e-12)
    # AdaGrad-Norm: a counter and a 0-dim b² per (one-tensor) group
    assert fp32["AdaGrad-Norm (per tensor)"] == pytest.approx(4 + 2 * counters, rel=1e-12)
    bf16 = rows["bf16 params, bf16 states, kahan_sum=False"]
    assert bf16["LAMB"] == pytest.approx(2 + 2 * 2 + counters, rel=1e-12)
    # kahan_sum (the default for bf16): a bf16 buffer per parameter, counted with the weights
    kahan = rows["bf16 + Kahan (bf16 compensation), bf16 states: the default for bf16 parameters"]
    assert kahan["weights"] == 2 + 2
    for name, full_states in {"LAMB": 2, "LARS": 1, "Adan": 4}.items():
        assert kahan[name] == pytest.approx(2 + 2 + 2 * full_states + counters, rel=1e-12)
    assert kahan["AdaGrad-Norm (per tensor)"] is None  # it has no kahan_sum
    # 8-bit states: a byte per element and a float32 scale per block of 256, per tensor
    scales = sum(4 * -(-n // 256) for n in [width * width, width] * depth + [width, 1]) / numel
    eight_bit = rows["fp32 params, 8-bit states (state_dtype='8bit')"]
    for name, quantised in {"LAMB": 2, "LARS": 1, "Adan": 3}.items():
        prev_grad = 2 if name == "Adan" else 0  # bf16 under "8bit"
        assert eight_bit[name] == pytest.approx(4 + quantised * (1 + scales) + prev_grad + counters, rel=1e-12)
    eight_bit_kahan = rows["bf16 + Kahan (bf16 compensation), 8-bit states (state_dtype='8bit')"]
    assert eight_bit_kahan["LAMB"] == pytest.approx(2 + 2 + 2 * (1 + scales) + counters, rel=1e-12)


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_release_with_8bit_states_changes_no_bit(foreach):
    plain, released = (
        peak_of_step("LAMB", foreach, release, width=128, depth=3, batch=16, state_dtype="8bit") for release in (False, True)
    )
    assert all(map(torch.equal, plain["params"], released["params"]))
    assert plain["peak"] - released["peak"] >= 0.4 * plain["gradients"]


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_release_lowers_the_peak_and_changes_no_bit(name, foreach):
    plain, released = (peak_of_step(name, foreach, release, width=128, depth=3, batch=16) for release in (False, True))
    assert all(map(torch.equal, plain["params"], released["params"]))
    assert released["params_and_states"] == plain["params_and_states"]
    # Without release every gradient is live when step() starts; with it, never all of them.
    assert plain["peak_above"] >= plain["gradients"]
    assert plain["peak"] - released["peak"] >= 0.4 * plain["gradients"]
