"""
The trigger that waits for a batch in the triggerer's event loop.

Every trigger of a triggerer shares one asyncio loop, so nothing here blocks: the connection is looked
up asynchronously and HTTP goes through the hook's async face, whose client pool is shared per loop.
The deadline is wall-clock epoch seconds, so a trigger rebuilt after a triggerer restart keeps it.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_llmbatch.exceptions import VendorAPIError
from airflow_provider_llmbatch.hooks import _pool
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.outcomes import describe, request_counts
from airflow_provider_llmbatch.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    delay_after_poll,
)
from airflow_provider_llmbatch.retry import classify

EventKind = Literal["terminal", "timeout", "error"]
"""What a :class:`BatchTrigger` event reports."""

EVENT_KINDS: frozenset[str] = frozenset({"terminal", "timeout", "error"})

CLASSPATH = "airflow_provider_llmbatch.triggers.batch.BatchTrigger"

# Seams for tests: deadlines and backoff are checked against these, looked up at call time.
clock: Callable[[], float] = time.time
"""Return the wall-clock time in epoch seconds."""

sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
"""Wait without blocking the event loop."""

MAX_CONCURRENT_POLLS = _pool.MAX_CONNECTIONS
"""
Polls in flight at once per event loop and connection, across every trigger of a triggerer.

As many as the shared HTTP pool has connections: polls then never queue inside the pool, whose
bookkeeping grows with (queued requests x connections) per request, so a burst of triggers started
together waits here, cheaply, instead. Per connection, so one vendor's outage (whose retries wait
inside a slot) never holds back another vendor's polls.
"""

QUIET_LOG_SECONDS = 600.0
"""A poll that changes nothing (status, counts) is logged only if nothing was logged for this long."""

_POLL_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def _poll_slots(conn_id: str) -> asyncio.Semaphore:
    per_conn = _POLL_SLOTS.setdefault(asyncio.get_running_loop(), {})
    slots = per_conn.get(conn_id)
    if slots is None:
        slots = per_conn[conn_id] = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
    return slots


def make_event(kind: EventKind, *, batch: dict[str, Any] | None, message: str, polls: int) -> dict[str, Any]:
    """Return a trigger event payload: JSON primitives only, never a secret."""
    return {"event": kind, "batch": batch, "message": message, "polls": polls}


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


class _Progress:
    """Rate and ETA from the counts seen during this run of the trigger."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None

    def observe(self, now: float, summary: dict[str, Any]) -> tuple[float | None, float | None]:
        """Return (requests per minute, seconds to go), each None until it can be estimated."""
        completed, failed, total = request_counts(summary)
        done = completed + failed
        if self._first is None or done < self._first[1]:
            self._first = (now, done)
            return None, None
        started, done_then = self._first
        elapsed = now - started
        if elapsed <= 0:
            return None, None
        per_second = (done - done_then) / elapsed
        if per_second <= 0:
            return 0.0, None
        return per_second * 60.0, max(total - done, 0) / per_second


