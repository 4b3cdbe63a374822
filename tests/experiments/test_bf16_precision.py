"""The bf16 experiment: deep_scaling's lrs and loop, each precision reaching the optimizer, its own config and
cache keys, the paired gaps, --quick end to end."""

import json
from dataclasses import replace

import pytest
import torch

from largebatch.experiments import bf16_precision as bp
from largebatch.experiments import deep_scaling as ds

TINY = replace(ds.QUICK, train_size=256, val_size=128, test_size=128, epochs=2, large_batch_size=128, channels=4)


def test_the_lrs_are_deep_scalings_best_at_batch_2048():
    # docs/deep_scaling.md, "oracle lr" column, shown to 3 digits.
    assert bp.large_batch_lr("LAMB + sqrt", ds.FULL) == pytest.approx(0.0951, abs=5e-5)
    assert bp.large_batch_lr("LARS, adapt (excluded adapted, not decayed)", ds.FULL) == pytest.approx(45.3, abs=0.05)
    assert bp.large_batch_lr("Adan + sqrt", ds.FULL) == pytest.approx(0.152, abs=5e-4)
    assert set(bp.LABELS) <= {m.label for m in ds.METHODS}


def test_the_fp32_row_is_deep_scalings_run_and_the_bf16_rows_train_bf16_parameters(monkeypatch):
    data = ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size)
    label = "LAMB + sqrt"
    ours = bp.train(TINY, data, bp.Run(label, "fp32", 1))
    theirs = ds.train(TINY, data, ds.Run(label, TINY.large_batch_size, bp.large_batch_lr(label, TINY), 1))
    assert ours["curve"] == theirs["curve"] and ours["val_accuracy"] == theirs["val_accuracy"]

    built = []
    build = ds.build_optimizer

    def recording(*args):
        optimizer = build(*args)
        built.append(optimizer)
        return optimizer

    monkeypatch.setattr(ds, "build_optimizer", recording)
    losses = {precision: bp.train(TINY, data, bp.Run(label, precision, 1))["train_loss"] for precision in ("bf16", "bf16 + Kahan")}
    for optimizer, kahan in zip(built, (False, True)):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        assert {p.dtype for p in params} == {torch.bfloat16}
        assert all(group["kahan_sum"] is kahan for group in optimizer.param_groups)
    assert len({losses["bf16"], losses["bf16 + Kahan"], ours["train_loss"]}) == 3  # three different trainings


@pytest.mark.slow
def test_quick_run_writes_the_table_and_resumes_from_its_cache(tmp_path, monkeypatch):
    bp.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    text = (tmp_path / "bf16_precision.md").read_text()
    saved = json.loads((tmp_path / "bf16_precision_quick_runs.json").read_text())
    runs = len(bp.ROWS) * len(bp.PRECISIONS) + sum(len(bp.diagnosed_rows(name)) for name in bp.DIAGNOSTICS)
    assert len(saved["runs"]) == runs * len(bp.QUICK.seeds)
    assert all(f"| {name} |" in text for name in bp.DIAGNOSTICS)
    assert all(any(line.startswith(f"| {label} |") for line in text.splitlines()) for label in bp.LABELS)
    for name in ("LAMB + sqrt, lr × 1/16", "LAMB + sqrt, lr × 1/4, 4× steps"):
        assert any(line.startswith(f"| {name} |") for line in text.splitlines())
    lamb = next(line for line in text.splitlines() if line.startswith("| LAMB + sqrt |"))
    assert "not run" not in text and " ± " in lamb.split(" | ")[4]  # the paired gap with its standard error

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr(bp, "train", no_training)
    bp.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    assert (tmp_path / "bf16_precision.md").read_text() == text.replace(
        next(line + "\n" for line in text.splitlines() if line.startswith("This run took")), ""
    )


def test_a_low_lr_run_scales_the_lr_and_a_longer_budget_stretches_the_schedule():
    data = ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size)
    low = bp.train(TINY, data, bp.Run("LAMB + sqrt", "fp32", 0, 1 / 16))
    assert low["peak_lr"] == pytest.approx(bp.large_batch_lr("LAMB + sqrt", TINY) / 16)
    long = bp.train(TINY, data, bp.Run("LAMB + sqrt", "fp32", 0, 1.0, 3))
    stretched = replace(TINY, epochs=3 * TINY.epochs, warmup_epochs=3 * TINY.warmup_epochs)
    theirs = ds.train(stretched, data, ds.Run("LAMB + sqrt", TINY.large_batch_size, bp.large_batch_lr("LAMB + sqrt", TINY), 0))
    assert long["steps"] == 3 * low["steps"] and long["curve"] == theirs["curve"]
    assert bp.Row("LAMB + sqrt", 1 / 4, 4).name == "LAMB + sqrt, lr × 1/4, 4× steps"
    assert bp.Row("LAMB + sqrt", 1 / 4, 4).run("bf16", 5) == bp.Run("LAMB + sqrt", "bf16", 5, 1 / 4, 4)


