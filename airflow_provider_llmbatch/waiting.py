"""
Waiting for a batch from a task: deferred to :class:`~airflow_provider_llmbatch.triggers.batch.BatchTrigger`,
or polled on the worker around the same :class:`~airflow_provider_llmbatch.polling.Poller`.

Both ways end with the same event payload, and :func:`complete` turns it into the task's result: the
judged summary, or the error the outcome table names. ``BatchSensor`` and
``CreateBatchOperator(wait_for_completion=True)`` both wait through here, with explicit arguments.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from airflow_provider_llmbatch.checks import check_count, check_seconds
from airflow_provider_llmbatch.exceptions import (
    BatchTimeoutError,
    LLMBatchError,
    VendorAPIError,
)
from airflow_provider_llmbatch.fanin import GroupProgress, group_event
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch, BatchStatus
from airflow_provider_llmbatch.outcomes import check_fraction, judge_parts
from airflow_provider_llmbatch.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    EVENT_KINDS,
    Cancel,
    Finish,
    Poller,
    Wait,
)
from airflow_provider_llmbatch.retry import classify
from airflow_provider_llmbatch.triggers.batch import BatchTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_TIMEOUT = 7 * 24 * 3600.0
"""How long a wait lasts by default: a week, the longest window most vendors allow."""

DEFER_TIMEOUT_MARGIN = 600.0
"""
Seconds the deferral's own timeout trails the trigger's deadline.

When a deferral times out, Airflow fails the task without running ``execute_complete`` or the
trigger's ``on_kill``, so nothing could cancel the batch; the trigger enforces the deadline itself
(and cancels), and the deferral timeout is only a backstop.
"""

XCOM_SUMMARY = "batch_summary"
"""The XCom key the final batch summary is pushed under before it is judged."""

XCOM_SUMMARIES = "batch_summaries"
"""The XCom key the parts' final summaries are pushed under before they are judged."""

# Seams for tests: the worker-side wait reads the clock and sleeps through these.
clock: Callable[[], float] = time.time
"""Return the wall-clock time in epoch seconds."""

sleep: Callable[[float], None] = time.sleep
"""Wait on the worker."""


@dataclass(frozen=True)
class WaitSettings:
    """
    How a task waits for a batch; every duration checked once, before anything is uploaded.

    :param poll_interval: the typical seconds between polls.
    :param max_poll_interval: no scheduled wait between polls is longer.
    :param timeout: seconds to wait before giving up.
    :param max_failed_fraction: share of failed requests a completed batch may have.
    :param cancel_on_timeout: cancel the batch when the timeout passes.
    :param cancel_on_kill: cancel the batch when the task is killed.
    :param max_consecutive_errors: transient API errors in a row before failing.
    :param resubmitting: expired or cancelled batches are left to a resubmission round, not failed.
    """

    poll_interval: float = DEFAULT_POLL_INTERVAL
    max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    max_failed_fraction: float = 0.0
    cancel_on_timeout: bool = True
    cancel_on_kill: bool = True
    max_consecutive_errors: int = 10
    resubmitting: bool = False

    @classmethod
    def checked(
        cls,
        *,
        poll_interval: float | timedelta = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | timedelta = DEFAULT_MAX_POLL_INTERVAL,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        max_failed_fraction: float = 0.0,
        cancel_on_timeout: bool = True,
        cancel_on_kill: bool = True,
        max_consecutive_errors: int = 10,
        resubmitting: bool = False,
    ) -> WaitSettings:
        """Return the settings after checking each argument; raise :class:`InvalidInputError` naming it."""
        errors = check_count("max_consecutive_errors", max_consecutive_errors, minimum=1)
        return cls(
            poll_interval=check_seconds("poll_interval", poll_interval),
            max_poll_interval=check_seconds("max_poll_interval", max_poll_interval),
            timeout=check_seconds("timeout", timeout),
            max_failed_fraction=check_fraction(max_failed_fraction),
            cancel_on_timeout=bool(cancel_on_timeout),
            cancel_on_kill=bool(cancel_on_kill),
            max_consecutive_errors=errors,
            resubmitting=bool(resubmitting),
        )

    def trigger(self, conn_id: str, batch_ids: str | Sequence[str], deadline: float) -> BatchTrigger:
        """Return the trigger that waits for a batch, or every one of ``batch_ids``, with these settings."""
        ids = _as_ids(batch_ids)
        one = len(ids) == 1
        return BatchTrigger(
            conn_id=conn_id,
            batch_id=ids[0] if one else None,
            batch_ids=None if one else ids,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            deadline=deadline,
            cancel_on_kill=self.cancel_on_kill,
            cancel_on_timeout=self.cancel_on_timeout,
            max_consecutive_errors=self.max_consecutive_errors,
        )


