"""
The trigger that waits for a batch in the triggerer's event loop.

Every trigger of a triggerer shares one asyncio loop, so nothing here blocks: the connection is looked
up asynchronously and HTTP goes through the hook's async face, whose session is shared per loop and
origin. Every decision of the wait is the poll state machine's
(:class:`~airflow_provider_llmbatch.polling.Poller`); the trigger only polls, sleeps and cancels around it.
The deadline is wall-clock epoch seconds, so a trigger rebuilt after a triggerer restart keeps it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    EVENT_KINDS,
    Cancel,
    Poller,
    Step,
    Wait,
    check_deadline,
    check_seconds,
    format_duration,
)

__all__ = ["CLASSPATH", "EVENT_KINDS", "BatchTrigger"]

CLASSPATH = "airflow_provider_llmbatch.triggers.batch.BatchTrigger"

# Seams for tests: deadlines and waits are read through these, looked up at call time.
clock: Callable[[], float] = time.time
"""Return the wall-clock time in epoch seconds."""

sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
"""Wait without blocking the event loop."""


class BatchTrigger(BaseTrigger):
    """
    Poll a batch until it ends, the deadline passes, or polling keeps failing; yield one event.

    The event payload is ``{"event": "terminal" | "timeout" | "error", "batch": <summary> | None,
    "message": str, "polls": int}``. Each poll is one request; transient errors (connection, timeout,
    rate limit, 5xx) are tolerated up to ``max_consecutive_errors`` in a row, others end the wait at once.

    :param conn_id: the LLM batch connection; its type decides the vendor.
    :param batch_id: the vendor's batch id.
    :param poll_interval: the typical seconds between polls; early polls come sooner (default: 30).
    :param max_poll_interval: no scheduled wait between polls is longer (default: 600).
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
        self.poll_interval = check_seconds("poll_interval", poll_interval)
        self.max_poll_interval = check_seconds("max_poll_interval", max_poll_interval)
        self.deadline = check_deadline(deadline)
        self.cancel_on_kill = bool(cancel_on_kill)
        self.cancel_on_timeout = bool(cancel_on_timeout)
        self.max_consecutive_errors = max(int(max_consecutive_errors), 1)
        self._hook: BatchHook | None = None

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
        """Return the hook, created on first use; its HTTP session is shared per loop and origin."""
        if self._hook is None:
            self._hook = BatchHook(self.conn_id)
        return self._hook

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the batch ends, the deadline passes or polling fails for good; yield one event."""
        started = clock()
        poller = Poller(
            self.batch_id,
            started=started,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            deadline=self.deadline,
            cancel_on_timeout=self.cancel_on_timeout,
            max_consecutive_errors=self.max_consecutive_errors,
            log=self.log,
        )
        left = "" if self.deadline is None else f", deadline in {format_duration(self.deadline - started)}"
        self.log.info("Waiting for batch %s (conn %s)%s", self.batch_id, self.conn_id, left)
        step: Step = Wait(0.0)
        while isinstance(step, Wait):
            await sleep(step.seconds)
            step = await self._poll(poller)
        if isinstance(step, Cancel):
            step = poller.after_cancel(await self._cancel(step.reason))
        yield TriggerEvent(poller.event(step))  # type: ignore[no-untyped-call]

    async def _poll(self, poller: Poller) -> Step:
        """Read the batch once and return the state machine's next step."""
        sent_at: float | None = None
        try:
            # Timed from when it holds a connection: queueing for one never shortens the next wait.
            async with await self.hook.aslots():
                sent_at = clock()
                result: Batch | Exception = await self.hook.aget_batch(self.batch_id, retry=False)
        except Exception as exc:
            # A failed poll was sent when it held its slot (as on the worker); one that never got a slot
            # (the connection look-up failed) is timed from its failure.
            sent_at, result = (clock() if sent_at is None else sent_at), exc
        step = poller.after(result, sent_at=sent_at, now=clock())
        # Nothing of the answer outlives the poll: kept through the wait, a thousand waiters' parsed batches
        # (or a failure's traceback, which holds this frame) end up in the collector's oldest generation.
        del result
        return step

    async def _cancel(self, reason: str) -> dict[str, Any] | None:
        self.log.info("Cancelling batch %s: %s", self.batch_id, reason)
        try:
            return (await self.hook.acancel_batch(self.batch_id)).summary()
        except Exception as exc:
            # Best effort: the batch may be unreachable; the event says the cancel failed.
            self.log.warning("Could not cancel batch %s: %s", self.batch_id, exc)
            return None

    async def on_kill(self) -> None:
        """Cancel the batch when a user kills the deferred task, if ``cancel_on_kill``."""
        if self.cancel_on_kill:
            await self._cancel("the task was killed")
        else:
            self.log.info("Task killed; batch %s left running (cancel_on_kill=False)", self.batch_id)

    async def cleanup(self) -> None:
        """Release the hook's HTTP session; the remote batch is left alone."""
        hook, self._hook = self._hook, None
        if hook is not None:
            await hook.aclose()