def test_the_config_is_deep_scalings_with_a_large_test_set_more_seeds_and_one_final_test():
    changed = {name for name in ds.FULL.__dataclass_fields__ if getattr(ds.FULL, name) != getattr(bp.FULL, name)}
    assert changed == {"test_size", "seeds", "evals_per_epoch"}
    assert bp.FULL.test_size >= 16 * ds.FULL.test_size and len(bp.FULL.seeds) >= 8 and bp.FULL.evals_per_epoch == 0
    assert ds.FULL.test_size == 4_096 and ds.FULL.evals_per_epoch == 2  # deep_scaling's own setting is untouched
    end_only = replace(TINY, evals_per_epoch=0)
    one_test = bp.train(end_only, ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size), bp.Run("LAMB + sqrt", "fp32", 0))
    assert len(one_test["curve"]) == 1 and one_test["curve"][0][1] == TINY.total_samples
    with pytest.raises(ValueError, match="evals_per_epoch"):
        replace(TINY, evals_per_epoch=-1)


def test_the_cache_key_holds_every_setting_that_changes_a_run():
    run = bp.Run("LAMB + sqrt", "fp32", 0)
    key = run.key(bp.FULL)
    assert json.loads(key)["config"]["test_size"] == bp.FULL.test_size
    # Another test set, budget or data size is another run; the seeds and workers of the config are not.
    for other in (ds.FULL, replace(bp.FULL, test_size=32_768), replace(bp.FULL, epochs=20), replace(bp.FULL, train_size=1024)):
        assert run.key(other) != key
    assert run.key(replace(bp.FULL, seeds=(0,), workers=1)) == key
    assert len({bp.Run("LAMB + sqrt", "fp32", 0, f, b).key(bp.FULL) for f, b in ((1.0, 1), (0.25, 1), (1.0, 4))}) == 3


def test_a_cache_of_another_config_is_not_read(tmp_path):
    results = ds.Results(tmp_path / "runs.json")
    small = replace(TINY, seeds=(0,), workers=1)
    cell = bp.Row("LAMB + sqrt")
    fake = {"test_accuracy": 0.5, "train_loss": 1.0, "cpu_seconds": 0.0}
    for precision in bp.PRECISIONS:
        results.add(cell.run(precision, 0).key(replace(small, test_size=2 * small.test_size)), fake)
    assert bp._row_results(small, results, cell, "fp32") is None
    row = next(line for line in bp.write_report(small, results, tmp_path, None).splitlines() if line.startswith("| LAMB + sqrt |"))
    assert row.split(" | ")[2:4] == ["not run", "not run"]
    results.add(cell.run("fp32", 0).key(small), fake)  # the same config's run is read
    assert bp._row_results(small, results, cell, "fp32") == [fake]


def test_the_paired_gap_is_the_mean_difference_and_its_standard_error():
    mean, error = bp.paired_gap([90.0, 88.0, 91.0, 87.0], [89.0, 89.0, 90.0, 88.0])
    # differences 1, -1, 1, -1: mean 0, sample std sqrt(4/3), SE sqrt(4/3)/2
    assert mean == pytest.approx(0.0) and error == pytest.approx((4 / 3) ** 0.5 / 2)
    assert bp.paired_gap([90.0], [88.5]) == (pytest.approx(1.5), None)
    # pairing removes what the seeds share: a constant offset has no error at all
    assert bp.paired_gap([80.0, 90.0, 85.0], [79.0, 89.0, 84.0])[1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="pairs"):
        bp.paired_gap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="pairs"):
        bp.paired_gap([], [])


def test_bad_workers_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        bp.main(["--quick", "--workers", "0", "--out", str(tmp_path)])


