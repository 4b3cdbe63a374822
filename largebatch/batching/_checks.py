"""Argument checks shared by the controller, the sampler and the noise-scale monitor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def is_int(value: Any) -> bool:
    """A true int (bool is an int subclass, and never meant as a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, what: str | None = None) -> None:
    """ValueError naming `name` unless `value` is an int >= `minimum` (`what` words the bound)."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int >= {what or minimum})")


def check_state_dict(state_dict: Any, keys: Sequence[str], owner: str) -> None:
    """ValueError unless `state_dict` is a dict holding every key of an `owner` state."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"Invalid state_dict: {type(state_dict).__name__} (must be a dict)")
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"Invalid state_dict: missing {missing} ({owner} states hold {tuple(keys)})")
