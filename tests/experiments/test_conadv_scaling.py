"""The ConAdv experiment: deep_scaling's setting and lrs, its --quick run end to end, resuming."""

import json
from dataclasses import replace

import pytest

from largebatch.experiments import conadv_scaling as cs
from largebatch.experiments import deep_scaling as ds

TINY = replace(ds.QUICK, train_size=256, val_size=128, test_size=128, epochs=2, large_batch_size=128, channels=4)


def test_the_lrs_are_deep_scalings_best_at_batch_2048():
    # docs/deep_scaling.md, "oracle lr" column: LAMB 0.0951, SGD 2.26.
    assert cs.large_batch_lr("LAMB + sqrt", ds.FULL) == pytest.approx(0.0951, abs=5e-5)  # shown to 3 digits
    assert cs.large_batch_lr("SGD + linear", ds.FULL) == pytest.approx(2.26, abs=0.005)  # shown to 3 digits
    assert ds.FULL.large_batch_size == 2048 and set(cs.LABELS) <= {m.label for m in ds.METHODS}


@pytest.mark.parametrize("label", cs.LABELS)
def test_the_plain_run_is_deep_scalings_run(label):
    data = ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size)
    ours = cs.train(TINY, data, cs.Run(label, None, 1))
    theirs = ds.train(TINY, data, ds.Run(label, TINY.large_batch_size, ours["lr"], 1))
    assert [acc for _, acc in ours["curve"]] == [acc for _, _, acc in theirs["curve"]]
    assert ours["val_accuracy"] == theirs["val_accuracy"] and ours["steps"] == theirs["steps"]


def test_a_conadv_run_differs_from_the_plain_run():
    data = ds.make_data(TINY.train_size, TINY.val_size, TINY.test_size)
    plain = cs.train(TINY, data, cs.Run("LAMB + sqrt", None, 0))
    adversarial = cs.train(TINY, data, cs.Run("LAMB + sqrt", 0.1, 0))
    assert plain["steps"] == adversarial["steps"] and plain["train_loss"] != adversarial["train_loss"]


@pytest.mark.slow
def test_quick_run_writes_the_table_and_resumes_from_its_cache(tmp_path, monkeypatch):
    cs.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    text = (tmp_path / "conadv_scaling.md").read_text()
    saved = json.loads((tmp_path / "conadv_scaling_quick_runs.json").read_text())
    # The sweep, 2 plain rows and 2 ConAdv rows (the sweep's chosen LAMB run is reused), one seed.
    assert len(saved["runs"]) == len(cs.EPSILONS) + 2 + 1
    assert set(saved["timing"]) == set(cs.LABELS)
    assert all(set(t) == {"plain", "conadv", "perturbation"} for t in saved["timing"].values())
    # With one seed every sweep run is a whole row: LAMB plain + each ε, SGD plain + the chosen ε.
    rows = {label: sum(line.startswith(f"| {label} |") for line in text.splitlines()) for label in cs.LABELS}
    assert rows == {"LAMB + sqrt": 1 + len(cs.EPSILONS), "SGD + linear": 2}
    assert text.count("**") >= 2 * 2  # the chosen ε in bold, in both methods' rows
    assert "not run" not in text and "ε sweep" in text

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr(cs, "train", no_training)
    cs.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    assert (tmp_path / "conadv_scaling.md").read_text().split("\n")[4:] == text.split("\n")[4:]


def test_bad_workers_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        cs.main(["--quick", "--workers", "0", "--out", str(tmp_path)])
