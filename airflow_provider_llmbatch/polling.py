"""
The one poll state machine: given what a poll returned, decide the next step.

:class:`Poller` holds the state of one wait for one batch and answers every poll's result (a batch or
an error) with a step: :class:`Wait` N seconds, :class:`Cancel` the batch (the deadline passed) or
:class:`Finish` with an event. ``BatchTrigger.run`` (async, in the triggerer) and the sensor's wait on a
worker are each only the I/O around it, and both end with the same event payload.

The schedule is adaptive and a promise about the user's API quota. Polls start close together (a file
the vendor rejects shows up as ``failed`` within seconds), spread out as the wait grows, and come back
sooner when progress says the end is near. The schedule gives the delay between the *starts* of two
polls, and each poll starts exactly that long after the previous one (or at once, when an answer took
longer). The start of a poll is when it holds a connection, so time spent queueing for one never
shortens the next wait. Waiters started together (a burst of tasks, a triggerer restart) are spread by
their first wait only (±10%, mean zero), so they never poll in lockstep and never more often than
scheduled. After a failed poll the delay doubles from the scheduled one (never shorter), lengthened by
up to 10% so failing waiters do not come back together, or follows ``Retry-After``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from airflow_provider_llmbatch.exceptions import VendorAPIError
from airflow_provider_llmbatch.models import TERMINAL_STATUSES, Batch, BatchStatus
from airflow_provider_llmbatch.outcomes import describe, request_counts
from airflow_provider_llmbatch.retry import classify

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

JITTER = 0.1
"""The first wait is the scheduled delay times ``1 ± JITTER`` (mean zero); error waits ``1 + [0, JITTER)``."""

CAP_MARGIN = 0.02
"""
The capped delay is ``max_poll_interval`` less this share (at most 1 s): room for the answer's way back,
so a batch that ends right after a poll is still seen within ``max_poll_interval``.
"""

MAX_RETRY_AFTER = 3600.0
"""The longest ``Retry-After`` a wait honours between polls (a longer one waits ``max_poll_interval``)."""

QUIET_LOG_SECONDS = 600.0
"""A poll that changes nothing (status, counts) is logged only if nothing was logged for this long."""

EventKind = Literal["terminal", "timeout", "error"]
"""What a wait's final event reports."""

EVENT_KINDS: frozenset[str] = frozenset({"terminal", "timeout", "error"})

_SHORT_PHASES = frozenset({BatchStatus.FINALIZING.value, BatchStatus.CANCELLING.value})
_KNOWN_STATUSES = frozenset(status.value for status in BatchStatus)
TERMINAL_VALUES = frozenset(status.value for status in TERMINAL_STATUSES)
"""The terminal statuses, as the vendors write them."""


class RandomLike(Protocol):
    """Anything with ``random() -> float`` in ``[0, 1)``, such as :class:`random.Random`."""

    def random(self) -> float:
        """Return the next float in ``[0, 1)``."""
        ...


def scheduled_delay(
    elapsed_s: float, summary: Mapping[str, Any] | None, *, poll_interval: float, max_poll_interval: float
) -> float:
    """
    Return the seconds the schedule puts between the start of the last poll and the next.

    :param elapsed_s: seconds since the wait began.
    :param summary: the latest batch summary, or None if no poll has succeeded yet.
    :param poll_interval: the typical delay; the first delays are a quarter of it.
    :param max_poll_interval: a batch's end is seen within this long (the delay's cap, less
        :data:`CAP_MARGIN`).
    """
    elapsed_s = max(elapsed_s, 0.0)
    ramp = poll_interval * min(1.0, WARMUP_FRACTION + elapsed_s / (WARMUP_POLL_INTERVALS * poll_interval))
    delay = max(ramp, elapsed_s * GROWTH) if ramp >= poll_interval else ramp
    if summary and summary.get("status") in _SHORT_PHASES:
        delay = min(delay, poll_interval)
    eta = _eta_seconds(elapsed_s, summary)
    if eta is not None:
        # Come back around the estimated end rather than a long fixed delay after it.
        delay = min(delay, max(eta, poll_interval * WARMUP_FRACTION))
    return min(delay, max_poll_interval - min(CAP_MARGIN * max_poll_interval, 1.0))


