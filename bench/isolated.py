"""Run one benchmark or check in its own Python process, so that its failure is a row, not the end.

A Triton compile error, a Python exception of any type, an illegal memory access that poisons
the CUDA context, a segfault, a hang: each ends only the child process, and the parent records a
row saying what happened (with the exception text, or the exit signal and the end of stderr), then
goes on with the next job. The parent never touches CUDA itself.

A job names a function by module and attribute; the child imports it, calls it with the job's
JSON keyword arguments, and writes the dict it returns (a row) to a result file:

    python -m bench.isolated RESULT_JSON MODULE FUNCTION KWARGS_JSON

A job function returns its row's fields; "status" defaults to "ok" (others: "FAILED" for a
check that ran and found a difference, "skipped" with a "detail" saying why). The runner adds
"error" rows itself.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# How much of a failure's text a row keeps: enough for a Triton or CUDA error message.
TAIL_CHARS = 4000
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Job:
    """One row of the report: `module.function(**kwargs)`, run in a child process."""

    section: str
    name: str
    module: str
    function: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: float = 120.0


def _tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "…" + text[-TAIL_CHARS:]


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def run_isolated(
    job: Job, env: Mapping[str, str], log_path: Path | None = None, timeout_s: float | None = None
) -> dict[str, Any]:
    """Run `job` in a child process and return its row; never raises for anything the child does.

    The child gets its own session, so a timeout kills it with everything it started (Triton's
    compiler processes included). stdout and stderr go to `log_path` (and the end of stderr into
    the row when the child dies without a result).
    """
    timeout = job.timeout_s if timeout_s is None else timeout_s
    row: dict[str, Any] = {"section": job.section, "name": job.name}
    with tempfile.TemporaryDirectory(prefix="bench-job-") as scratch:
        result_path = Path(scratch) / "result.json"
        log = Path(scratch) / "log.txt" if log_path is None else log_path
        arguments = [str(result_path), job.module, job.function, json.dumps(dict(job.kwargs))]
        command = [sys.executable, "-m", "bench.isolated", *arguments]
        begin = time.monotonic()
        with open(log, "w") as output:
            child = subprocess.Popen(
                command, cwd=REPO_ROOT, env=dict(env), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:  # on a timeout, on the parent's interruption, and for anything the child left behind
                _kill_group(child)
        row["seconds"] = round(time.monotonic() - begin, 2)
        output_tail = _tail(log.read_text(errors="replace"))
        if result_path.exists():
            row.update(json.loads(result_path.read_text()))
            if returncode:  # it wrote its row, then died (e.g. tearing down a poisoned CUDA context)
                row["detail"] = f"{row.get('detail') or ''} [then {_exit_description(returncode)}]".strip()
            return row
        if returncode is None:
            reason = f"timed out after {timeout:.0f} s"
        else:
            reason = f"{_exit_description(returncode)} without a result"
        return {**row, "status": "error", "detail": reason, "output": output_tail}


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the child and all it started are gone already
    child.wait()


def child_main(argv: list[str]) -> None:
    result_path, module, function, kwargs = argv
    try:
        row = getattr(importlib.import_module(module), function)(**json.loads(kwargs))
        row = {"status": "ok", **row}
    except BaseException as error:  # whatever its type: a Triton CompilationError, an AssertionError, SystemExit, ...
        row = {
            "status": "error",
            "detail": f"{type(error).__module__}.{type(error).__qualname__}: {error}",
            "output": _tail(traceback.format_exc()),
        }
    # Written in one go: the parent reads either the whole row or none.
    partial = Path(result_path + ".partial")
    partial.write_text(json.dumps(row, default=str))
    partial.replace(result_path)


if __name__ == "__main__":
    child_main(sys.argv[1:])
