"""bench/cpu_step.py's accounting on tiny layouts (no timing asserted): the bytes an op moves, the
peak of a step's temporaries, our steps' bytes per parameter against the minimum and against the
passes they are written to make, and the float64 agreement check."""

from __future__ import annotations

import pytest
import torch

from bench import cpu_step
from bench.shapes import bert_shapes, resnet50_shapes

N = 1000  # elements of the test tensors (4000 bytes in fp32)


def traffic_of(fn) -> cpu_step.Traffic:
    with cpu_step.Traffic() as traffic:
        fn()
    return traffic


def test_traffic_counts_reads_and_writes_of_each_op():
    a, b = torch.ones(N), torch.ones(N)
    assert traffic_of(lambda: a.add_(b)).bytes == 12 * N  # reads a, b; writes a
    assert traffic_of(lambda: a.sqrt()).bytes == 8 * N  # reads a; writes a new tensor
    assert traffic_of(lambda: a.addcmul_(b, b)).bytes == 12 * N  # b passed twice is read once
    assert traffic_of(lambda: a.copy_(b)).bytes == 8 * N  # a is only written
    assert traffic_of(lambda: torch.add(a, b, out=a)).bytes == 12 * N
    assert traffic_of(lambda: torch._foreach_mul_([a, b], 2.0)).bytes == 16 * N
    assert traffic_of(lambda: a.view(10, 100).t()).bytes == 0  # views move nothing


def test_traffic_peak_is_the_most_created_bytes_alive_at_once():
    a = torch.ones(N)

    def two_temporaries_then_one():
        x = a * 2
        y = a * 3
        del x, y
        return a + 1

    traffic = traffic_of(two_temporaries_then_one)
    assert traffic.peak == 2 * 4 * N
    assert traffic_of(lambda: a.mul_(2)).peak == 0  # in place: nothing created


def tiny_rows(family: str) -> list[cpu_step.Impl]:
    return [r for r in cpu_step.implementations([]) if r.family == family and r.kind == "ours"]


# The passes each step is written to make, in fp32 bytes per parameter (see the step bodies),
# plus a byte of slack for the per-tensor scalars (norms, counters) of these small tensors.
WRITTEN_BYTES = {"LAMB": 92, "LARS": 52, "Adan": 132}


@pytest.mark.parametrize("family", list(cpu_step.MIN_BYTES_PER_PARAM))
def test_our_steps_move_no_more_bytes_than_their_passes(family):
    shapes = [(64, 64), (4096,), (16, 8, 3, 3)]
    for row in tiny_rows(family):
        params = cpu_step.make_params(shapes)
        optimizer = row.make(params)
        optimizer.step()
        accounting = cpu_step.account(optimizer, params)
        assert cpu_step.MIN_BYTES_PER_PARAM[family] <= accounting.bytes_per_param <= WRITTEN_BYTES[family] + 1, row.label
        assert 0 <= accounting.peak_extra_bytes


def test_agreement_check_passes_for_the_same_update_and_fails_for_another():
    shapes = bert_shapes(layers=1, hidden=4, vocab=8, positions=4) + resnet50_shapes(1, 3)[:6]
    rows = [r for r in cpu_step.implementations([]) if r.family in cpu_step.MIN_BYTES_PER_PARAM]
    worst = cpu_step.check_agreement(rows, shapes, steps=2)
    assert set(worst) == set(cpu_step.MIN_BYTES_PER_PARAM) and all(v < 1e-10 for v in worst.values())
    assert set(cpu_step.check_agreement([r for r in rows if r.family == "LARS"], shapes, steps=1)) == {"LARS"}

    other = cpu_step.Impl("LAMB", "ours, other lr", lambda p: cpu_step.LAMB(p, **dict(cpu_step.LAMB_HYPER, lr=2e-3)), "ours")
    with pytest.raises(AssertionError):
        cpu_step.check_agreement([*rows, other], shapes, steps=2)


def test_table_reports_ratios_to_the_best_peer():
    impl = lambda label, kind: cpu_step.Impl("LAMB", label, lambda p: None, kind)  # noqa: E731
    accounting = cpu_step.Accounting(96.0, 2**20)
    measured = [
        cpu_step.Measured(impl("ours", "ours"), 8.0, accounting),
        cpu_step.Measured(impl("peer a", "peer"), 10.0, accounting),
        cpu_step.Measured(impl("peer b", "peer"), 20.0, accounting),
    ]
    lines = cpu_step.table(measured)
    assert "| LAMB | ours | 8.0 | **0.80** | 96 (40) | 1.0 |" in lines
    assert "| LAMB | peer b | 20.0 | 2.00 | 96 (40) | 1.0 |" in lines
    wrapped = cpu_step.Measured(cpu_step.Impl("LAMB", "wrapped", lambda p: None, "ours", "peer b"), 22.0, accounting)
    assert "| LAMB | wrapped | 22.0 | **1.10** | 96 (40) | 1.0 |" in cpu_step.table([*measured, wrapped])
