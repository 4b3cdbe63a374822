"""Run a two-rank worker script (``python WORKER OUT_FILE PORT``) and load what it saved."""

import socket
import subprocess
import sys
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(worker: str, out: Path, timeout_s: int = 300):
    """The object the worker's rank 0 saved to ``out``; a failed worker fails with its stderr."""
    proc = subprocess.run(
        [sys.executable, worker, str(out), str(_free_port())], capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)