def error_delay(
    scheduled: float, consecutive_errors: int, retry_after: float | None, max_poll_interval: float
) -> float:
    """
    Return the delay after ``consecutive_errors`` failed polls in a row: never sooner than scheduled.

    Doubles from the scheduled delay up to ``max_poll_interval``; a vendor's ``Retry-After`` is honoured
    up to :data:`MAX_RETRY_AFTER` (or ``max_poll_interval``, if longer): a hostile value cannot park a wait.
    """
    backoff = min(
        scheduled * 2.0 ** min(max(consecutive_errors, 1) - 1, 30), max(max_poll_interval, scheduled)
    )
    honoured = min(retry_after or 0.0, max(MAX_RETRY_AFTER, max_poll_interval))
    return max(backoff, honoured)


def spread(
    delay: float, rng: RandomLike | None = None, *, low: float = -JITTER, high: float = JITTER
) -> float:
    """Return ``delay`` times ``1 + u``, ``u`` uniform in ``[low, high)``."""
    return delay * (1.0 + low + (high - low) * (rng or random).random())


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


def format_duration(seconds: float) -> str:
    """Return seconds as a short human duration such as ``1h02m`` or ``45s``."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass(frozen=True)
class Wait:
    """Poll again after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Cancel:
    """The deadline passed: cancel the batch, then hand the result to :meth:`Poller.after_cancel`."""

    reason: str


@dataclass(frozen=True)
class Finish:
    """Stop and send the event (see :meth:`Poller.event`)."""

    kind: EventKind
    message: str


Step = Wait | Cancel | Finish


