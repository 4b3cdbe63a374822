"""The one-shot GPU check's machinery, on the CPU (bench/gpu_check.py, rows.py, isolated.py,
timm_optim.py): its dry run, rows written one by one, every failure a row that stops nothing,
timm loaded without its `__init__` (and said missing when it is), and the checks' verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench import gpu_check, report
from bench.isolated import REPO_ROOT, Job
from bench.rows import ReportFile, environment, environment_job, markdown, run
from bench.timm_optim import TimmNotInstalled, timm_optimizer

HERE = Path(__file__).resolve().parent
DRY = "dry-run"
BERT, RESNET = report.PROFILES[DRY].shape_sets
# The fused kernels run in-process only under the interpreter (the children get it in any case).
requires_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="in-process fused steps on the CPU need TRITON_INTERPRET=1"
)


@pytest.fixture
def fake_timm(tmp_path: Path) -> Path:
    """A timm whose package `__init__`s raise (as timm's does without torchvision); its optimizer
    files import a sibling relatively, as timm's do."""
    root = tmp_path / "site"
    optim = root / "timm" / "optim"
    optim.mkdir(parents=True)
    for init in (root / "timm" / "__init__.py", optim / "__init__.py"):
        init.write_text("raise ImportError(\"timm's __init__ ran: it imports torchvision\")\n")
    (optim / "_helpers.py").write_text("def same(lr):\n    return lr\n")
    for stem, name in (("lamb", "Lamb"), ("lars", "Lars"), ("adan", "Adan")):
        (optim / f"{stem}.py").write_text(
            textwrap.dedent(f"""\
                import torch
                from ._helpers import same

                class {name}(torch.optim.SGD):
                    def __init__(self, params, lr=1e-3, weight_decay=0.0, max_grad_norm=None, momentum=0.0):
                        super().__init__(params, lr=same(lr), weight_decay=weight_decay, momentum=momentum)
                """)
        )
    return root


def _jobs_by_name(profile: str = DRY) -> dict[str, Job]:
    return {job.name: job for job in gpu_check.gpu_check_jobs(profile)}


def _failing(section: str, name: str, function: str, timeout_s: float = 60) -> Job:
    return Job(section, name, "_bench_jobs", function, timeout_s=timeout_s)


def test_dry_run_writes_every_row_as_it_comes_and_failures_stop_nothing(tmp_path, fake_timm, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake_timm), str(HERE)]))
    real = _jobs_by_name()
    jobs = [
        environment_job(DRY),
        real["reference: LAMB"],
        _failing("correctness", "raises a BaseException", "raise_unusual"),
        real["copy bandwidth"],
        _failing("step time", f"{BERT}: LAMB / aborting", "abort"),
        _failing("step time", f"{BERT}: LARS / hanging", "hang", timeout_s=1),
        real[f"{BERT}: LAMB / timm"],
        _failing("correctness", "dies after its row", "crash_after_result"),
        real[f"{BERT}: LAMB / largebatch fused"],
    ]
    names = [job.name for job in jobs]
    snapshots = []

    def on_row(file: ReportFile) -> None:
        on_disk = json.loads(file.json_path.read_text())
        done = len(snapshots) + 1
        assert [r["name"] for r in on_disk["rows"]] == names[:done]
        assert on_disk["pending"] == names[done:] and on_disk["complete"] is False
        text = file.markdown_path.read_text()
        assert f"INCOMPLETE ({done} rows so far, {len(jobs) - done} pending)" in text
        assert all(f"- {name}" in text for name in names[done:])
        snapshots.append(on_disk)

    file = run(jobs, DRY, tmp_path, "check", "GPU check (test)", on_row=on_row)
    assert len(snapshots) == len(jobs)
    final = json.loads(file.json_path.read_text())
    assert final["complete"] is True and final["pending"] == []
    rows = {r["name"]: r for r in final["rows"]}

    assert rows["environment"]["status"] == "ok" and final["device"] == "CPU (dry run)"
    assert rows["reference: LAMB"]["status"] == "ok", rows["reference: LAMB"]
    assert rows["copy bandwidth"]["status"] == "ok" and rows["copy bandwidth"]["copy_bandwidth_GBps"] > 0
    unusual = rows["raises a BaseException"]
    assert unusual["status"] == "error" and "_bench_jobs.UnusualFailure: a failure of no common type" in unusual["detail"]
    aborted = rows[f"{BERT}: LAMB / aborting"]
    assert aborted["status"] == "error" and "SIGABRT" in aborted["detail"]
    assert "as a CUDA illegal address" in aborted["output"]  # the end of what it printed
    hung = rows[f"{BERT}: LARS / hanging"]
    assert (hung["status"], hung["detail"]) == ("error", "timed out after 1 s")
    crashed = rows["dies after its row"]
    assert crashed["status"] == "ok" and crashed["detail"] == "measured [then exited with code 3]"
    # timm from the fake installation, whose __init__ would have raised had it run.
    timm_row = rows[f"{BERT}: LAMB / timm"]
    assert timm_row["status"] == "ok" and timm_row["host_ms"] > 0, timm_row
    fused = rows[f"{BERT}: LAMB / largebatch fused"]
    assert fused["status"] == "ok" and fused["device_ms"] is None and fused["share_of_copy_bandwidth"] > 0
    assert fused["tensors"] == len(report.PROFILES[DRY].shape_sets[BERT])

    text = file.markdown_path.read_text()
    assert "complete" in text and "INCOMPLETE" not in text and "## Not run yet" not in text
    assert "| LAMB | aborting | error: killed by signal SIGABRT without a result |" in text
    assert "### raises a BaseException: error" in text  # the failure's full text has its own section
    logs = sorted((tmp_path / "logs").iterdir())
    assert len(logs) == len(jobs) and "about to abort" in logs[4].read_text()


