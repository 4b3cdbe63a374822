"""The README's demo command runs end to end (a shortened configuration) and writes its outputs."""

import pytest

from largebatch import demo


def test_demo_runs_and_writes_table_and_plot(tmp_path, capsys):
    results = demo.main(
        ["--optimizers", "lamb", "sgd", "--epochs", "2", "--multipliers", "4", "--warmup-epochs", "1",
         "--out", str(tmp_path)]
    )
    assert [(r.optimizer, r.batch_size, r.policy) for r in results] == [
        ("LAMB", 32, "base"), ("LAMB", 128, "naive"), ("LAMB", 128, "scaled"),
        ("SGD", 32, "base"), ("SGD", 128, "naive"), ("SGD", 128, "scaled"),
    ]
    lamb_scaled = results[2]
    assert lamb_scaled.lr == pytest.approx(5e-3 * 2)  # sqrt rule at 4x
    assert results[5].lr == pytest.approx(0.01 * 4)  # linear rule for SGD
    assert all(0.0 <= r.test_accuracy <= 1.0 and len(r.curve) == 2 for r in results)
    assert results[0].test_accuracy > 0.5  # it learns: chance is 0.1
    assert "| batch | optimizer |" in capsys.readouterr().out
    assert (tmp_path / "results.md").read_text().count("\n") == 8
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--base-batch", "-1"], ["--multipliers", "0"]])
def test_demo_rejects_bad_options(argv):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