class BatchTrigger(BaseTrigger):
    """
    Poll a batch until it ends, the deadline passes, or polling keeps failing; yield one event.

    The event payload is ``{"event": "terminal" | "timeout" | "error", "batch": <summary> | None,
    "message": str, "polls": int}``. Transient API errors (connection, timeout, rate limit, 5xx) are
    tolerated up to ``max_consecutive_errors`` in a row; others end the wait at once.

    :param conn_id: the LLM batch connection; its type decides the vendor.
    :param batch_id: the vendor's batch id.
    :param poll_interval: the typical seconds between polls; early polls come sooner (default: 30).
    :param max_poll_interval: no wait between polls is longer (default: 600).
    :param deadline: epoch seconds (wall clock) after which the wait ends with ``timeout``
        (default: no deadline).
    :param cancel_on_kill: cancel the batch when a user kills the deferred task (default: True).
    :param cancel_on_timeout: cancel the batch when the deadline passes (default: True).
    :param max_consecutive_errors: transient errors in a row before giving up (default: 10).
    """

    def __init__(
        self,
        conn_id: str,
        batch_id: str,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        deadline: float | None = None,
        cancel_on_kill: bool = True,
        cancel_on_timeout: bool = True,
        max_consecutive_errors: int = 10,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.conn_id = conn_id
        self.batch_id = batch_id
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.cancel_on_kill = bool(cancel_on_kill)
        self.cancel_on_timeout = bool(cancel_on_timeout)
        self.max_consecutive_errors = max(int(max_consecutive_errors), 1)
        self._hook: BatchHook | None = None
        self._last_logged: tuple[tuple[Any, ...] | None, float] = (None, 0.0)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the classpath and exactly the constructor's keyword arguments."""
        return (
            CLASSPATH,
            {
                "conn_id": self.conn_id,
                "batch_id": self.batch_id,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "deadline": self.deadline,
                "cancel_on_kill": self.cancel_on_kill,
                "cancel_on_timeout": self.cancel_on_timeout,
                "max_consecutive_errors": self.max_consecutive_errors,
            },
        )

    @property
    def hook(self) -> BatchHook:
        """Return the async-capable hook, created on first use; its HTTP client pool is per loop."""
        if self._hook is None:
            self._hook = BatchHook(self.conn_id)
        return self._hook

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the batch ends, the deadline passes or polling fails for good; yield one event."""
        event = await self._wait()
        yield TriggerEvent(event)  # type: ignore[no-untyped-call]

    async def _wait(self) -> dict[str, Any]:
        started = clock()
        progress = _Progress()
        polls = 0
        errors = 0
        summary: dict[str, Any] | None = None
        self.log.info(
            "Waiting for batch %s (conn %s)%s",
            self.batch_id,
            self.conn_id,
            f", deadline in {format_duration(self.deadline - started)}" if self.deadline is not None else "",
        )
        while True:
            polls += 1
            retry_after: float | None = None
            poll_started = clock()
            try:
                async with _poll_slots(self.conn_id):
                    batch = await self.hook.aget_batch(self.batch_id)
            except VendorAPIError as exc:
                if classify(exc) is None:
                    return self._error_event(f"Polling batch {self.batch_id} failed: {exc}", summary, polls)
                errors += 1
                retry_after = exc.retry_after
                if errors >= self.max_consecutive_errors:
                    return self._error_event(
                        f"Polling batch {self.batch_id} failed {errors} times in a row; last error: {exc}",
                        summary,
                        polls,
                    )
                self.log.warning(
                    "Poll %d of batch %s failed (%d/%d in a row, will retry): %s",
                    polls,
                    self.batch_id,
                    errors,
                    self.max_consecutive_errors,
                    exc,
                )
            except Exception as exc:
                # A missing connection or a connection of the wrong type: no later poll will fix it.
                return self._error_event(
                    f"Polling batch {self.batch_id} failed: {type(exc).__name__}: {exc}", summary, polls
                )
            else:
                errors = 0
                summary = batch.summary()
                self._log_progress(batch, summary, progress.observe(clock(), summary))
                if batch.is_terminal:
                    return make_event("terminal", batch=summary, message=describe(summary), polls=polls)
                # Only the summary lives on through the wait: the parsed batch would be promoted to the
                # collector's oldest generation, and a thousand waiters' worth of it triggers full passes.
                del batch

            now = clock()
            if self.deadline is not None and now >= self.deadline:
                return await self._timeout_event(summary, polls)
            delay = delay_after_poll(
                now - started,
                summary,
                errors=errors,
                retry_after=retry_after,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                poll_seconds=now - poll_started,
            )
            if self.deadline is not None:
                delay = min(delay, max(self.deadline - now, 0.0))
            await sleep(delay)

    def _log_progress(
        self, batch: Batch, summary: dict[str, Any], estimate: tuple[float | None, float | None]
    ) -> None:
        completed, failed, total = request_counts(summary)
        now = clock()
        seen = (batch.status, completed, failed, total)
        if seen == self._last_logged[0] and now - self._last_logged[1] < QUIET_LOG_SECONDS:
            return
        self._last_logged = (seen, now)
        rate, eta = estimate
        self.log.info(
            "Batch %s: status %s, %d completed, %d failed of %d; rate %s; ETA %s",
            self.batch_id,
            batch.status,
            completed,
            failed,
            total,
            "n/a" if rate is None else f"{rate:.1f} requests/min",
            "n/a" if eta is None else format_duration(eta),
        )
        if batch.state is None:
            self.log.warning(
                "Batch %s has status %r, which no vendor documents; polling on until the deadline",
                self.batch_id,
                batch.status,
            )

    def _error_event(self, message: str, summary: dict[str, Any] | None, polls: int) -> dict[str, Any]:
        self.log.error("%s", message)
        return make_event("error", batch=summary, message=message, polls=polls)

    async def _timeout_event(self, summary: dict[str, Any] | None, polls: int) -> dict[str, Any]:
        message = f"Batch {self.batch_id} did not finish before the deadline"
        if self.cancel_on_timeout:
            cancelled = await self._cancel("the deadline passed")
            if cancelled is not None:
                summary = cancelled
                message += f"; cancel requested (status now {cancelled['status']})"
            else:
                message += "; the cancel request failed"
        else:
            message += "; left running (cancel_on_timeout=False)"
        self.log.error("%s", message)
        return make_event("timeout", batch=summary, message=message, polls=polls)

    async def _cancel(self, reason: str) -> dict[str, Any] | None:
        self.log.info("Cancelling batch %s: %s", self.batch_id, reason)
        try:
            batch = await self.hook.acancel_batch(self.batch_id)
        except Exception as exc:
            # Best effort: the batch may already be terminal (the vendor then refuses) or unreachable.
            self.log.warning("Could not cancel batch %s: %s", self.batch_id, exc)
            return None
        return batch.summary()

    async def on_kill(self) -> None:
        """Cancel the batch when a user kills the deferred task, if ``cancel_on_kill``."""
        if self.cancel_on_kill:
            await self._cancel("the task was killed")
        else:
            self.log.info("Task killed; batch %s left running (cancel_on_kill=False)", self.batch_id)

    async def cleanup(self) -> None:
        """Release the hook's HTTP client; the remote batch is left alone."""
        if self._hook is not None:
            hook, self._hook = self._hook, None
            await hook.aclose()
