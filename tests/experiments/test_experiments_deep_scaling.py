"""The deep-scaling experiment: its data, a tiny end-to-end run (tables, plot, cache) and its CLI."""

import dataclasses
import json
import math
import sys

import pytest
import torch

from largebatch.experiments import deep_scaling as ds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dataclasses.replace(
    ds.QUICK, train_size=256, val_size=64, test_size=64, epochs=2, warmup_epochs=0.5, large_batch_size=128, channels=3,
    probe_steps=3, workers=1,
)


def test_data_are_generated_reproducibly_with_every_class():
    data = ds.make_data(600, 100, 100)
    again = ds.make_data(600, 100, 100)
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    assert data.x_train.shape == (600, 1, ds.LENGTH) and data.x_val.shape == (100, 1, ds.LENGTH)
    assert torch.bincount(data.y_train, minlength=ds.NUM_CLASSES).min() > 20
    assert torch.isfinite(data.x_train).all()
    # The splits are different examples, not copies.
    assert not torch.equal(data.x_val[:10], data.x_test[:10])
    with pytest.raises(ValueError, match="val_size"):
        ds.make_data(10, 0, 10)


def test_the_model_is_deep_and_normalised():
    model = ds.make_model(0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(convs) >= 8 and len(norms) == len(convs)
    assert model(torch.randn(4, 1, ds.LENGTH)).shape == (4, ds.NUM_CLASSES)
    ghost = ds.make_model(0, ghost_batch_size=16)
    assert all(type(m).__name__ == "GhostBatchNorm1d" for m in ghost.modules() if isinstance(m, torch.nn.BatchNorm1d))


def test_the_full_setting_meets_the_budget_it_claims():
    full = ds.FULL
    assert full.total_samples // full.large_batch_size >= 150
    assert (full.base_batch_size, full.large_batch_size, len(full.seeds)) == (64, 2048, 3)
    assert set(ds.LR_GRIDS) == {m.tuned for m in ds.METHODS}


@pytest.mark.slow
def test_a_tiny_run_fills_every_table_and_resumes_from_its_cache(tmp_path):
    results = ds.Results(tmp_path / "runs.json")
    plan = ds.run_experiment(TINY, results, log=lambda line: None)
    assert set(plan.base_lr) == set(ds.LR_GRIDS)
    assert all(plan.base_lr[k] in ds.LR_GRIDS[k] for k in plan.base_lr)
    assert set(plan.oracle_exponent) == {m.label for m in ds.ORACLE_METHODS}
    report = ds.write_report(TINY, results, plan, tmp_path, seconds=None)
    for method in ds.METHODS:
        assert method.label in report
    assert "not run" not in report and "**oracle**" in report
    ds.write_plot(TINY, results, plan, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG_MAGIC
    # Every run is in the cache; a second pass runs nothing and settles on the same plan.
    cached = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert len(cached) == len(results.runs)
    ran = []
    again = ds.run_experiment(TINY, ds.Results(tmp_path / "runs.json"), log=ran.append)
    assert again == plan and ran == []
    # The probe row's lr came from probe_lr, the rule row's from the rule.
    sgd = next(m for m in ds.METHODS if m.tuned == "SGD")
    probe = results.get(ds._base_run(sgd, plan, TINY, plan.base_lr["SGD"], 0, TINY.large_batch_size, probe=True))
    assert probe["probe_best_lr"] is not None and probe["peak_lr"] == pytest.approx(probe["probe_best_lr"] / 10)


def test_a_missing_matplotlib_stops_before_training(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"largebatch\[demo\].*--no-plot"):
        ds.main(["--out", str(tmp_path)])
    assert not (tmp_path / "deep_scaling_runs.json").exists()


def test_the_base_batch_seeds_start_with_the_tuning_seed():
    assert ds.FULL.base_batch_seeds[0] == ds.FULL.seeds[0]
    for bad in ((), (1,), (0, 7)):
        with pytest.raises(ValueError, match="base_batch_seeds"):
            dataclasses.replace(ds.FULL, base_batch_seeds=bad)


def _plan_everything(config):
    """Every run the experiment would do, with made-up results (no training): the run set."""
    results = ds.Results(None)
    plan = ds.Plan()
    while runs := ds._ready_runs(config, results, plan):
        for run in runs:
            fake_accuracy = 1 / (1 + abs(math.log(run.lr) - math.log(2.0)))  # best near lr 2
            results.add(run.key, {"val_accuracy": fake_accuracy, "test_accuracy": fake_accuracy,
                                  "curve": [(1, 1, fake_accuracy)], "peak_lr": run.lr, "steps": 1})
    return [ds.Run(**json.loads(key)) for key in results.runs], plan


def test_the_full_plan_is_the_run_set_the_budget_was_measured_with():
    runs, plan = _plan_everything(ds.FULL)
    base = [r for r in runs if r.batch_size == ds.FULL.base_batch_size]
    large = [r for r in runs if r.batch_size == ds.FULL.large_batch_size]
    assert len(base) + len(large) == len(runs)
    # Batch-64 runs set the cost (4,800 steps each): the tuning grids (seed 0) plus the rows whose
    # batch-64 run is not a tuning run (the LARS recipes that share the "adapt" tuning).
    assert all(r.seed == 0 for r in base)
    assert len(base) == sum(map(len, ds.LR_GRIDS.values())) + 2
    # At batch 2048 every row has all 3 seeds: rule rows for every method, probe and oracle rows
    # for every ORACLE_METHODS row.
    for method in ds.METHODS:
        rule_lr = ds._rule_lr(method, plan, ds.FULL)
        rule = {r.seed for r in large if r.method == method.label and not r.probe and r.lr == rule_lr}
        assert rule == set(ds.FULL.seeds), method.label
    for method in ds.ORACLE_METHODS:
        probe = {r.seed for r in large if r.method == method.label and r.probe}
        oracle = {r.seed for r in large if r.method == method.label and not r.probe
                  and r.lr == ds._oracle_lr(method, plan, ds.FULL)}
        assert probe == oracle == set(ds.FULL.seeds), method.label
    # The oracle sweep: ORACLE_EXPONENTS and the rule's own k, on seed 0.
    assert {k for grid in plan.oracle_grid.values() for k in grid} == {*ds.ORACLE_EXPONENTS, 1.0}


def test_measured_exponents_are_the_committed_runs_oracle_exponents():
    """MEASURED_EXPONENTS claim to come from docs/deep_scaling.md's oracle rows: they must agree."""
    from pathlib import Path

    from largebatch.schedules import MEASURED_EXPONENTS

    report = (Path(__file__).parents[2] / "docs" / "deep_scaling.md").read_text()
    oracle_table = report.split("## At batch")[1].split("##")[0]
    measured = {}
    for line in oracle_table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] in {m.label for m in ds.ORACLE_METHODS}:
            measured[cells[0]] = float(cells[5])
    by_class = {"SGD": "SGD + linear", "LARS": "LARS, adapt (excluded adapted, not decayed)", "LAMB": "LAMB + sqrt",
                "AdamW": "AdamW + sqrt", "Adan": "Adan + sqrt"}
    assert {name: measured[label] for name, label in by_class.items()} == MEASURED_EXPONENTS