def test_time_budget_and_a_fatal_environment_turn_the_rest_into_skipped_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    jobs = [Job("test", f"job {i}", "_bench_jobs", "succeed", {"value": i}) for i in range(2)]
    spent = run(jobs, DRY, tmp_path / "budget", "check", "test", budget_s=0)
    assert [r["status"] for r in spent.report["rows"]] == ["skipped", "skipped"]
    assert spent.report["rows"][0]["detail"] == "not run: the time budget of 0 s was spent"

    fatal = [_failing("environment", "environment", "no_device"), *jobs]
    stopped = run(fatal, DRY, tmp_path / "fatal", "check", "test")
    assert [r["status"] for r in stopped.report["rows"]] == ["error", "skipped", "skipped"]
    assert stopped.report["rows"][1]["detail"] == "not run: environment: no CUDA device"
    assert stopped.report["complete"]


def test_environment_on_a_machine_without_cuda_is_fatal_for_the_cuda_run():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    row = environment("cuda")
    assert row["status"] == "error" and row["fatal"] is True and "torch sees no CUDA device" in row["detail"]


def test_shell_script_dry_run_writes_its_files_and_exit_status(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out), "--only", "copy bandwidth"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads((out / "gpu_check.json").read_text())
    assert [r["name"] for r in written["rows"]] == ["environment", "copy bandwidth"]
    assert written["complete"] and "Copy bandwidth:" in (out / "gpu_check.md").read_text()


def test_report_module_runs_its_jobs_by_module_name(tmp_path):
    """`python -m bench.report` runs as __main__: its jobs must still name bench.report."""
    assert {job.module for job in report.report_jobs(DRY)} == {"bench.report"}
    assert {job.module for job in gpu_check.correctness_jobs(DRY)} == {"bench.gpu_check"}


# ------------------------------------------------------------------ timm without its __init__


def test_timm_optimizers_load_by_path_without_timm_init(fake_timm):
    classes = [timm_optimizer(name, [str(fake_timm)]) for name in ("LAMB", "LARS", "Adan")]
    assert [c.__name__ for c in classes] == ["Lamb", "Lars", "Adan"]
    assert "timm" not in sys.modules and "timm.optim" not in sys.modules
    param = torch.ones(3, requires_grad=True)
    param.grad = torch.ones(3)
    classes[0]([param], lr=0.5).step()
    assert torch.equal(param.detach(), torch.full((3,), 0.5))


def test_missing_timm_is_a_row_that_says_so(tmp_path, monkeypatch):
    with pytest.raises(TimmNotInstalled, match="timm not installed"):
        timm_optimizer("LAMB", [str(tmp_path)])
    monkeypatch.setattr(report, "timm_optimizer", lambda name: timm_optimizer(name, [str(tmp_path)]))
    rows = [
        {"section": "step time", "name": f"{BERT}: {optimizer} / timm", **report.step_row(DRY, BERT, f"{optimizer} / timm")}
        for optimizer in ("LAMB", "LARS", "Adan")
    ]
    assert all(r["status"] == "skipped" and r["detail"].startswith("timm not installed") for r in rows)
    text = markdown({**_empty_report(rows), "rows": rows})
    for optimizer in ("LAMB", "LARS", "Adan"):
        assert f"| {optimizer} | timm | skipped: timm not installed" in text


