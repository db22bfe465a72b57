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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_llmbatch.checks import check_batch_ids, check_count, check_deadline, check_seconds
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.fanin import GroupProgress, group_event
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    EVENT_KINDS,
    Cancel,
    Finish,
    Poller,
    Step,
    Wait,
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
    Poll a batch, or every part of a job, until all have ended, the deadline passes, or polling keeps
    failing; yield one event.

    The event payload is ``{"event": "terminal" | "timeout" | "error", "batch_id": str, "batch":
    <summary> | None, "batches": [<summary> | None, ...], "message": str, "polls": int}`` (``batch`` is
    the first part's). Each part has its own poll schedule, as if it were waited for alone, and the event
    comes when the last one ends. Each poll is one request; transient errors (connection, timeout, rate
    limit, 5xx) are tolerated up to ``max_consecutive_errors`` in a row, others end the wait at once.

    :param conn_id: the LLM batch connection; its type decides the vendor.
    :param batch_id: the vendor's batch id (one batch).
    :param batch_ids: the batches of a job split into parts, in order (instead of ``batch_id``).
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
        batch_id: str | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        deadline: float | None = None,
        cancel_on_kill: bool = True,
        cancel_on_timeout: bool = True,
        max_consecutive_errors: int = 10,
        batch_ids: Sequence[str] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.conn_id = conn_id
        self.batch_ids = _batch_ids(batch_id, batch_ids)
        self.batch_id = self.batch_ids[0]
        self.poll_interval = check_seconds("poll_interval", poll_interval)
        self.max_poll_interval = check_seconds("max_poll_interval", max_poll_interval)
        self.deadline = check_deadline(deadline)
        self.cancel_on_kill = bool(cancel_on_kill)
        self.cancel_on_timeout = bool(cancel_on_timeout)
        self.max_consecutive_errors = check_count("max_consecutive_errors", max_consecutive_errors, minimum=1)
        self._hook: BatchHook | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the classpath and exactly the constructor's keyword arguments."""
        return (
            CLASSPATH,
            {
                "conn_id": self.conn_id,
                # One batch serializes as the release before parts did, so either release loads it.
                **(
                    {"batch_id": self.batch_id}
                    if len(self.batch_ids) == 1
                    else {"batch_id": None, "batch_ids": list(self.batch_ids)}
                ),
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
        """Poll until every batch has ended, the deadline passes or polling fails; yield one event."""
        started = clock()
        parts = len(self.batch_ids)
        pollers = [
            Poller(
                batch_id,
                started=started,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                deadline=self.deadline,
                cancel_on_timeout=self.cancel_on_timeout,
                max_consecutive_errors=self.max_consecutive_errors,
                log=self.log,
                progress=parts == 1,  # parts: one line for all of them, below
            )
            for batch_id in self.batch_ids
        ]
        left = "" if self.deadline is None else f", deadline in {format_duration(self.deadline - started)}"
        what = f"batch {self.batch_id}" if parts == 1 else f"{parts} batches ({', '.join(self.batch_ids)})"
        self.log.info("Waiting for %s (conn %s)%s", what, self.conn_id, left)
        if parts == 1:
            ends = [await self._wait(pollers[0])]
        else:
            ends = await self._wait_all(pollers)
        finals = [
            poller.after_cancel(await self._cancel(poller.batch_id, end.reason))
            if isinstance(end, Cancel)
            else end
            for poller, end in zip(pollers, ends, strict=True)
        ]
        yield TriggerEvent(group_event(pollers, finals))  # type: ignore[no-untyped-call]

    async def _wait(self, poller: Poller, progress: GroupProgress | None = None) -> Cancel | Finish:
        """Poll one batch on its own schedule until the state machine stops."""
        step: Step = Wait(0.0)
        while isinstance(step, Wait):
            await sleep(step.seconds)
            step = await self._poll(poller)
            if progress is not None:
                progress.update(clock())
        assert not isinstance(step, Wait)
        return step

    async def _wait_all(self, pollers: list[Poller]) -> list[Cancel | Finish]:
        """Wait for every part at once; a part whose polling fails for good ends the wait of all."""
        progress = GroupProgress(pollers, self.log)
        tasks = [asyncio.ensure_future(self._wait(poller, progress)) for poller in pollers]
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(_is_error(task.result()) for task in done):
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # A part stopped by another's failure has not finished: it reports that failure too.
        ends: list[Cancel | Finish | None] = [
            t.result() if t.done() and not t.cancelled() else None for t in tasks
        ]
        failure = next((end for end in ends if end is not None and _is_error(end)), None)
        return [end if end is not None else failure or Finish("error", "stopped") for end in ends]

    async def _poll(self, poller: Poller) -> Step:
        """Read the batch once and return the state machine's next step."""
        sent_at: float | None = None
        try:
            # Timed from when it holds a connection: queueing for one never shortens the next wait.
            async with await self.hook.aslots():
                sent_at = clock()
                result: Batch | Exception = await self.hook.aget_batch(poller.batch_id, retry=False)
        except Exception as exc:
            # A failed poll was sent when it held its slot (as on the worker); one that never got a slot
            # (the connection look-up failed) is timed from its failure.
            sent_at, result = (clock() if sent_at is None else sent_at), exc
        step = poller.after(result, sent_at=sent_at, now=clock())
        # Nothing of the answer outlives the poll: kept through the wait, a thousand waiters' parsed batches
        # (or a failure's traceback, which holds this frame) end up in the collector's oldest generation.
        del result
        return step

    async def _cancel(self, batch_id: str, reason: str) -> dict[str, Any] | None:
        self.log.info("Cancelling batch %s: %s", batch_id, reason)
        try:
            return (await self.hook.acancel_batch(batch_id)).summary()
        except Exception as exc:
            # Best effort: the batch may be unreachable; the event says the cancel failed.
            self.log.warning("Could not cancel batch %s: %s", batch_id, exc)
            return None

    async def on_kill(self) -> None:
        """Cancel the batches when a user kills the deferred task, if ``cancel_on_kill``."""
        if self.cancel_on_kill:
            for batch_id in self.batch_ids:
                await self._cancel(batch_id, "the task was killed")
        else:
            self.log.info("Task killed; %s left running (cancel_on_kill=False)", ", ".join(self.batch_ids))

    async def cleanup(self) -> None:
        """Release the hook's HTTP session; the remote batch is left alone."""
        hook, self._hook = self._hook, None
        if hook is not None:
            await hook.aclose()


def _batch_ids(batch_id: str | None, batch_ids: Sequence[str] | None) -> tuple[str, ...]:
    """Return the batches to wait for: ``batch_id``, or ``batch_ids``; refuse anything else."""
    if (batch_id is None) == (batch_ids is None) or isinstance(batch_ids, str):
        raise InvalidInputError("give one of batch_id and batch_ids (a non-empty list)")
    if batch_ids is None:
        return tuple(check_batch_ids(batch_id))
    return tuple(check_batch_ids(batch_ids, "batch_ids"))


def _is_error(step: Cancel | Finish) -> bool:
    return isinstance(step, Finish) and step.kind == "error"