class Poller:
    """
    The state of one wait for one batch; every decision of the wait, no I/O.

    :param batch_id: the vendor's batch id.
    :param started: when the wait began (epoch seconds; the schedule grows from here).
    :param poll_interval: the typical seconds between polls.
    :param max_poll_interval: no scheduled delay is longer.
    :param deadline: epoch seconds after which the wait ends with ``timeout`` (None: no deadline).
    :param cancel_on_timeout: cancel the batch when the deadline passes.
    :param max_consecutive_errors: transient errors in a row before the wait ends with ``error``.
    :param log: where progress and failures are logged.
    :param rng: the source of jitter (default: the ``random`` module).
    :param progress: log each change of status and counts (a part of a job leaves that to
        :class:`~airflow_provider_llmbatch.fanin.GroupProgress`).
    """

    def __init__(
        self,
        batch_id: str,
        *,
        started: float,
        poll_interval: float,
        max_poll_interval: float,
        deadline: float | None,
        cancel_on_timeout: bool,
        max_consecutive_errors: int,
        log: logging.Logger | Any,
        rng: RandomLike | None = None,
        progress: bool = True,
    ) -> None:
        self.batch_id = batch_id
        self.started = started
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.deadline = deadline
        self.cancel_on_timeout = cancel_on_timeout
        self.max_consecutive_errors = max(int(max_consecutive_errors), 1)
        self.log = log
        self.rng = rng
        self.progress = progress
        self.polls = 0
        self.errors = 0
        self.summary: dict[str, Any] | None = None
        self._first_progress: tuple[float, int] | None = None
        self._last_logged: tuple[tuple[Any, ...] | None, float] = (None, 0.0)

    def after(self, result: Batch | BaseException, *, sent_at: float, now: float) -> Step:
        """
        Return the step after one poll.

        :param result: the batch the poll read, or the exception it raised.
        :param sent_at: when the poll was sent (it held a connection).
        :param now: when its answer (or failure) came.
        """
        self.polls += 1
        retry_after: float | None = None
        if isinstance(result, Batch):
            self.errors = 0
            self.summary = result.summary()
            if self.progress:
                self._log_progress(result.status, now)
            if result.is_terminal:
                return Finish("terminal", describe(self.summary))
        elif isinstance(result, VendorAPIError) and classify(result) is not None:
            self.errors += 1
            if self.errors >= self.max_consecutive_errors:
                what = f"failed {self.errors} times in a row; last error: {result}"
                return self._fail(f"Polling batch {self.batch_id} {what}")
            self.log.warning(
                "Poll %d of batch %s failed (%d/%d in a row, will retry): %s",
                self.polls,
                self.batch_id,
                self.errors,
                self.max_consecutive_errors,
                result,
            )
            retry_after = result.retry_after
        else:
            # Not worth another poll: a refused key, a missing connection, an unknown batch.
            return self._fail(f"Polling batch {self.batch_id} failed: {type(result).__name__}: {result}")
        if self.deadline is not None and now >= self.deadline:
            if self.cancel_on_timeout:
                return Cancel("the deadline passed")
            return self._timeout("; left running (cancel_on_timeout=False)")
        delay = scheduled_delay(
            now - self.started,
            self.summary,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
        )
        if self.errors:
            delay = error_delay(delay, self.errors, retry_after, self.max_poll_interval)
        if self.errors:
            delay = spread(delay, self.rng, low=0.0)
        elif self.polls == 1:
            delay = spread(delay, self.rng)
        wait = max(sent_at + delay - now, 0.0)
        if self.deadline is not None:
            wait = min(wait, self.deadline - now)
        return Wait(wait)

    def after_cancel(self, cancelled: Mapping[str, Any] | None) -> Finish:
        """
        Return the final step after the cancel that a :class:`Cancel` step asked for.

        :param cancelled: the batch summary the cancel returned, or None when it failed.
        """
        if cancelled is None:
            return self._timeout("; the cancel request failed")
        self.summary = dict(cancelled)
        return self._timeout(f"; cancel requested (status now {cancelled.get('status')})")

    def event(self, step: Finish) -> dict[str, Any]:
        """Return the event payload of the final step: JSON primitives only, never a secret."""
        return {
            "event": step.kind,
            "batch_id": self.batch_id,
            "batch": self.summary,
            "batches": [self.summary],
            "message": step.message,
            "polls": self.polls,
        }

    def _fail(self, message: str) -> Finish:
        self.log.error("%s", message)
        return Finish("error", message)

    def _timeout(self, how: str) -> Finish:
        message = f"Batch {self.batch_id} did not finish before the deadline{how}"
        self.log.error("%s", message)
        return Finish("timeout", message)

    def _log_progress(self, status: str, now: float) -> None:
        assert self.summary is not None
        counts = request_counts(self.summary)
        seen = (status, counts)
        if seen == self._last_logged[0] and now - self._last_logged[1] < QUIET_LOG_SECONDS:
            return
        self._last_logged = (seen, now)
        if counts is None:
            self.log.info("Batch %s: status %s, request counts unknown", self.batch_id, status)
        else:
            completed, failed, total = counts
            rate, eta = self._estimate(now, completed + failed, total)
            self.log.info(
                "Batch %s: status %s, %d completed, %d failed of %d; rate %s; ETA %s",
                self.batch_id,
                status,
                completed,
                failed,
                total,
                "n/a" if rate is None else f"{rate:.1f} requests/min",
                "n/a" if eta is None else format_duration(eta),
            )
        if status not in _KNOWN_STATUSES:
            self.log.warning(
                "Batch %s has status %r, which no vendor documents; polling on until the deadline",
                self.batch_id,
                status,
            )

    def _estimate(self, now: float, done: int, total: int) -> tuple[float | None, float | None]:
        """Return (requests per minute, seconds to go) from the counts seen during this wait."""
        if self._first_progress is None or done < self._first_progress[1]:
            self._first_progress = (now, done)
            return None, None
        since, done_then = self._first_progress
        if now <= since:
            return None, None
        per_second = (done - done_then) / (now - since)
        if per_second <= 0:
            return 0.0, None
        return per_second * 60.0, max(total - done, 0) / per_second
