"""Run a two-rank worker script (``python WORKER OUT_FILE STORE_FILE``) and load what it saved.

The ranks meet through a FileStore in the test's own directory, not a TCP port: a port picked by
binding port 0 and releasing it can be taken by another test before the workers bind it.
"""

import subprocess
import sys
from pathlib import Path

import torch


def run_worker(worker: str, out: Path, timeout_s: int = 300):
    """The object the worker's rank 0 saved to ``out``; a failed worker fails with its stderr."""
    proc = subprocess.run(
        [sys.executable, worker, str(out), str(out.with_suffix(".store"))], capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)
