"""
The checks of the wait arguments every operator, sensor and trigger takes: durations, deadlines, counts.

Each refuses what it cannot use exactly with an :class:`InvalidInputError` naming the argument, before
anything is sent; none converts (a bool, a float count or a numeric string is refused, not read).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from airflow_provider_llmbatch.exceptions import InvalidInputError

MAX_WAIT_SECONDS = 60 * 24 * 3600.0
"""The longest duration any wait argument may have (60 days; the longest vendor window is 14)."""


def check_deadline(value: Any) -> float | None:
    """Return a deadline (epoch seconds) or None; refuse what is not a finite number of seconds."""
    if value is None:
        return None
    seconds = _as_float(value)
    if seconds is None or not math.isfinite(seconds):
        raise InvalidInputError(f"deadline must be epoch seconds (a finite number) or None, got {value!r}")
    return seconds


def _as_float(value: Any) -> float | None:
    """Return an int or float as a float (infinite beyond the float range), or None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int with more than about 308 digits
        return math.inf if value > 0 else -math.inf


def check_seconds(
    name: str, value: Any, *, allow_zero: bool = False, maximum: float = MAX_WAIT_SECONDS
) -> float:
    """
    Return a duration argument in seconds, or refuse it: the one check of every timeout and interval.

    :param name: the argument's name, for the message.
    :param value: seconds (int or float) or a ``timedelta``.
    :param allow_zero: whether 0 is a valid value.
    :param maximum: the largest value accepted.
    :raises InvalidInputError: naming the argument and what is allowed.
    """
    seconds = _as_float(value.total_seconds() if isinstance(value, timedelta) else value)
    low = "0" if allow_zero else "more than 0"
    if seconds is None:
        raise InvalidInputError(f"{name} must be seconds (a number or a timedelta), got {value!r}")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero) or seconds > maximum:
        raise InvalidInputError(f"{name} must be from {low} to {maximum:g} seconds, got {value!r}")
    return seconds


def check_count(name: str, value: Any, *, minimum: int = 0) -> int:
    """
    Return a whole-number argument (a count: errors, batches, rounds), or refuse it naming the argument.

    A bool, a float (even ``2.0``), a string and anything below ``minimum`` are refused, never converted.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_batch_ids(value: Any, name: str = "batch_id") -> list[str]:
    """
    Return a batch id, or the batch ids of a split job, as a list: each stripped, none twice.

    A list's text (a template rendered as a string) is refused: no vendor's batch id looks like that.
    """
    if isinstance(value, str) and value.lstrip().startswith("["):
        raise InvalidInputError(
            f"{name} rendered to the text of a list ({value[:80]!r}); pass the list itself, e.g. "
            "create.output['batch_ids'], or render templates as native objects"
        )
    ids = [value] if isinstance(value, str) else value
    if not isinstance(ids, list | tuple) or not ids or not all(isinstance(i, str) and i.strip() for i in ids):
        raise InvalidInputError(f"{name} must be a non-empty string or a list of them, got {value!r}")
    stripped = [i.strip() for i in ids]
    if len(set(stripped)) < len(stripped):
        raise InvalidInputError(f"{name} names a batch more than once: {value!r}")
    return stripped