# ------------------------------------------------------------------ the checks and the verdicts


def _empty_report(rows: list[dict]) -> dict:
    return {
        "title": "t",
        "profile": "cuda",
        "note": None,
        "started": "now",
        "device": "GPU",
        "versions": {"torch": "x", "triton": "y", "timm": None},
        "complete": False,
        "pending": [],
        "rows": rows,
        "targets": None,
    }


def test_errors_against_tolerance():
    def tensors(first: float) -> list[torch.Tensor]:
        return [torch.tensor([first, -2.0, 4.0], dtype=torch.float64)]

    expected = tensors(1.0)
    assert gpu_check._errors(expected, expected) == 0.0
    tolerance = gpu_check.RTOL * 1.0 + gpu_check.ATOL_SCALE * 4.0  # at the first element, max |expected| = 4
    assert gpu_check._errors(tensors(1.0 + tolerance / 2), expected) == pytest.approx(0.5, rel=1e-3)
    assert gpu_check._errors(tensors(1.0 + 2 * tolerance), expected) == pytest.approx(2.0, rel=1e-3)
    assert gpu_check._errors(tensors(float("nan")), expected) == float("inf")
    assert gpu_check._errors([], expected) == float("inf")  # a missing state tensor
    assert gpu_check._errors([torch.ones(1, dtype=torch.float64)], expected) == float("inf")  # would broadcast


class _OffWhenFused(torch.optim.SGD):
    """A 'fused' path that is 1 % off the reference: the reference check must fail it."""

    def __init__(self, params, lr, fused=False, foreach=None):
        super().__init__(params, lr=lr * (1.01 if fused else 1.0))


def test_reference_check_fails_a_fused_path_that_differs(monkeypatch):
    monkeypatch.setitem(gpu_check.VARIANTS, "off", (_OffWhenFused, {"lr": 0.1}))
    row = gpu_check.check_reference(DRY, "off")
    assert row["status"] == "FAILED"
    assert all(case["params"] > 1.0 for case in row["cases"].values())


@requires_interpreter
@pytest.mark.parametrize(("check", "variant"), [("check_no_host_sync", "Adan max_grad_norm"), ("check_graph", "LARS")])
def test_cpu_paths_of_the_cuda_checks_pass_on_the_fused_steps(check, variant):
    row = getattr(gpu_check, check)(DRY, variant)
    assert row["status"] == "ok", row
    assert row["detail"].startswith("dry run:")


def test_targets_and_shares_from_rows(tmp_path):
    file = ReportFile(tmp_path, "r", "t", "cuda", [])
    file.report["pending"] = ["copy bandwidth", "a", "b", "c"]
    file.add({"section": "bandwidth", "name": "copy bandwidth", "status": "ok", "copy_bandwidth_GBps": 1000.0})

    def step(name, optimizer, implementation, shapes, device_ms):
        params = 10**9 // report.MIN_BYTES_PER_PARAM[optimizer]  # 1 GB moved per step
        return {
            "section": "step time", "name": name, "status": "ok", "optimizer": optimizer,
            "implementation": implementation, "shapes": shapes, "params": params,
            "bytes_per_param": report.MIN_BYTES_PER_PARAM[optimizer], "host_ms": 0.1, "device_ms": device_ms,
        }  # fmt: skip

    file.add(step("a", "LAMB", "largebatch fused", "bert-large", 1.0))  # 1 GB in 1 ms = 1000 GB/s: 100 %
    file.add(step("b", "LARS", "largebatch fused", "resnet-50", 2.0))
    file.add(step("c", "SGD-momentum", "torch fused", "resnet-50", 1.0))
    rows = file.report["rows"]
    assert rows[1]["share_of_copy_bandwidth"] == pytest.approx(1.0, rel=1e-6)
    verdicts = {t["target"].split(" ")[2]: t["met"] for t in file.report["targets"][:3]}
    assert verdicts == {"LAMB": True, "LARS": None, "Adan": None}
    assert file.report["targets"][3]["met"] is False  # LARS 2 ms against SGD's 1 ms
    text = file.markdown_path.read_text()
    assert "- met: bert-large fused LAMB" in text and "- not measured: bert-large fused Adan" in text
    assert "- NOT met: resnet-50 fused LARS" in text

