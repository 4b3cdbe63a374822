"""The noise-scale warmup experiment: its --quick run end to end (table and plot)."""

import pytest

from largebatch.experiments import noise_scale as ns


def test_quick_run_writes_the_table_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    runs = ns.main(["--quick", "--seeds", "0", "--out", str(tmp_path)])
    assert list(runs) == ["warmup", f"fixed {ns.INITIAL_BATCH}", f"fixed {ns.MAX_BATCH}"]
    logs = [seeds[0] for seeds in runs.values()]
    warmup, small, large = logs
    assert small.final_batch == ns.INITIAL_BATCH and large.final_batch == ns.MAX_BATCH
    sizes = [size for _, _, size, _ in warmup.noise_scale]
    assert sizes == sorted(sizes) and sizes[0] == ns.INITIAL_BATCH  # the warmup never shrinks
    for log in logs:
        assert log.noise_scale and all(b > 0 for _, _, _, b in log.noise_scale)  # B_simple measured
        assert log.accuracy and all(0.0 <= a <= 1.0 for _, _, a in log.accuracy)
    report = (tmp_path / "noise_scale.md").read_text()
    assert "--quick" in report and "| warmup |" in report
    assert (tmp_path / "noise_scale.png").stat().st_size > 10_000


def test_no_plot_writes_the_table_only(tmp_path):
    ns.main(["--quick", "--no-plot", "--seeds", "0", "--out", str(tmp_path)])
    assert (tmp_path / "noise_scale.md").exists() and not (tmp_path / "noise_scale.png").exists()
