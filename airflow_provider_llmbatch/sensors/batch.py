"""
Waiting for a batch from a task: the sensor, and the wait logic operators reuse.

:class:`BatchWaitMixin` holds the one wait: deferred to a :class:`BatchTrigger` (the default), or a
polling loop on the worker with the same delays, deadline and outcome table. :class:`BatchSensor` and
``CreateBatchOperator(wait_for_completion=True)`` both use it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_provider_llmbatch.exceptions import (
    BatchTimeoutError,
    LLMBatchError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.links.batch import XCOM_BATCH_ID, XCOM_CONN_TYPE, BatchConsoleLink
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.outcomes import describe, judge
from airflow_provider_llmbatch.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    delay_after_poll,
)
from airflow_provider_llmbatch.retry import classify
from airflow_provider_llmbatch.triggers.batch import EVENT_KINDS, BatchTrigger

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

# Seams for tests: the worker-side loop checks its deadline and waits with these.
clock: Callable[[], float] = time.time
"""Return the wall-clock time in epoch seconds."""

sleep: Callable[[float], None] = time.sleep
"""Wait on the worker."""


def _seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def validate_event(event: Any) -> dict[str, Any]:
    """
    Return a trigger event payload after checking its shape; raise a clear error otherwise.

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
    if kind == "terminal" and (batch is None or not batch.get("batch_id") or not batch.get("status")):
        raise LLMBatchError("The batch trigger sent a 'terminal' event without the batch's id and status")
    message = event.get("message")
    return {
        "event": kind,
        "batch": dict(batch) if batch is not None else None,
        "message": message if isinstance(message, str) else "",
        "polls": event.get("polls"),
    }


