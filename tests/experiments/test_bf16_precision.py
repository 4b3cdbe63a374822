"""The bf16 experiment: deep_scaling's lrs and loop, each precision reaching the optimizer, --quick end to end."""

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

    def recording(method, model, lr, excluded_lr=None, kahan_sum=None):
        optimizer = build(method, model, lr, excluded_lr, kahan_sum)
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
    assert len(saved["runs"]) == len(bp.ROWS) * len(bp.PRECISIONS) * len(ds.QUICK.seeds)
    assert all(any(line.startswith(f"| {label} |") for line in text.splitlines()) for label in bp.LABELS)
    assert any(line.startswith("| LAMB + sqrt, lr × 1/16 |") for line in text.splitlines())
    assert "not run" not in text

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr(bp, "train", no_training)
    bp.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    assert (tmp_path / "bf16_precision.md").read_text() == text.replace(
        next(line + "\n" for line in text.splitlines() if line.startswith("This run took")), ""
    )


def test_a_low_lr_run_scales_the_lr_and_keeps_the_best_lr_runs_keys():
    assert bp.Run("LAMB + sqrt", "fp32", 0).key == '{"method": "LAMB + sqrt", "precision": "fp32", "seed": 0}'
    assert json.loads(bp.Run("LAMB + sqrt", "fp32", 0, 1 / 16).key)["lr_factor"] == 1 / 16
    data = ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size)
    low = bp.train(TINY, data, bp.Run("LAMB + sqrt", "fp32", 0, 1 / 16))
    assert low["peak_lr"] == pytest.approx(bp.large_batch_lr("LAMB + sqrt", TINY) / 16)


def test_bad_workers_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        bp.main(["--quick", "--workers", "0", "--out", str(tmp_path)])