def wait_for_batch(
    context: Context,
    hook: BatchHook,
    batch_ids: str | Sequence[str],
    settings: WaitSettings,
    *,
    deferrable: bool,
    defer: Callable[..., NoReturn],
    log: Any,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    Wait for a batch, or every part of a job, to end; return the judged result merged over ``extra``.

    Deferrable: batches that have already ended are judged at once; otherwise the task defers to one
    :class:`BatchTrigger` for all of them, whose deadline is now + ``timeout``, and resumes in the task's
    ``execute_complete`` (``extra`` travels with the deferral). Not deferrable: polls here, with the same
    state machine, each batch on its own schedule.

    :raises BatchOutcomeError: a batch failed, expired, was cancelled, timed out, or too many requests
        failed (over all the batches).
    """
    ids = _as_ids(batch_ids)
    deadline = clock() + settings.timeout
    extra = dict(extra or {})
    if not deferrable:
        return complete(context, poll_until_done(hook, ids, settings, deadline, log), settings, extra)
    ended = [_peek(hook, batch_id, log) for batch_id in ids]
    if all(batch is not None and batch.is_terminal for batch in ended):
        return finish(context, [batch.summary() for batch in ended if batch is not None], settings, extra)
    log.info("Deferring until %s ends (timeout %.0fs)", _named(ids), settings.timeout)
    defer(
        trigger=settings.trigger(hook.conn_id, ids, deadline),
        method_name="execute_complete",
        kwargs={"extra": extra} if extra else None,
        timeout=timedelta(seconds=settings.timeout + DEFER_TIMEOUT_MARGIN),
    )


def _as_ids(batch_ids: str | Sequence[str]) -> list[str]:
    """Return one batch id as a list of one; a str is one id, never a sequence of characters."""
    return [batch_ids] if isinstance(batch_ids, str) else list(batch_ids)


def _named(ids: Sequence[str]) -> str:
    return f"batch {ids[0]}" if len(ids) == 1 else f"all {len(ids)} batches"


def _peek(hook: BatchHook, batch_id: str, log: Any) -> Batch | None:
    """Return the batch once, or None when a transient error hides it (the trigger polls on)."""
    try:
        return hook.get_batch(batch_id)
    except VendorAPIError as exc:
        if classify(exc) is None:
            raise
        log.warning("Could not check batch %s before deferring: %s", batch_id, exc)
        return None


def poll_until_done(
    hook: BatchHook, batch_ids: str | Sequence[str], settings: WaitSettings, deadline: float, log: Any
) -> dict[str, Any]:
    """Poll a batch (or each of a job's on its own schedule) on the worker until all end; return an event."""
    ids = _as_ids(batch_ids)
    started = clock()
    pollers = [
        Poller(
            batch_id,
            started=started,
            poll_interval=settings.poll_interval,
            max_poll_interval=settings.max_poll_interval,
            deadline=deadline,
            cancel_on_timeout=settings.cancel_on_timeout,
            max_consecutive_errors=settings.max_consecutive_errors,
            log=log,
            progress=len(ids) == 1,
        )
        for batch_id in ids
    ]
    progress = GroupProgress(pollers, log) if len(pollers) > 1 else None
    due = dict.fromkeys(range(len(pollers)), started)
    ends: dict[int, Cancel | Finish] = {}
    while len(ends) < len(pollers):
        index = min(due, key=due.__getitem__)
        sleep(max(due[index] - clock(), 0.0))
        poller, sent_at = pollers[index], clock()
        try:
            result: Batch | Exception = hook.get_batch(poller.batch_id, retry=False)
        except Exception as exc:
            result = exc
        step = poller.after(result, sent_at=sent_at, now=clock())
        if progress is not None:
            progress.update(clock())
        if isinstance(step, Wait):
            due[index] = clock() + step.seconds
            continue
        ends[index] = step
        del due[index]
        if isinstance(step, Finish) and step.kind == "error":
            break  # the others are stopped by it, and report it
    stopped = next((end for end in ends.values() if isinstance(end, Finish) and end.kind == "error"), None)
    finals = [
        _settle(hook, poller, ends.get(index) or stopped, log)  # type: ignore[arg-type]
        for index, poller in enumerate(pollers)
    ]
    return group_event(pollers, finals)


def _settle(hook: BatchHook, poller: Poller, end: Cancel | Finish, log: Any) -> Finish:
    """Return a batch's final step, cancelling it first when its deadline said so."""
    if isinstance(end, Cancel):
        return poller.after_cancel(cancel(hook, poller.batch_id, end.reason, log))
    return end


def cancel_if_running(hook: BatchHook, batch_id: str, log: Any) -> Batch:
    """Cancel a batch unless it has already ended (or is cancelling); return it as it is after that."""
    batch = hook.get_batch(batch_id)
    # A status no vendor documents is not an end: it gets the cancel, as the trigger's deadline gives it.
    if batch.is_terminal or batch.state is BatchStatus.CANCELLING:
        log.info("Batch %s is %s; nothing to cancel", batch_id, batch.status)
        return batch
    batch = hook.cancel_batch(batch_id)
    log.info("Cancel requested for batch %s: now %s", batch_id, batch.status)
    return batch


def cancel(hook: BatchHook, batch_id: str, reason: str, log: Any) -> dict[str, Any] | None:
    """Cancel a batch that still runs, best effort; return its summary after the request, or None."""
    log.info("Cancelling batch %s: %s", batch_id, reason)
    try:
        return cancel_if_running(hook, batch_id, log).summary()
    except Exception as exc:
        # The batch may have ended meanwhile or be unreachable; the caller reports the failed cancel.
        log.warning("Could not cancel batch %s: %s", batch_id, exc)
        return None


def validate_event(event: Any) -> dict[str, Any]:
    """
    Return a wait's event payload after checking its shape; raise a clear error otherwise.

    :param event: what the trigger sent back (``None`` if it sent nothing).
    :raises LLMBatchError: the event is missing or not a :class:`BatchTrigger` event.
    """
    if event is None:
        raise LLMBatchError("The batch trigger resumed the task without an event")
    if not isinstance(event, Mapping):
        raise LLMBatchError(f"The batch trigger sent an event of type {type(event).__name__}, not a mapping")
    kind = event.get("event")
    if kind not in EVENT_KINDS:
        raise LLMBatchError(
            f"The batch trigger sent an unknown event {kind!r}; expected one of {sorted(EVENT_KINDS)}"
        )
    batch = event.get("batch")
    if batch is not None and not isinstance(batch, Mapping):
        raise LLMBatchError(f"The batch trigger sent a {kind!r} event whose batch is not a mapping")
    # An event of the release before parts has no "batches": its one batch is the list.
    batches = event.get("batches", [batch])
    if not isinstance(batches, list) or not all(b is None or isinstance(b, Mapping) for b in batches):
        raise LLMBatchError(
            f"The batch trigger sent a {kind!r} event whose batches are not a list of mappings"
        )
    if kind == "terminal" and (
        not batches or any(b is None or not b.get("batch_id") or not b.get("status") for b in batches)
    ):
        raise LLMBatchError("The batch trigger sent a 'terminal' event without every batch's id and status")
    message = event.get("message")
    batch_id = event.get("batch_id") or (batch or {}).get("batch_id")
    return {
        "event": kind,
        "batch_id": str(batch_id or ""),
        "batch": dict(batch) if batch is not None else None,
        "batches": [dict(b) if b is not None else None for b in batches],
        "message": message if isinstance(message, str) else "",
        "polls": event.get("polls"),
    }


def complete(
    context: Context,
    event: Any,
    settings: WaitSettings,
    extra: Mapping[str, Any] | None,
    *,
    conn_id: str = "",
) -> dict[str, Any]:
    """
    Turn a wait's final event into the task's result: the judged summary merged over ``extra``.

    :raises LLMBatchError: the event is missing or malformed.
    :raises VendorAPIError: polling failed for good (``error`` event).
    :raises BatchTimeoutError: the deadline passed (``timeout`` event).
    :raises BatchOutcomeError: the batch ended, and not well.
    """
    payload = validate_event(event)
    batch = payload["batch"]
    if payload["event"] == "error":
        raise VendorAPIError(payload["message"] or "polling the batch failed", conn_id=conn_id)
    if payload["event"] == "timeout":
        raise BatchTimeoutError(
            payload["message"] or "the batch did not finish before the deadline",
            batch_id=payload["batch_id"],
            status="timeout",
            summary=batch,
        )
    # validate_event: a terminal event carries every batch
    return finish(context, [b for b in payload["batches"] if b is not None], settings, extra or {})


def finish(
    context: Context, summaries: list[dict[str, Any]], settings: WaitSettings, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """
    Push the summaries, judge them together and return the result merged over ``extra``.

    One batch: its summary is pushed as ``batch_summary`` and returned over ``extra``. Parts: the list
    is pushed as ``batch_summaries`` and returned as ``batches``, beside ``batch_ids``.
    """
    ti = context.get("ti") if isinstance(context, Mapping) else None
    one = len(summaries) == 1
    if ti is not None:
        ti.xcom_push(key=XCOM_SUMMARY if one else XCOM_SUMMARIES, value=summaries[0] if one else summaries)
    judge_parts(
        summaries, max_failed_fraction=settings.max_failed_fraction, resubmitting=settings.resubmitting
    )
    if one:
        return {**extra, **summaries[0]}
    return {**extra, "batch_ids": [s["batch_id"] for s in summaries], "batches": summaries}
