"""
How long to wait before asking a vendor about a batch again.

Pure functions of elapsed time and progress, shared by the trigger and the sensor's poke mode. Batches
take minutes to hours, so polls start close together (a file the vendor rejects shows up as ``failed``
within seconds), spread out as the wait grows, and come back sooner when progress says the end is near.
Jitter keeps many waiters from polling in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Protocol

from airflow_provider_llmbatch.models import BatchStatus

WARMUP_FRACTION = 0.25
"""The first delay, as a share of ``poll_interval``; the delay ramps up to ``poll_interval`` from there."""

WARMUP_POLL_INTERVALS = 4.0
"""How many ``poll_interval`` of elapsed time the ramp up to ``poll_interval`` takes."""

GROWTH = 0.05
"""
Past the ramp, the delay is this share of the time waited so far (polls grow log-like in number).

It bounds the resume latency of a batch that reports no progress: the end is seen at most this share
of the batch's duration late (measured in ``bench/polls_per_batch.py``).
"""

DEFAULT_POLL_INTERVAL = 30.0
"""The default ``poll_interval`` of the trigger, the sensor and the operators."""

DEFAULT_MAX_POLL_INTERVAL = 600.0
"""
The default ``max_poll_interval``: a 20-hour batch takes about 200 polls (a fixed minute: 1,200), and
the end of a long batch is seen at most ten minutes late, under 1% of its duration.
"""

JITTER = 0.2
"""The delay is shortened by a random share of up to this much; jitter never lengthens it past the cap."""

_SHORT_PHASES = frozenset({BatchStatus.FINALIZING.value, BatchStatus.CANCELLING.value})


class RandomLike(Protocol):
    """Anything with ``random() -> float`` in ``[0, 1)``, such as :class:`random.Random`."""

    def random(self) -> float:
        """Return the next float in ``[0, 1)``."""
        ...


def _jitter(delay: float, rng: RandomLike | None) -> float:
    draw = (rng or random).random()
    return delay * (1.0 - JITTER * draw)


def _eta_seconds(elapsed_s: float, summary: Mapping[str, Any] | None) -> float | None:
    """Return seconds to completion estimated from the average rate so far, or None without progress."""
    counts = summary.get("request_counts") if summary else None
    if not isinstance(counts, Mapping) or elapsed_s <= 0:
        return None
    values = [counts.get(k) for k in ("total", "completed", "failed")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    total, completed, failed = (int(v) for v in values)  # type: ignore[arg-type]
    done = completed + failed
    if total <= 0 or done <= 0:
        return None
    return max(total - done, 0) * elapsed_s / done


def next_poll_delay(
    elapsed_s: float,
    summary: Mapping[str, Any] | None,
    *,
    poll_interval: float,
    max_poll_interval: float,
    rng: RandomLike | None = None,
) -> float:
    """
    Return the seconds to wait before the next poll.

    :param elapsed_s: seconds since the wait began.
    :param summary: the latest batch summary, or None if no poll has succeeded yet.
    :param poll_interval: the typical delay; the first delays are a quarter of it.
    :param max_poll_interval: the cap; no delay is longer.
    :param rng: the source of jitter (default: the ``random`` module).
    """
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
    if max_poll_interval <= 0:
        raise ValueError(f"max_poll_interval must be positive, got {max_poll_interval!r}")
    elapsed_s = max(elapsed_s, 0.0)
    ramp = poll_interval * min(1.0, WARMUP_FRACTION + elapsed_s / (WARMUP_POLL_INTERVALS * poll_interval))
    delay = max(ramp, elapsed_s * GROWTH) if ramp >= poll_interval else ramp
    status = summary.get("status") if summary else None
    if status in _SHORT_PHASES:
        delay = min(delay, poll_interval)
    eta = _eta_seconds(elapsed_s, summary)
    if eta is not None:
        # Come back around the estimated end rather than a long fixed delay after it.
        delay = min(delay, max(eta, poll_interval * WARMUP_FRACTION))
    return _jitter(min(delay, max_poll_interval), rng)


def error_delay(
    consecutive_errors: int,
    *,
    poll_interval: float,
    max_poll_interval: float,
    retry_after: float | None = None,
    rng: RandomLike | None = None,
) -> float:
    """
    Return the seconds to wait after ``consecutive_errors`` failed polls in a row.

    Exponential from a quarter of ``poll_interval``, capped at ``max_poll_interval``; a vendor's
    ``Retry-After`` is honoured up to the cap.

    :param consecutive_errors: failed polls in a row, at least 1.
    :param poll_interval: the typical delay between polls.
    :param max_poll_interval: the cap.
    :param retry_after: seconds the vendor asked us to wait, if it did.
    :param rng: the source of jitter (default: the ``random`` module).
    """
    if poll_interval <= 0 or max_poll_interval <= 0:
        raise ValueError("poll_interval and max_poll_interval must be positive")
    exponent = min(max(consecutive_errors, 1) - 1, 30)
    delay = min(poll_interval * WARMUP_FRACTION * 2.0**exponent, max_poll_interval)
    delay = _jitter(delay, rng)
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, max_poll_interval)
    return delay


def delay_after_poll(
    elapsed_s: float,
    summary: Mapping[str, Any] | None,
    *,
    errors: int,
    retry_after: float | None,
    poll_interval: float,
    max_poll_interval: float,
    poll_seconds: float = 0.0,
    rng: RandomLike | None = None,
) -> float:
    """
    Return the wait before the next poll: error backoff after a failed poll, else the adaptive delay.

    After a successful poll the adaptive delay is shortened by twice ``poll_seconds``: the vendor read
    the state somewhere inside that poll, and the next poll's answer comes back a round trip after it
    starts, so a batch that ends just after one poll is still seen within one delay of its end. The
    shortening takes at most half the delay; error backoff and ``Retry-After`` are never shortened.

    :param elapsed_s: seconds since the wait began.
    :param summary: the latest batch summary, or None if no poll has succeeded yet.
    :param errors: failed polls in a row (0 after a successful poll).
    :param retry_after: seconds the vendor asked us to wait, if it did.
    :param poll_interval: the typical delay between polls.
    :param max_poll_interval: the cap.
    :param poll_seconds: how long the poll just made took, waiting for a slot included.
    :param rng: the source of jitter (default: the ``random`` module).
    """
    if errors:
        return error_delay(
            errors,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            retry_after=retry_after,
            rng=rng,
        )
    delay = next_poll_delay(
        elapsed_s, summary, poll_interval=poll_interval, max_poll_interval=max_poll_interval, rng=rng
    )
    return max(delay - 2.0 * max(poll_seconds, 0.0), delay / 2.0)
