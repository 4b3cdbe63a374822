"""Argument checks shared by the schedules: each raises a ValueError that names the argument."""

from __future__ import annotations

import math
from numbers import Integral, Real


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int if it is an integer ≥ 1 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value: object) -> int:
    """Return ``value`` as an int if it is an integer ≥ 0 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_finite_real(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_in_range(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    """Return ``value`` as a float if it lies in [low, high], or (low, high] when ``low_open``."""
    number = check_finite_real(name, value)
    below = number <= low if low_open else number < low
    if below or number > high:
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return number
