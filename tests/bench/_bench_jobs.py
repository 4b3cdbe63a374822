"""Job functions for tests/bench that fail in the ways a GPU run can (imported by the child
processes of bench/isolated.py; nothing here imports torch, so each child starts in a blink)."""

from __future__ import annotations

import atexit
import os
import time
from typing import Any


class UnusualFailure(BaseException):
    """Not an Exception subclass: the runner must record it all the same."""


def succeed(value: int) -> dict[str, Any]:
    return {"detail": f"value {value}", "value": value}


def raise_unusual() -> dict[str, Any]:
    raise UnusualFailure("a failure of no common type")


def abort() -> dict[str, Any]:
    print("about to abort, as a CUDA illegal address does", flush=True)
    os.abort()


def hang() -> dict[str, Any]:
    time.sleep(600)
    return {}


def crash_after_result() -> dict[str, Any]:
    atexit.register(os._exit, 3)  # after the row is written, as a poisoned CUDA context's teardown
    return {"detail": "measured"}


def no_device() -> dict[str, Any]:
    return {"status": "error", "detail": "no CUDA device", "fatal": True}