class BatchWaitMixin:
    """
    Wait for a batch to end, deferred or on the worker, then judge it; for operators and sensors.

    The operator using it must set these attributes: ``conn_id``, ``deferrable``, ``poll_interval``,
    ``max_poll_interval``, ``timeout`` (seconds or timedelta), ``max_failed_fraction``; optionally
    ``cancel_on_timeout``, ``cancel_on_kill`` (default: True) and ``max_consecutive_errors`` (default: 10).
    It must route ``execute_complete`` (defined here) as its deferral method.
    """

    conn_id: str
    deferrable: bool
    poll_interval: float
    max_poll_interval: float
    max_failed_fraction: float

    _waiting_for: str | None = None
    _wait_hook: BatchHook | None = None

    # Provided by BaseOperator.
    log: Any
    defer: Callable[..., NoReturn]

    def _batch_hook(self) -> BatchHook:
        """Return the sync hook of ``conn_id``, created once per task instance."""
        if self._wait_hook is None:
            self._wait_hook = BatchHook(self.conn_id)
        return self._wait_hook

    def _wait_settings(self) -> tuple[float, bool, bool, int]:
        timeout = _seconds(getattr(self, "timeout", None), DEFAULT_TIMEOUT)
        return (
            timeout,
            bool(getattr(self, "cancel_on_timeout", True)),
            bool(getattr(self, "cancel_on_kill", True)),
            max(int(getattr(self, "max_consecutive_errors", 10)), 1),
        )

    def _wait_for_batch(
        self, context: Context, batch_id: str, *, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """
        Wait for ``batch_id`` to end and return its judged summary merged over ``extra``.

        Deferrable: a batch that has already ended is judged at once; otherwise the task defers to a
        :class:`BatchTrigger` whose deadline is now + ``timeout`` and resumes in :meth:`execute_complete`
        (``extra`` travels with the deferral). Not deferrable: polls here with the same delays.

        :param context: the task context.
        :param batch_id: the vendor's batch id.
        :param extra: keys to return along with the summary (the summary wins on a clash); JSON primitives.
        :raises BatchOutcomeError: the batch failed, expired, was cancelled, timed out, or too many
            requests failed.
        """
        timeout, cancel_on_timeout, cancel_on_kill, max_errors = self._wait_settings()
        deadline = clock() + timeout
        extra_dict = dict(extra or {})
        self._waiting_for = batch_id
        if not self.deferrable:
            return self._poll_until_done(context, batch_id, deadline, extra_dict)
        batch = self._peek(batch_id)
        if batch is not None and batch.is_terminal:
            return self._finish_wait(context, batch.summary(), extra_dict)
        self.log.info("Deferring until batch %s ends (timeout %.0fs)", batch_id, timeout)
        self.defer(
            trigger=BatchTrigger(
                conn_id=self.conn_id,
                batch_id=batch_id,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                deadline=deadline,
                cancel_on_kill=cancel_on_kill,
                cancel_on_timeout=cancel_on_timeout,
                max_consecutive_errors=max_errors,
            ),
            method_name="execute_complete",
            kwargs={"extra": extra_dict} if extra_dict else None,
            timeout=timedelta(seconds=timeout + DEFER_TIMEOUT_MARGIN),
        )

    def _peek(self, batch_id: str) -> Batch | None:
        """Return the batch once, or None when a transient error hides it (the trigger will retry)."""
        try:
            return self._batch_hook().get_batch(batch_id)
        except VendorAPIError as exc:
            if classify(exc) is None:
                raise
            self.log.warning("Could not check batch %s before deferring: %s", batch_id, exc)
            return None

    def _poll_until_done(
        self, context: Context, batch_id: str, deadline: float, extra: dict[str, Any]
    ) -> dict[str, Any]:
        _, cancel_on_timeout, _, max_errors = self._wait_settings()
        hook = self._batch_hook()
        started = clock()
        summary: dict[str, Any] | None = None
        errors = 0
        while True:
            retry_after: float | None = None
            poll_started = clock()
            try:
                batch = hook.get_batch(batch_id)
            except VendorAPIError as exc:
                errors += 1
                if classify(exc) is None or errors >= max_errors:
                    raise
                retry_after = exc.retry_after
                self.log.warning(
                    "Polling batch %s failed (%d/%d in a row): %s", batch_id, errors, max_errors, exc
                )
            else:
                errors = 0
                summary = batch.summary()
                self.log.info("%s", describe(summary))
                if batch.is_terminal:
                    return self._finish_wait(context, summary, extra)
                if batch.state is None:
                    self.log.warning(
                        "Batch %s has undocumented status %r; polling on", batch_id, batch.status
                    )
            now = clock()
            if now >= deadline:
                self._raise_timeout(batch_id, summary, cancel_on_timeout)
            delay = delay_after_poll(
                now - started,
                summary,
                errors=errors,
                retry_after=retry_after,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                poll_seconds=now - poll_started,
            )
            sleep(max(min(delay, deadline - now), 0.0))

    def _raise_timeout(self, batch_id: str, summary: dict[str, Any] | None, cancel: bool) -> None:
        message = f"Batch {batch_id} did not finish before the deadline"
        if cancel:
            cancelled = self._cancel_batch(batch_id, "the deadline passed")
            if cancelled is not None:
                summary = cancelled
                message += f"; cancel requested (status now {cancelled['status']})"
            else:
                message += "; the cancel request failed"
        else:
            message += "; left running (cancel_on_timeout=False)"
        raise BatchTimeoutError(message, batch_id=batch_id, status="timeout", summary=summary)

    def _cancel_batch(self, batch_id: str, reason: str) -> dict[str, Any] | None:
        self.log.info("Cancelling batch %s: %s", batch_id, reason)
        try:
            return self._batch_hook().cancel_batch(batch_id).summary()
        except Exception as exc:
            # Best effort: the batch may have ended meanwhile (the vendor then refuses) or be unreachable.
            self.log.warning("Could not cancel batch %s: %s", batch_id, exc)
            return None

    def _cancel_waited_batch(self) -> None:
        """Cancel the batch a worker-side wait is polling, if ``cancel_on_kill``; call it from ``on_kill``."""
        batch_id = self._waiting_for
        if batch_id and self._wait_settings()[2]:
            self._cancel_batch(batch_id, "the task was killed")

    def _finish_wait(
        self, context: Context, summary: dict[str, Any], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Push the summary (XCom ``batch_summary``), judge it and return it merged over ``extra``."""
        ti = context.get("ti") if isinstance(context, Mapping) else None
        if ti is not None:
            ti.xcom_push(key=XCOM_SUMMARY, value=summary)
        judge(summary, max_failed_fraction=self.max_failed_fraction)
        return {**extra, **summary}

    def execute_complete(
        self, context: Context, event: Any = None, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """
        Resume after the trigger fired: validate the event, judge the batch, return its summary.

        :param context: the task context.
        :param event: the :class:`BatchTrigger` event payload.
        :param extra: the keys given to :meth:`_wait_for_batch`, returned along with the summary.
        :raises LLMBatchError: the event is missing or malformed.
        :raises VendorAPIError: polling failed for good (``error`` event).
        :raises BatchTimeoutError: the deadline passed (``timeout`` event).
        """
        payload = validate_event(event)
        batch = payload["batch"]
        self.log.info("Trigger finished after %s polls: %s", payload["polls"], payload["message"])
        if payload["event"] == "error":
            raise VendorAPIError(payload["message"] or "polling the batch failed", conn_id=self.conn_id)
        if payload["event"] == "timeout":
            batch_id = str((batch or {}).get("batch_id") or self._waiting_for or "")
            raise BatchTimeoutError(
                payload["message"] or "the batch did not finish before the deadline",
                batch_id=batch_id,
                status="timeout",
                summary=batch,
            )
        if batch is None:  # validate_event rules this out for a terminal event
            raise LLMBatchError("The batch trigger sent a 'terminal' event without a batch")
        return self._finish_wait(context, batch, extra or {})


class BatchSensor(BatchWaitMixin, BaseSensorOperator):
    """
    Wait for an LLM batch to end; return its summary, or fail as the outcome table says.

    Deferred to the triggerer by default. With ``deferrable=False`` it polls on the worker (``mode="poke"``)
    with the same adaptive delays, deadline and cancel-on-timeout; ``mode="reschedule"`` pokes once per
    try and leaves timeouts to Airflow (the batch is then not cancelled).

    :param batch_id: the vendor's batch id. (templated)
    :param conn_id: the LLM batch connection; its type decides the vendor. (templated)
        (default: ``llmbatch_default``)
    :param deferrable: wait in the triggerer instead of a worker slot. (default: True)
    :param poll_interval: the typical seconds between polls; early polls come sooner. (default: 30)
    :param max_poll_interval: no wait between polls is longer. (default: 600)
    :param timeout: seconds (or timedelta) to wait before giving up. (default: 7 days)
    :param max_failed_fraction: share of failed requests a completed batch may have. (default: 0.0)
    :param cancel_on_timeout: cancel the batch when the timeout passes. (default: True)
    :param cancel_on_kill: cancel the batch when the task is killed. (default: True)
    :param max_consecutive_errors: transient API errors in a row before failing. (default: 10)
    """

    template_fields = ("batch_id", "conn_id")
    operator_extra_links = (BatchConsoleLink(),)
    ui_color = "#e8f4ea"

    def __init__(
        self,
        *,
        batch_id: str,
        conn_id: str = BatchHook.default_conn_name,
        deferrable: bool = True,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        max_failed_fraction: float = 0.0,
        cancel_on_timeout: bool = True,
        cancel_on_kill: bool = True,
        max_consecutive_errors: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poll_interval, timeout=timeout, **kwargs)
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.deferrable = deferrable
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        if not 0.0 <= max_failed_fraction <= 1.0 or math.isnan(max_failed_fraction):
            raise ValueError(f"max_failed_fraction must be between 0.0 and 1.0, got {max_failed_fraction!r}")
        self.max_failed_fraction = max_failed_fraction
        self.cancel_on_timeout = cancel_on_timeout
        self.cancel_on_kill = cancel_on_kill
        self.max_consecutive_errors = max_consecutive_errors

    def _check_batch_id(self) -> str:
        batch_id = self.batch_id
        if not isinstance(batch_id, str) or not batch_id.strip():
            raise LLMBatchError(f"batch_id must be a non-empty string after rendering, got {batch_id!r}")
        return batch_id.strip()

    def _push_link_keys(self, context: Context, batch_id: str) -> None:
        ti = context.get("ti") if isinstance(context, Mapping) else None
        if ti is None:
            return
        ti.xcom_push(key=XCOM_BATCH_ID, value=batch_id)
        ti.xcom_push(key=XCOM_CONN_TYPE, value=self._batch_hook().vendor.conn_type)

    def execute(self, context: Context) -> Any:
        """Wait for the batch: defer to the trigger, or poll here."""
        batch_id = self._check_batch_id()
        self._push_link_keys(context, batch_id)
        if self.deferrable or not self.reschedule:
            return self._wait_for_batch(context, batch_id)
        return super().execute(context)

    def poke(self, context: Context) -> bool | PokeReturnValue:
        """Check the batch once (``mode="reschedule"``); judge it once it has ended."""
        batch = self._batch_hook().get_batch(self._check_batch_id())
        summary = batch.summary()
        self.log.info("%s", describe(summary))
        if not batch.is_terminal:
            return False
        return PokeReturnValue(is_done=True, xcom_value=self._finish_wait(context, summary, {}))

    def on_kill(self) -> None:
        """Cancel the batch being polled on the worker, if ``cancel_on_kill``."""
        self._cancel_waited_batch()
