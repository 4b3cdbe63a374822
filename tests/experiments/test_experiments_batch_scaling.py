"""The batch-scaling experiment: its pieces, and its --quick run end to end (tables and plot)."""

import dataclasses
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
    training = bs.Training("SGD", 32, 0.1, 1.0, 0)
    run = bs.RunResult(training, [1, 2, 5, 9], [0.1, 0.5, 0.45, 0.8], diverged=False, seconds=0.0)
    assert run.steps_to(0.5) == 2
    assert run.steps_to(0.6) == 9
    assert run.steps_to(0.9) is None
    assert run.final_accuracy == 0.8


def test_task_is_reproducible_with_every_class_present():
    task = bs.make_task(2000, 500, val_size=300)
    again = bs.make_task(2000, 500, val_size=300)
    assert torch.equal(task.x_train, again.x_train) and torch.equal(task.y_test, again.y_test)
    assert torch.equal(task.y_val, again.y_val)
    assert task.x_train.shape == (2000, bs.INPUT_DIM) and task.y_test.shape == (500,) and task.x_val.shape == (300, 32)
    frequencies = torch.bincount(task.y_train, minlength=bs.NUM_CLASSES) / 2000
    assert frequencies.min() > 0.03  # no class vanishes: chance is 1/10
    # Validation and test are different examples, and the validation split leaves the others as
    # they were (the noise-scale experiment uses the task without one).
    assert not torch.equal(task.x_val[:10], task.x_test[:10])
    without = bs.make_task(2000, 500)
    assert torch.equal(without.x_train, task.x_train) and torch.equal(without.y_train, task.y_train)
    assert torch.equal(without.x_test, task.x_test) and len(without.x_val) == 0
    with pytest.raises(ValueError, match="train_size"):
        bs.make_task(0, 10)
    with pytest.raises(ValueError, match="val_size"):
        bs.make_task(10, 10, val_size=-1)


@pytest.mark.parametrize(
    "optimizer, exponent", [("SGD", 1.0), ("LARS", 1.0), ("AdamW", 0.5), ("LAMB", 0.5), ("Adan", 0.5)]
)
def test_scaled_runs_follow_the_rule_and_warm_up_from_the_base_lr(optimizer, exponent):
    base_lr = bs.BASE_LRS[optimizer]
    training = bs.training_for(bs.Method(optimizer, scaled=True), 4096, 0, bs.BASE_LRS)
    assert training.lr == pytest.approx(base_lr * 128**exponent)
    assert training.warmup_start_factor * training.lr == pytest.approx(base_lr)
    unscaled = bs.training_for(bs.Method(optimizer, scaled=False), 4096, 0, bs.BASE_LRS)
    assert (unscaled.lr, unscaled.warmup_start_factor) == (base_lr, 1.0)
    # At the base batch there is nothing to scale or warm up: both methods are the same run.
    at_base = [bs.training_for(bs.Method(optimizer, s), bs.BASE_BATCH_SIZE, 0, bs.BASE_LRS) for s in (True, False)]
    assert at_base[0] == at_base[1]


def test_a_run_warms_up_from_the_base_lr_then_decays_to_zero(monkeypatch):
    """The lr over a run: base lr at step 0, the peak after the warmup, then poly-2 decay to ~0."""
    build = bs.build_optimizer
    lrs: list[float] = []

    def recording(name, model, lr):
        optimizer = build(name, model, lr)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(bs, "build_optimizer", recording)
    task = bs.make_task(1024, 64, val_size=64)
    training = bs.Training("SGD", 64, 0.4, 0.25, 0)  # peak 0.4, warmup from 0.1
    bs.train(training, task, epochs=4)  # 16 steps a epoch, 8 of warmup, 64 in all
    steps = lrs  # the lr of each step
    assert len(steps) == 64
    assert steps[0] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(steps[:8], steps[1:8]))  # warming up
    assert max(steps) == pytest.approx(0.4) == steps[8]
    assert all(a >= b for a, b in zip(steps[8:], steps[9:]))  # decaying after the warmup
    assert steps[-1] < 0.01 * 0.4  # poly-2 to 0: the last step's lr is small


def test_groups_come_from_create_optimizer_with_each_optimizers_default_recipe():
    model = bs.make_student(0)
    lars = bs.build_optimizer("LARS", model, 0.1)
    biases = next(g for g in lars.param_groups if all(p.ndim == 1 for p in g["params"]))
    # LARS's default recipe, "adapt": biases get the trust ratio but no weight decay.
    assert biases["weight_decay"] == 0.0 and biases["layer_adaptation"] is True
    lamb = bs.build_optimizer("LAMB", model, 1e-3)
    biases = next(g for g in lamb.param_groups if all(p.ndim == 1 for p in g["params"]))
    assert biases["weight_decay"] == 0.0 and biases["layer_adaptation"] is False


def test_tuning_picks_the_best_validation_accuracy():
    assert bs.pick_base_lr([(0.1, 0.70), (0.3, 0.80), (1.0, 0.79), (3.0, 0.5)]) == 0.3
    assert bs.pick_base_lr([(0.1, 0.80), (0.3, 0.80)]) == 0.3  # a tie: the larger lr


def test_tuning_scores_the_validation_split_not_the_test_split(monkeypatch):
    real = bs.make_task

    def wrong_validation_labels(train_size, test_size, seed=bs.TASK_SEED, *, val_size=0):
        task = real(train_size, test_size, seed, val_size=val_size)
        return dataclasses.replace(task, y_val=(task.y_val + 1) % bs.NUM_CLASSES)

    monkeypatch.setattr(bs, "make_task", wrong_validation_labels)
    monkeypatch.setattr(bs, "LR_GRIDS", {"AdamW": (3e-3,)})
    scores = bs.tune(bs.QUICK, workers=1)
    (lr, val_accuracy), = scores["AdamW"]
    # The model learns the test split's labels (well above chance), so the shifted validation
    # labels score near zero: the score is the validation accuracy.
    result = bs.train(bs.Training("AdamW", bs.BASE_BATCH_SIZE, lr, 1.0, 0), real(4096, 1024, val_size=1024), epochs=1)
    assert result.final_accuracy > 0.4 and val_accuracy < 0.2


def test_worker_processes_reproduce_the_in_process_runs():
    config = bs.ExperimentConfig(train_size=512, val_size=128, test_size=128, batch_sizes=(64,), epochs=1, seeds=1,
                                 target_accuracy=0.5)
    trainings = [bs.Training("LAMB", 64, 1e-2, 0.5, 0), bs.Training("SGD", 64, 0.1, 1.0, 1)]
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
        bs.ExperimentConfig(100, 10, 10, (32,), 1, 1, target_accuracy=1.5)
