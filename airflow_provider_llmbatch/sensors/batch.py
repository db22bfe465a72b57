"""The sensor that waits for an LLM batch to end and judges how it ended."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue, conf

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.checks import check_batch_ids
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.links.batch import XCOM_BATCH_ID, XCOM_CONN_TYPE, BatchConsoleLink
from airflow_provider_llmbatch.outcomes import describe
from airflow_provider_llmbatch.polling import DEFAULT_MAX_POLL_INTERVAL, DEFAULT_POLL_INTERVAL

if TYPE_CHECKING:
    from airflow.sdk import Context


class BatchSensor(BaseSensorOperator):
    """
    Wait for an LLM batch to end; return its summary, or fail as the outcome table says.

    Deferrable (the default follows ``[operators] default_deferrable``): waits in the triggerer and
    frees the worker slot. Otherwise it polls on the worker (``mode="poke"``) with the same adaptive
    schedule, deadline and cancel-on-timeout; ``mode="reschedule"`` checks once per try and leaves
    timeouts to Airflow (the batch is then not cancelled).

    :param batch_id: the vendor's batch id, or the list of a split job's batch ids (its ``batch_ids``
        XCom): all are waited for in one deferral and judged together. (templated)
    :param conn_id: the LLM batch connection; its type decides the vendor. (templated)
        (default: ``llmbatch_default``)
    :param deferrable: wait in the triggerer instead of a worker slot.
        (default: ``[operators] default_deferrable``)
    :param poll_interval: the typical seconds between polls; early polls come sooner. (default: 30)
    :param max_poll_interval: no scheduled wait between polls is longer. (default: 600)
    :param timeout: seconds (or timedelta) to wait before giving up. (default: 7 days)
    :param max_failed_fraction: share of failed requests a completed batch may have. (default: 0.0)
    :param cancel_on_timeout: cancel the batch when the timeout passes. (default: True)
    :param cancel_on_kill: cancel the batch when the task is killed. (default: True)
    :param max_consecutive_errors: transient API errors in a row before failing. (default: 10)
    :param expect_resubmission: a downstream ``FetchBatchResultsOperator`` resubmits failed rows
        (``resubmit_failed``): a part that expired or was cancelled is left to it instead of failing this
        sensor (a failed part still fails it; ``max_failed_fraction`` still applies). (default: False)
    """

    template_fields = ("batch_id", "conn_id")
    operator_extra_links = (BatchConsoleLink(),)
    ui_color = "#e8f4ea"

    def __init__(
        self,
        *,
        batch_id: str | list[str],
        conn_id: str = BatchHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        timeout: float | timedelta = waiting.DEFAULT_TIMEOUT,
        max_failed_fraction: float = 0.0,
        cancel_on_timeout: bool = True,
        cancel_on_kill: bool = True,
        max_consecutive_errors: int = 10,
        expect_resubmission: bool = False,
        **kwargs: Any,
    ) -> None:
        self.wait_settings = waiting.WaitSettings.checked(
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            timeout=timeout,
            max_failed_fraction=max_failed_fraction,
            cancel_on_timeout=cancel_on_timeout,
            cancel_on_kill=cancel_on_kill,
            max_consecutive_errors=max_consecutive_errors,
            resubmitting=expect_resubmission,
        )
        super().__init__(
            poke_interval=self.wait_settings.poll_interval, timeout=self.wait_settings.timeout, **kwargs
        )
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.deferrable = deferrable
        self._polling: list[str] = []

    @cached_property
    def hook(self) -> BatchHook:
        """Return the hook of ``conn_id`` (after rendering)."""
        return BatchHook(self.conn_id)

    def _rendered_batch_ids(self) -> list[str]:
        """Return the batch id, or the parts' ids (a list, e.g. the ``batch_ids`` XCom), after rendering."""
        return check_batch_ids(self.batch_id)

    def execute(self, context: Context) -> Any:
        """Wait for the batches: defer to the trigger, poll here, or (reschedule mode) check once."""
        batch_ids = self._rendered_batch_ids()
        ti = context.get("ti") if isinstance(context, Mapping) else None
        if ti is not None:
            ti.xcom_push(key=XCOM_BATCH_ID, value=batch_ids[0])
            ti.xcom_push(key=XCOM_CONN_TYPE, value=self.hook.vendor.conn_type)
        if not self.deferrable and self.reschedule:
            return super().execute(context)
        self._polling = batch_ids
        return waiting.wait_for_batch(
            context,
            self.hook,
            batch_ids,
            self.wait_settings,
            deferrable=self.deferrable,
            defer=self.defer,
            log=self.log,
        )

    def execute_complete(
        self, context: Context, event: Any = None, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resume after the trigger fired: judge the batches, return the result."""
        return waiting.complete(context, event, self.wait_settings, extra, conn_id=self.conn_id)

    def poke(self, context: Context) -> bool | PokeReturnValue:
        """Check the batches once (``mode="reschedule"``); judge them once all have ended."""
        batches = [self.hook.get_batch(batch_id) for batch_id in self._rendered_batch_ids()]
        for batch in batches:
            self.log.info("%s", describe(batch.summary()))
        if not all(batch.is_terminal for batch in batches):
            return False
        summaries = [batch.summary() for batch in batches]
        return PokeReturnValue(
            is_done=True, xcom_value=waiting.finish(context, summaries, self.wait_settings, {})
        )

    def on_kill(self) -> None:
        """Cancel the batch being polled on the worker, if ``cancel_on_kill``."""
        if self.wait_settings.cancel_on_kill:
            for batch_id in self._polling:
                waiting.cancel(self.hook, batch_id, "the task was killed", self.log)
