"""The README's demo command: it runs end to end (a shortened configuration) and writes its outputs;
without the [demo] extra, --help still works and a run stops before training with the install
command; the README's table and settings are the demo's own."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from largebatch import LARS, demo


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


# --- without the [demo] extra -------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
DEMO_EXTRA = ["sklearn", "tqdm", "matplotlib"]
INSTALL_HINT = 'pip install "largebatch[demo]"'

# Run in a fresh interpreter in which the [demo] extra's modules cannot be imported, exactly as
# if they were not installed: a meta-path finder answers ModuleNotFoundError for them.
BLOCKED_HELP = """
import runpy, sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
sys.argv = ["largebatch.demo", "--help"]
runpy.run_module("largebatch.demo", run_name="__main__", alter_sys=True)
"""


def test_help_works_without_the_demo_extra():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_HELP.format(blocked=DEMO_EXTRA)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m largebatch.demo")
    assert INSTALL_HINT in " ".join(done.stdout.split())  # argparse wraps the description


def refuse_to_train(*args, **kwargs):
    pytest.fail("the demo started training although a [demo] dependency is missing")


@pytest.mark.parametrize(
    "missing, named",
    [(["tqdm"], ["tqdm"]), (["matplotlib"], ["matplotlib"]), (["sklearn"], ["scikit-learn"]),
     (DEMO_EXTRA, ["scikit-learn", "tqdm", "matplotlib"])],
)
def test_missing_extra_stops_before_training_with_the_install_command(monkeypatch, tmp_path, missing, named):
    for module in missing:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    monkeypatch.setattr(demo, "load_digits_split", refuse_to_train)
    monkeypatch.setattr(demo, "train", refuse_to_train)
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--optimizers", "sgd", "--epochs", "1", "--out", str(tmp_path)])
    message = str(stopped.value.code)  # a string code: printed to stderr, exit status 1
    assert INSTALL_HINT in message
    assert f"missing: {', '.join(named)}." in message
    assert ("--no-plot" in message) == (missing == ["matplotlib"])
    assert not any(tmp_path.iterdir())


def test_no_plot_runs_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    results = demo.main(["--optimizers", "sgd", "--epochs", "1", "--multipliers", "2", "--no-plot",
                         "--out", str(tmp_path)])
    assert [r.batch_size for r in results] == [32, 64, 64]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


# --- the README's account of the demo -------------------------------------------------------------


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_demo_table_is_the_committed_run_without_its_seconds():
    """Every row of docs/demo_results.md (all batches, 16x and 32x), as the run printed it."""
    committed = [line.rsplit("|", 2)[0] + "|" for line in (REPO / "docs/demo_results.md").read_text().splitlines()]
    shown = [line for line in readme_section("What the demo shows").splitlines() if line.startswith("|")]
    assert shown == committed
    batches = {int(line.split("|")[1]) for line in committed[2:]}
    assert batches == {32, 32 * 16, 32 * 32}


def test_readme_and_help_state_the_demo_lars_trust_coefficient():
    coefficient = demo.RECIPES["lars"].options["trust_coefficient"]
    assert coefficient != inspect.signature(LARS).parameters["trust_coefficient"].default
    assert f"`trust_coefficient={coefficient}`" in readme_section("What the demo shows")
    assert f"trust_coefficient={coefficient}" in demo.__doc__