def test_the_diagnostics_reach_the_optimizer_and_the_fp32_test_retests_the_same_training():
    data = ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size)
    label = "LAMB + sqrt"
    tested = bp.train(TINY, data, bp.Run(label, "bf16 + Kahan, tested in fp32", 0))
    plain = bp.train(TINY, data, bp.Run(label, "bf16 + Kahan", 0))
    assert tested["test_accuracy"] == plain["test_accuracy"] and tested["train_loss"] == plain["train_loss"]
    assert "test_accuracy_fp32" in tested and "test_accuracy_fp32" not in plain
    model = ds.make_model(0, TINY.channels)
    assert ds.accuracy(model, data.x_test, data.y_test) == ds.accuracy(model.bfloat16().float(), data.x_test, data.y_test)

    built = []
    build = ds.build_optimizer

    def recording(*args):
        built.append(build(*args))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ds, "build_optimizer", recording)
        for name in ("bf16 + Kahan, fp32 states", "fp32, 8-bit states"):
            bp.train(TINY, data, bp.Run(label, name, 0))
    (kahan_fp32, eight_bit) = built
    weight = next(p for group in kahan_fp32.param_groups for p in group["params"] if p.dim() > 1)
    assert weight.dtype == torch.bfloat16 and kahan_fp32.state[weight]["exp_avg"].dtype == torch.float32
    assert "kahan_comp" in kahan_fp32.state[weight]
    weight = next(p for group in eight_bit.param_groups for p in group["params"] if p.dim() > 1)
    assert weight.dtype == torch.float32 and eight_bit.state[weight]["exp_avg"].dtype == torch.int8


def test_a_training_that_does_not_replicate_its_twin_is_refused(tmp_path):
    results = ds.Results(None)
    config = replace(bp.QUICK, seeds=(0,))
    row = bp.DIAGNOSED_ROWS[0]
    base = {"test_accuracy": 0.5, "train_loss": 1.0, "cpu_seconds": 1.0}
    for name in [*bp.PRECISIONS, *bp.DIAGNOSTICS]:
        result = dict(base, test_accuracy=0.6 if name == "bf16, tested in fp32" else 0.5)
        if bp.DIAGNOSTICS.get(name, bp.PRECISIONS.get(name)).fp32_test:
            result["test_accuracy_fp32"] = 0.55
        results.runs[row.run(name, 0).key(config)] = result
    with pytest.raises(RuntimeError, match="did not replicate 'bf16'"):
        bp.write_report(config, results, tmp_path, None)


def test_the_autocast_row_computes_in_bf16_with_fp32_weights(monkeypatch):
    data = ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size)
    label = "LAMB + sqrt"
    seen = []
    forward = torch.nn.Conv1d.forward

    def recording(self, x):
        out = forward(self, x)
        seen.append((self.weight.dtype, out.dtype))
        return out

    monkeypatch.setattr(torch.nn.Conv1d, "forward", recording)
    mixed = bp.train(TINY, data, bp.Run(label, "fp32 weights, bf16 autocast", 0))
    assert (torch.float32, torch.bfloat16) in seen  # training: fp32 weights, bf16 outputs
    assert seen[-1] == (torch.float32, torch.float32)  # the test: no autocast
    assert mixed["train_loss"] != bp.train(TINY, data, bp.Run(label, "fp32", 0))["train_loss"]
    grows = next(m.label for m in ds.METHODS if m.grows_batch)
    with pytest.raises(ValueError, match="autocast is for fixed-batch methods"):
        ds.train(TINY, data, ds.Run(grows, TINY.large_batch_size, 0.1, 0), autocast=True)


def test_the_fp32_norms_rows_keep_batchnorm_in_fp32_and_the_rest_bf16(monkeypatch):
    data = ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size)
    built = []
    build = ds.build_optimizer

    def recording(*args):
        built.append(build(*args))
        return built[-1]

    monkeypatch.setattr(ds, "build_optimizer", recording)
    bp.train(TINY, data, bp.Run("LAMB + sqrt", "bf16 + Kahan, BatchNorm in fp32", 0))
    (optimizer,) = built
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_dtype = {dtype: [p for p in params if p.dtype == dtype] for dtype in (torch.float32, torch.bfloat16)}
    assert by_dtype[torch.float32] and by_dtype[torch.bfloat16] and len(params) == sum(map(len, by_dtype.values()))
    assert all(p.dim() == 1 for p in by_dtype[torch.float32])  # BatchNorm weights and biases
    assert all("kahan_comp" in optimizer.state[p] for p in by_dtype[torch.bfloat16])
    assert not any("kahan_comp" in optimizer.state[p] for p in by_dtype[torch.float32])
