"""Run a list of jobs one by one, each isolated (bench/isolated.py), and rewrite the JSON and the
Markdown after every row, so that a run killed halfway loses nothing it measured.

Every planned job ends as a row, whatever happens: its result; "error" with the exception text,
the exit signal or the timeout; "skipped" with the reason (timm not installed, the time budget
spent, or an environment that cannot run anything). Rows never vanish: the files list the jobs
still pending until the end, and a report without `"complete": true` was cut short.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.isolated import REPO_ROOT, Job, run_isolated
from bench.report import MIN_BYTES_PER_PARAM, PROFILES, TARGET_SHARE_OF_COPY_BANDWIDTH, Profile

# A job is not started with less time than this left in the budget (it would only time out).
MIN_JOB_S = 15.0
DEFAULT_BUDGET_S = 450.0  # 7.5 minutes: the whole check must end within 8 on the GPU machine
FAILED = ("error", "FAILED")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def c_compiler() -> str | None:
    """The C compiler Triton would build its launcher with ($CC, else cc, gcc or clang)."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next(filter(None, (shutil.which(name) for name in ("cc", "gcc", "clang"))), None)


def environment(profile: str) -> dict[str, Any]:
    """Job function: what this machine has, and whether the profile can run on it at all."""
    import torch

    config = PROFILES[profile]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "timm": _version("timm"),
        "pytest-benchmark": _version("pytest-benchmark"),
        "c_compiler": c_compiler(),
        "python_headers": str(headers) if headers.exists() else None,
    }
    problems, fatal = [], False
    if config.device == "cuda":
        if not torch.cuda.is_available():
            problems.append(f"torch sees no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})")
            fatal = True
        else:
            props = torch.cuda.get_device_properties(0)
            facts["device"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        if facts["c_compiler"] is None:
            problems.append("no C compiler (gcc): Triton builds its launcher with one, so every fused row will fail")
        if facts["python_headers"] is None:
            problems.append(f"no Python headers ({headers}): Triton's launcher needs them (python3-dev)")
        if facts["triton"] is None:
            problems.append("triton not installed: every fused row will fail")
    else:
        facts["device"] = "CPU (dry run)"
    summary = ", ".join(f"{k} {v}" for k, v in facts.items() if k != "device")
    return {
        "status": "error" if problems else "ok",
        "detail": "; ".join(problems) if problems else summary,
        "facts": facts,
        "fatal": fatal,
    }


def environment_job(profile: str) -> Job:
    return Job("environment", "environment", "bench.rows", "environment", {"profile": profile}, timeout_s=60)


def child_env(config: Profile) -> dict[str, str]:
    """The children's environment: this repository first on the path; the interpreter only if asked."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if config.interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # set, it would make every fused CUDA row refuse its tensors
    return env


# ------------------------------------------------------------------------------ the files


class ReportFile:
    """`<name>.json` and `<name>.md` under `out`, both rewritten (atomically) after every row."""

    def __init__(self, out: Path, name: str, title: str, profile: str, jobs: list[Job]) -> None:
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"Invalid jobs: their names must be unique (rows are found by name), got {names}")
        self.json_path, self.markdown_path = out / f"{name}.json", out / f"{name}.md"
        self.report: dict[str, Any] = {
            "title": title,
            "profile": profile,
            "note": PROFILES[profile].note,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": None,  # from the environment row
            "versions": {d: _version(d) for d in ("torch", "triton", "timm")},
            "complete": False,
            "pending": [job.name for job in jobs],
            "rows": [],
            "targets": None,
        }
        self.write()

    def add(self, row: dict[str, Any]) -> None:
        rows = self.report["rows"]
        if row["section"] == "environment" and "facts" in row:
            self.report["device"] = row["facts"].get("device")
        if row["section"] == "step time" and row["status"] == "ok":
            row["share_of_copy_bandwidth"] = _share(row, _bandwidth_GBps(rows))
        rows.append(row)
        self.report["pending"].remove(row["name"])
        if self.report["profile"] == "cuda":
            self.report["targets"] = targets(rows)
        self.write()

    def finish(self) -> None:
        self.report["complete"] = True
        self.report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.write()

    def write(self) -> None:
        _replace(self.json_path, json.dumps(self.report, indent=2, default=str) + "\n")
        _replace(self.markdown_path, markdown(self.report))


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _bandwidth_GBps(rows: list[dict[str, Any]]) -> float | None:
    return next((r["copy_bandwidth_GBps"] for r in rows if r["section"] == "bandwidth" and r["status"] == "ok"), None)


def _share(row: dict[str, Any], bandwidth_GBps: float | None) -> float | None:
    """The step's share of copy bandwidth, from its device time (its host time on the CPU)."""
    ms = row["device_ms"] if row.get("device_ms") is not None else row["host_ms"]
    if bandwidth_GBps is None or not ms:
        return None
    return row["bytes_per_param"] * row["params"] / (ms / 1e3) / (bandwidth_GBps * 1e9)


def _find(rows: list[dict[str, Any]], shapes: str, optimizer: str, implementation: str) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r["section"] == "step time"
            and r["status"] == "ok"
            and (r["shapes"], r["optimizer"], r["implementation"]) == (shapes, optimizer, implementation)
        ),
        None,
    )


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, from the rows measured so far ("met": None while not measured)."""
    checks = []
    for optimizer in ("LAMB", "LARS", "Adan"):
        row = _find(rows, "bert-large", optimizer, "largebatch fused")
        share = row and row["share_of_copy_bandwidth"]
        checks.append({
            "target": f"bert-large fused {optimizer} >= {TARGET_SHARE_OF_COPY_BANDWIDTH:.0%} of copy bandwidth",
            "value": share,
            "met": None if share is None else share >= TARGET_SHARE_OF_COPY_BANDWIDTH,
        })  # fmt: skip
    ours = _find(rows, "resnet-50", "LARS", "largebatch fused")
    sgd = _find(rows, "resnet-50", "SGD-momentum", "torch fused")
    measured = ours is not None and sgd is not None
    checks.append({
        "target": "resnet-50 fused LARS step (device ms) no slower than torch fused SGD-momentum",
        "value": [ours and ours["device_ms"], sgd and sgd["device_ms"]],
        "met": ours["device_ms"] <= sgd["device_ms"] if measured else None,
    })  # fmt: skip
    return checks


# --------------------------------------------------------------------------- the Markdown


def _cell(text: Any, limit: int = 90) -> str:
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    first = first if len(first) <= limit else first[: limit - 1] + "…"
    return first.replace("|", "\\|")


def _status_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| check | status | detail | s |", "|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['status']} | {_cell(r.get('detail') or '', 200)} | {r.get('seconds', '')} |")
    return lines


def _step_table(rows: list[dict[str, Any]]) -> list[str]:
    shape_sets = list(dict.fromkeys(r["shapes"] for r in rows if "shapes" in r))
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        optimizer, implementation = r.get("optimizer"), r.get("implementation")
        if optimizer is None:  # a row that died before saying what it measures: its name says it
            shapes, _, label = r["name"].partition(": ")
            optimizer, _, implementation = label.partition(" / ")
        else:
            shapes = r["shapes"]
        if shapes not in shape_sets:
            shape_sets.append(shapes)
        by_key.setdefault((optimizer, implementation), {})[shapes] = r
    header = "| optimizer | implementation | " + " | ".join(f"{s}: host ms | device ms | %" for s in shape_sets) + " |"
    lines = [header, "|---|---|" + "---:|---:|---:|" * len(shape_sets)]
    for (optimizer, implementation), cells_by_set in by_key.items():
        cells = []
        for shapes in shape_sets:
            r = cells_by_set.get(shapes)
            if r is None:
                cells += ["", "", ""]
            elif r["status"] != "ok":
                cells += [f"{r['status']}: {_cell(r.get('detail') or '', 60)}", "", ""]
            else:
                device = "" if r["device_ms"] is None else f"{r['device_ms']:.3f}"
                share = "" if r.get("share_of_copy_bandwidth") is None else f"{100 * r['share_of_copy_bandwidth']:.1f}"
                cells += [f"{r['host_ms']:.3f}", device, share]
        lines.append(f"| {optimizer} | {implementation} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    versions = " · ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items())
    done = "complete" if report["complete"] else f"INCOMPLETE ({len(rows)} rows so far, {len(report['pending'])} pending)"
    device = report["device"] or "device not known yet"
    lines = [f"# {report['title']}", "", f"{device} · {versions} · started {report['started']} · {done}", ""]
    if report["note"]:
        lines += [f"**{report['note']}**", ""]
    sections = list(dict.fromkeys(r["section"] for r in rows))
    for section in sections:
        in_section = [r for r in rows if r["section"] == section]
        lines += [f"## {section[0].upper()}{section[1:]}", ""]
        if section == "bandwidth":
            for r in in_section:
                ok = r["status"] == "ok"
                value = f"{r['copy_bandwidth_GBps']:.3g} GB/s" if ok else f"{r['status']}: {_cell(r.get('detail') or '')}"
                lines.append(f"Copy bandwidth: {value}.")
        elif section == "step time":
            per_param = ", ".join(f"{k} {v}" for k, v in MIN_BYTES_PER_PARAM.items())
            lines += [
                "host ms: CPU wall time of `step()`, no sync. device ms: CUDA events, device work only. "
                f"% = minimum fp32 bytes per parameter ({per_param}) × parameters / device ms "
                "(host ms off CUDA), over copy bandwidth. Medians.",
                "",
            ]
            lines += _step_table(in_section)
        else:
            lines += _status_table(in_section)
        lines.append("")
    if report["targets"]:
        lines += ["## Targets", ""]
        for t in report["targets"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            lines.append(f"- {verdict}: {t['target']} ({t['value']})")
        lines.append("")
    failures = [r for r in rows if r["status"] in FAILED]
    if failures:
        lines += ["## Failures", ""]
        for r in failures:
            lines += [f"### {r['name']}: {r['status']}", "", "```", str(r.get("detail")), r.get("output") or "", "```", ""]
    if report["pending"]:
        lines += ["## Not run yet", ""] + [f"- {name}" for name in report["pending"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the run


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:80]


def run(
    jobs: list[Job],
    profile: str,
    out: Path,
    name: str,
    title: str,
    budget_s: float = DEFAULT_BUDGET_S,
    on_row: Callable[[ReportFile], None] | None = None,
) -> ReportFile:
    """Run `jobs` in order, each in its own process, within `budget_s`; the files after every row.

    A fatal environment row (no CUDA device) ends the run: the jobs after it become skipped rows.
    `on_row` is called after each row is written (tests watch the files grow with it).
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    file = ReportFile(out, name, title, profile, jobs)
    env = child_env(PROFILES[profile])
    deadline = time.monotonic() + budget_s
    stop_reason = None
    for index, job in enumerate(jobs):
        remaining = deadline - time.monotonic()
        if stop_reason is None and remaining < MIN_JOB_S:
            stop_reason = f"the time budget of {budget_s:.0f} s was spent"
        if stop_reason is not None:
            row = {"section": job.section, "name": job.name, "status": "skipped", "detail": f"not run: {stop_reason}"}
        else:
            row = run_isolated(job, env, logs / f"{index:02d}-{_slug(job.name)}.log", min(job.timeout_s, remaining))
            if row.get("fatal"):
                stop_reason = f"{job.name}: {row['detail']}"
        file.add(row)
        print(f"[{index + 1}/{len(jobs)}] {row['status']:7} {job.name} ({row.get('seconds', 0)} s)", flush=True)
        if on_row is not None:
            on_row(file)
    file.finish()
    return file


def add_run_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for the JSON, Markdown and logs")
    parser.add_argument("--name", default=default_name, help="file name stem of the JSON and Markdown")
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry run: tiny shapes, interpreted kernels")
    parser.add_argument(
        "--only", action="append", default=[], help="run only the jobs whose name contains this (repeatable)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="stop starting jobs after this many seconds"
    )


def run_from_arguments(args: argparse.Namespace, make_jobs: Callable[[str], list[Job]], title: str) -> None:
    """Run `make_jobs(profile)` after the environment row, as the arguments say; exit 1 on any failure."""
    # Killed by a timeout's SIGTERM, the run still takes its running child down (see run_isolated);
    # the files already hold every finished row.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    profile = "dry-run" if args.dry_run else "cuda"
    jobs = [j for j in make_jobs(profile) if not args.only or any(o in j.name for o in args.only)]
    file = run([environment_job(profile), *jobs], profile, args.out, args.name, title, args.budget_s)
    print(file.markdown_path.read_text())
    print(f"Written: {file.json_path} and {file.markdown_path} (logs in {args.out / 'logs'})")
    if any(r["status"] in FAILED for r in file.report["rows"]):
        raise SystemExit(1)
