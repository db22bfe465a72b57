"""
The one-call flow: check, split, upload, create, wait for every part, resubmit, fetch, merge and parse.

:class:`RunBatchOperator` is :class:`~airflow_provider_llmbatch.operators.batch.CreateBatchOperator`
and :class:`~airflow_provider_llmbatch.operators.results.FetchBatchResultsOperator` in one task: it takes
the arguments of both and runs their own steps in order, so each rule lives once. The create half checks
the input, estimates and guards its cost, uploads its parts and creates their batches (re-attaching on a
retry or a clear, by the same identity), then defers once until every part has ended (one
:class:`~airflow_provider_llmbatch.triggers.batch.BatchTrigger` over all of them). The fetch half lands the
results, resubmitting rounds when asked (each round a deferral of its own), and returns the manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from airflow_provider_llmbatch.exceptions import LLMBatchError
from airflow_provider_llmbatch.operators.batch import XCOM_CREATE_RESULT, CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.outcomes import judge_rows

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.triggers.base import BaseTrigger

FETCH_RESUME = "fetch_complete"
"""The method a resubmission round's deferral resumes in (the create's wait resumes in execute_complete)."""


# The create's input_file also takes a PathLike; the fetch half only ever sees the create's URI text.
class RunBatchOperator(CreateBatchOperator, FetchBatchResultsOperator):  # type: ignore[misc]
    """
    Run a whole batch job in one task: create (split, guard, upload), wait, resubmit, fetch; return it.

    Takes every argument of :class:`~airflow_provider_llmbatch.operators.batch.CreateBatchOperator`
    (the input: ``input_file`` or ``requests`` with ``model``; ``output_schema``; the budget:
    ``max_input_tokens``, ``max_cost``, ``prices``) and of
    :class:`~airflow_provider_llmbatch.operators.results.FetchBatchResultsOperator` (``destination``,
    ``format``, ``resubmit_failed``, ...), but ``batch_id`` (the batches are its own) and
    ``wait_for_completion`` (it always waits). ``input_file`` is both the request file sent and the one
    the results are joined to; records given as ``requests`` are written to ``request_file_destination``
    first, which must stay readable until the results are landed (a local path on one worker, or a URI).

    ``max_failed_fraction`` judges the job: without ``resubmit_failed``, the batches when they end (as the
    create operator does) and the landed rows; with it, only the landed rows, after the last round (a row
    a round may still save is not a failure yet). The manifest gains ``estimate``: the create's estimate,
    beside the ``usage`` the vendor reported.
    """

    template_fields: Sequence[str] = tuple(
        dict.fromkeys(
            f
            for f in (*CreateBatchOperator.template_fields, *FetchBatchResultsOperator.template_fields)
            if f != "batch_id"
        )
    )
    template_fields_renderers: ClassVar[dict[str, str]] = dict(CreateBatchOperator.template_fields_renderers)
    ui_color = "#f3e8f8"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("wait_for_completion", None)
        # The fetch's batches are the ones the create makes; known once they exist.
        super().__init__(batch_id=[], wait_for_completion=True, **kwargs)
        # Arguments both halves take reach the create's __init__ only: give the fetch's settings the same.
        settings = self.wait_settings
        self.max_failed_fraction = settings.max_failed_fraction
        self.round_wait = dataclasses.replace(settings, max_failed_fraction=1.0, resubmitting=True)
        if self.resubmit_failed:
            # Rows a round may run again are judged after the last round, not when the first batches end.
            self.wait_settings = self.round_wait
        self._phase = "create"

    def execute(self, context: Context) -> dict[str, Any]:
        """Create the job's batches and wait for them (deferring once); then land the results."""
        created = CreateBatchOperator.execute(self, context)
        return self._fetch_job(context, created)

    def execute_complete(
        self, context: Context, event: Any = None, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resume once every batch has ended: judge them, then land the results."""
        created = CreateBatchOperator.execute_complete(self, context, event, extra)
        return self._fetch_job(context, created)

    def fetch_complete(
        self, context: Context, event: Any = None, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resume once a resubmission round's batch has ended: land the results again, with that round."""
        self._use_created(self._created(context))
        return self._finish(context, FetchBatchResultsOperator.execute_complete(self, context, event, extra))

    def defer(
        self,
        *,
        trigger: BaseTrigger,
        method_name: str,
        kwargs: dict[str, Any] | None = None,
        timeout: timedelta | int | float | None = None,
    ) -> NoReturn:
        """Defer; a wait of the fetch half resumes in :meth:`fetch_complete`, not in the create's."""
        if self._phase == "fetch":
            method_name = FETCH_RESUME
        super().defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    def _fetch_job(self, context: Context, created: Mapping[str, Any]) -> dict[str, Any]:
        self._use_created(created)
        return self._finish(context, FetchBatchResultsOperator.execute(self, context))

    def _use_created(self, created: Mapping[str, Any]) -> None:
        """Point the fetch half at the created batches and the request file they ran."""
        ids, uri = created.get("batch_ids"), created.get("input_uri")
        if not isinstance(ids, list) or not ids or not isinstance(uri, str):
            raise LLMBatchError("the create result (batch ids, request file) was lost across the deferral")
        self.batch_id, self.input_file = ids, uri
        self._phase = "fetch"

    def _created(self, context: Context) -> Mapping[str, Any]:
        ti = context.get("ti")
        value = None
        if ti is not None:
            value = ti.xcom_pull(task_ids=ti.task_id, key=XCOM_CREATE_RESULT, map_indexes=ti.map_index)
        if not isinstance(value, Mapping):
            raise LLMBatchError("the create result (batch ids, request file) was lost across the deferral")
        return value

    def _finish(self, context: Context, manifest: dict[str, Any]) -> dict[str, Any]:
        """Judge the landed rows (after resubmission rounds), add the estimate; return the manifest."""
        if self.resubmit_failed and self.output_schema is None:
            # The fetch judges the landed rows itself when it validates outputs; otherwise they are judged
            # here, since the wait before the rounds left them to the last round.
            judge_rows(
                manifest["counts"],
                batch_id=str(manifest["batch_id"]),
                max_failed_fraction=self.max_failed_fraction,
                invalid_output_fails=self.invalid_output_fails,
            )
        estimate = self._created(context).get("estimate")
        manifest = {**manifest, "estimate": estimate}
        used = (manifest.get("usage") or {}).get("prompt_tokens")
        if isinstance(estimate, Mapping) and used:
            guess = int(estimate.get("input_tokens") or 0)
            self.log.info(
                "Input tokens: estimated %d, the vendor counted %d (%+.1f%%)",
                guess,
                used,
                100.0 * (guess - used) / used,
            )
        return manifest
