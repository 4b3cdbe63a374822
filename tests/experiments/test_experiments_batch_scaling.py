"""The batch-scaling experiment: its pieces, and its --quick run end to end (tables and plot)."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from largebatch.experiments import batch_scaling as bs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 10**6))
def test_eval_schedule_is_geometric_and_ends_at_the_last_step(total):
    steps = bs.eval_schedule(total)
    assert steps[0] == 1 and steps[-1] == total
    assert all(a < b for a, b in zip(steps, steps[1:]))
    # Each gap is at most a factor r (plus the rounding up to whole steps).
    assert all(b <= math.ceil(a * bs.EVAL_STEP_RATIO) + 1 for a, b in zip(steps, steps[1:]))


def test_steps_to_is_the_first_evaluated_step_at_the_target():
    training = bs.Training("SGD", 32, 0.1, 0, 1.0, 0)
    run = bs.RunResult(training, [1, 2, 5, 9], [0.1, 0.5, 0.45, 0.8], diverged=False, seconds=0.0)
    assert run.steps_to(0.5) == 2
    assert run.steps_to(0.6) == 9
    assert run.steps_to(0.9) is None
    assert run.final_accuracy == 0.8


def test_task_is_reproducible_with_every_class_present():
    task = bs.make_task(2000, 500)
    again = bs.make_task(2000, 500)
    assert torch.equal(task.x_train, again.x_train) and torch.equal(task.y_test, again.y_test)
    assert task.x_train.shape == (2000, bs.INPUT_DIM) and task.y_test.shape == (500,)
    frequencies = torch.bincount(task.y_train, minlength=bs.NUM_CLASSES) / 2000
    assert frequencies.min() > 0.03  # no class vanishes: chance is 1/10
    with pytest.raises(ValueError, match="train_size"):
        bs.make_task(0, 10)


@pytest.mark.parametrize(
    "optimizer, exponent", [("SGD", 1.0), ("LARS", 1.0), ("AdamW", 0.5), ("LAMB", 0.5), ("Adan", 0.5)]
)
def test_scaled_runs_follow_the_rule_and_warm_up_from_the_base_lr(optimizer, exponent):
    base_lr = bs.BASE_LRS[optimizer]
    training = bs.training_for(bs.Method(optimizer, scaled=True), 4096, 0, bs.BASE_LRS, steps_per_epoch=24)
    assert training.lr == pytest.approx(base_lr * 128**exponent)
    assert training.warmup_start_factor * training.lr == pytest.approx(base_lr)
    assert training.warmup_steps == round(bs.WARMUP_EPOCHS * 24)
    unscaled = bs.training_for(bs.Method(optimizer, scaled=False), 4096, 0, bs.BASE_LRS, steps_per_epoch=24)
    assert (unscaled.lr, unscaled.warmup_steps) == (base_lr, 0)
    # At the base batch there is nothing to scale or warm up: both methods are the same run.
    at_base = [bs.training_for(bs.Method(optimizer, s), bs.BASE_BATCH_SIZE, 0, bs.BASE_LRS, 100) for s in (True, False)]
    assert at_base[0] == at_base[1]


def test_tuning_picks_the_largest_lr_within_the_tolerance_of_the_best():
    tol = bs.TUNE_TOLERANCE
    assert bs.pick_base_lr([(0.1, 0.70), (0.3, 0.80), (1.0, 0.80 - tol / 2), (3.0, 0.80 - 2 * tol)]) == 1.0
    assert bs.pick_base_lr([(0.1, 0.80), (0.3, 0.80 - 2 * tol)]) == 0.1


def test_worker_processes_reproduce_the_in_process_runs():
    config = bs.ExperimentConfig(train_size=512, test_size=128, batch_sizes=(64,), epochs=1, seeds=1,
                                 target_accuracy=0.5)
    trainings = [bs.Training("LAMB", 64, 1e-2, 2, 0.5, 0), bs.Training("SGD", 64, 0.1, 0, 1.0, 1)]
    pooled = bs.run_trainings(trainings, config, workers=2)
    in_process = bs.run_trainings(trainings, config, workers=1)
    for training in trainings:
        assert pooled[training].accuracies == in_process[training].accuracies


def test_quick_run_writes_sane_tables_and_plot(tmp_path):
    cells = bs.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    config = bs.QUICK
    assert len(cells) == len(bs.METHODS) * len(config.batch_sizes)
    for cell in cells:
        assert len(cell.runs) == config.seeds
        assert all(0.0 <= a <= 1.0 for a in cell.final_accuracies)
        total_steps = config.epochs * (config.train_size // cell.batch_size)
        assert all(0 < s <= total_steps for s in cell.steps_to(config.target_accuracy))
    by_key = {(cell.method.label, cell.batch_size): cell for cell in cells}
    # It learns: chance is 10 %, and the quick budget gets AdamW well past it at batch 32.
    assert min(by_key["AdamW", 32].final_accuracies) > 0.4
    # SGD with and without the rule share their batch-32 runs, and differ at the larger batch.
    assert by_key["SGD", 32].runs == by_key["SGD + linear rule + warmup", 32].runs
    assert by_key["SGD + linear rule + warmup", 256].lr == pytest.approx(8 * bs.BASE_LRS["SGD"])

    report = (tmp_path / "batch_scaling.md").read_text()
    assert "--quick" in report
    for method in bs.METHODS:
        # One row in each of the three tables, with an entry per batch size.
        rows = [line for line in report.splitlines() if line.startswith(f"| {method.label} |")]
        assert len(rows) == 3 and all(row.count("|") == len(config.batch_sizes) + 2 for row in rows)
    accuracy_table = report.split("## Test accuracy")[1].split("##")[0]
    for value in re.findall(r"\| (\d+\.\d) ± \d+\.\d", accuracy_table):
        assert 0.0 <= float(value) <= 100.0
    assert (tmp_path / "batch_scaling.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_options_are_rejected():
    with pytest.raises(SystemExit):
        bs.parse_args(["--workers", "0"])
    with pytest.raises(ValueError, match="target_accuracy"):
        bs.ExperimentConfig(100, 10, (32,), 1, 1, target_accuracy=1.5)
