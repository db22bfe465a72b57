"""
Fetch a finished job's results, join them with its requests, resubmit what is worth it, land one file.

A job is one batch, or the parts of an input split over a vendor's limits; its results land as one file
in input order. With ``resubmit_failed=N``, rows that failed for a reason that may not last go into a new
request file and a new batch (a round), up to N rounds; their results replace the failed rows and each
row carries ``attempts``. A round's request file is kept beside the results file, and its batch is
named by this task instance and the round's requests, so a retried task re-attaches to it.

With ``output_schema`` each succeeded answer is validated on our side and lands as ``output`` (or the row
as ``invalid_output``); ``format="parquet"`` lands typed columns. The manifest gives tokens per batch and
in total, and the cost at the user's prices.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, conf

from airflow_provider_llmbatch import assets, lineage, waiting
from airflow_provider_llmbatch.checks import check_batch_ids, check_count
from airflow_provider_llmbatch.exceptions import InvalidInputError, LLMBatchError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.links.batch import XCOM_BATCH_ID, XCOM_CONN_TYPE, BatchConsoleLink
from airflow_provider_llmbatch.manifest import build_manifest
from airflow_provider_llmbatch.operators.reattach import default_task_path
from airflow_provider_llmbatch.operators.remote_files import (
    delete_files,
    download,
    download_inputs,
    part_requests,
)
from airflow_provider_llmbatch.operators.rounds import create_round, round_file
from airflow_provider_llmbatch.outcomes import check_fraction, judge, judge_rows, request_counts, row_failures
from airflow_provider_llmbatch.parquet_out import ResultFormat, check_format, output_columns, pyarrow_modules
from airflow_provider_llmbatch.polling import DEFAULT_POLL_INTERVAL
from airflow_provider_llmbatch.pricing import PriceTable, resolve_prices
from airflow_provider_llmbatch.results import BatchFiles, JoinReport, join_results
from airflow_provider_llmbatch.schema import OutputSchema
from airflow_provider_llmbatch.typed_output import UNTYPED_KINDS
from airflow_provider_llmbatch.usage import job_model, log_landing, log_usage

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import Asset, Context

    from airflow_provider_llmbatch.models import Batch

XCOM_RESULT_URI = "result_uri"
"""The XCom key of the landed results file's URI."""


class FetchBatchResultsOperator(BaseOperator):
    """
    Download a finished batch's output and error files and land one results file, one row per request.

    Rows follow the request file's order: ``{"custom_id", "status", "response", "error", "usage"}`` with
    ``status`` one of ``succeeded``, ``failed``, ``expired``, ``cancelled``, ``missing`` (and ``output``,
    and status ``invalid_output``, with an ``output_schema``). Expired and
    cancelled batches are landed too. The file is written under a temporary name and moved into place.
    Returns a small manifest (``batch_id``, ``status``, ``result_uri``, ``counts``, ``usage`` in total
    and per batch, ``cost``, ``anomalies``) and emits an event of the task's results asset (one asset
    per task, see :func:`~airflow_provider_llmbatch.assets.results_asset`) whose extra carries
    ``result_uri`` and the manifest's summary. With OpenLineage installed and configured, it reports the
    request file and the results file as datasets and the batches as a run facet.

    :param batch_id: the vendor's batch id, e.g. ``{{ ti.xcom_pull(task_ids='create', key='batch_id') }}``,
        or the list of a split job's batch ids (its ``batch_ids`` XCom), in input order. (templated)
    :param conn_id: the LLM batch connection. (templated) (default: ``llmbatch_default``)
    :param input_file: the request file the batch ran (path or URI), e.g.
        ``create.output["input_uri"]``. (templated) (default: the batch's input
        file downloaded from the vendor, where the vendor allows it)
    :param destination: the results file (path or URI). (templated)
        (default: ``$AIRFLOW_HOME/llmbatch-results/<dag>/<run>/<task>.jsonl``, ``.parquet`` for Parquet)
    :param delete_remote_files: delete the batch's input, output and error files at the vendor once the
        results are landed. (default: False)
    :param include_request: add each request's body to its row as ``request``. (default: False)
    :param max_failed_fraction: the share of failed rows allowed, judged here over the landed rows when
        the batch itself did not report its request counts (the sensor could not judge it), and with an
        ``output_schema`` (an invalid output shows only here): every row that did not succeed counts,
        ``invalid_output`` ones as ``invalid_output_fails`` says. (default: 0.0)
    :param output_schema: the answer's shape, a JSON Schema dict or a pydantic model class: each
        succeeded answer is parsed and validated against it and lands as the row's ``output``; one that
        does not parse or validate lands as ``invalid_output`` with the reason in ``error``. Not for
        embeddings or image batches. (default: None)
    :param invalid_output_fails: count ``invalid_output`` rows against ``max_failed_fraction``; they are
        never resubmitted. (default: True)
    :param prices: the batch prices per model (see :class:`~airflow_provider_llmbatch.pricing.PriceTable`),
        a mapping or its JSON text; wins over the connection extra ``prices``. Without either the
        manifest's ``cost`` says why there is none. (templated; default: None)
    :param format: ``jsonl``, or ``parquet`` (the ``parquet`` extra): typed columns from
        ``output_schema``, written in row groups. (default: ``jsonl``)
    :param resubmit_failed: rounds of resubmitting the rows worth it (rate limited, server errors, never
        run because their batch expired or was cancelled); 0 lands the results as they are. (default: 0)
    :param delete_input_file: delete each batch's request file at the vendor once the results are landed
        (it counts against the vendor's stored-file quota). (default: False)
    :param deferrable: wait for a round's batch in the triggerer.
        (default: ``[operators] default_deferrable``)
    :param poll_interval: the typical seconds between polls of a round's batch. (default: 30)
    :param timeout: seconds to wait for a round's batch. (default: 7 days)
    :param results_asset: the asset each landing announces, added to the outlets. A mapped task announces
        it only when ``partial()`` declares it in ``outlets`` too.
        (default: ``llmbatch-results/<dag id>/<task id>``; none for a task made outside a DAG)
    """

    template_fields: Sequence[str] = ("batch_id", "conn_id", "input_file", "destination", "prices")
    operator_extra_links = (BatchConsoleLink(),)
    ui_color = "#eef8e8"

    def __init__(
        self,
        *,
        batch_id: str | list[str],
        conn_id: str = BatchHook.default_conn_name,
        input_file: str | None = None,
        destination: str | None = None,
        delete_remote_files: bool = False,
        include_request: bool = False,
        max_failed_fraction: float = 0.0,
        resubmit_failed: int = 0,
        delete_input_file: bool = False,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float | timedelta = waiting.DEFAULT_TIMEOUT,
        results_asset: Asset | None = None,
        output_schema: Any = None,
        invalid_output_fails: bool = True,
        prices: PriceTable | dict[str, Any] | str | None = None,
        format: ResultFormat = "jsonl",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if results_asset is None and self.get_dag() is not None:
            results_asset = assets.results_asset(self.dag_id, self.task_id)
        if getattr(self, "_BaseOperator__from_mapped", False) and results_asset not in self.outlets:
            # A mapped task's outlets are partial()'s, declared when the DAG was parsed: an asset added
            # now would have no model. Declare it there: .partial(results_asset=a, outlets=[a]).
            results_asset = None
        # Declared, so the DAG processor registers it and each run's event lands on it.
        self.results_asset = results_asset
        if results_asset is not None and results_asset not in self.outlets:
            self.outlets.append(results_asset)
        self._lineage: lineage.BatchLineage | None = None
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.input_file = input_file
        self.destination = destination
        self.delete_remote_files = delete_remote_files
        self.include_request = include_request
        self.max_failed_fraction = check_fraction(max_failed_fraction)
        self.resubmit_failed = check_count("resubmit_failed", resubmit_failed)
        self.delete_input_file = delete_input_file
        if output_schema is not None:
            OutputSchema.of(output_schema)  # checked now (no I/O); kept as given, a class stays a class
        self.output_schema = output_schema
        self.invalid_output_fails = bool(invalid_output_fails)
        self.prices = prices
        self.format = check_format(format)
        self.deferrable = deferrable
        # A round's batch is waited for, not judged: whatever it ran replaces the rows it ran.
        self.round_wait = waiting.WaitSettings.checked(
            poll_interval=poll_interval, timeout=timeout, max_failed_fraction=1.0, resubmitting=True
        )

    def _rendered(self, name: str) -> str | None:
        """Return a templated argument after rendering: a stripped string, or None when unset or empty."""
        value = getattr(self, name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not value.strip():
            raise InvalidInputError(f"{name} must be a non-empty string after rendering, got {value!r}")
        return value.strip()

    def _required(self, name: str) -> str:
        value = self._rendered(name)
        if value is None:
            raise InvalidInputError(
                f"{name} must be a non-empty string after rendering, got {getattr(self, name)!r}"
            )
        return value

    def execute(self, context: Context) -> dict[str, Any]:
        """Download, join and land the results (resubmitting rounds when asked); return the manifest."""
        ids = check_batch_ids(self.batch_id)
        hook = BatchHook(self._required("conn_id"))
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key=XCOM_BATCH_ID, value=ids[0])
            ti.xcom_push(key=XCOM_CONN_TYPE, value=hook.vendor.conn_type)
        return self._fetch(context, hook, [ids])

    def execute_complete(
        self, context: Context, event: Any = None, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resume after a round's batch ended: fetch again, with that round."""
        payload = waiting.validate_event(event)
        if payload["event"] != "terminal":
            raise LLMBatchError(f"waiting for a resubmission round failed: {payload['message']}")
        rounds = (extra or {}).get("rounds") or _pulled(context, XCOM_ROUNDS)
        if not isinstance(rounds, list):
            raise LLMBatchError("the rounds of this fetch were lost across the deferral")
        return self._fetch(context, BatchHook(self._required("conn_id")), rounds)

    def _schema(self) -> OutputSchema | None:
        return None if self.output_schema is None else OutputSchema.of(self.output_schema)

    def _check_typed(self, hook: BatchHook, batches: list[list[Batch]]) -> OutputSchema | None:
        """Check the output schema and the format against the batches before anything is downloaded."""
        schema = self._schema()
        if self.format == "parquet":
            pa, _ = pyarrow_modules()
            if schema is not None:
                output_columns(pa, schema)
        for batch in (b for r in batches for b in r):
            endpoint = hook.vendor.endpoint(batch.endpoint or "")
            if schema is not None and endpoint is not None and endpoint.kind in UNTYPED_KINDS:
                raise InvalidInputError(
                    f"output_schema: batch {batch.id} ran {endpoint.path}, whose responses have no answer "
                    "text to validate; drop output_schema for embeddings and image batches"
                )
        return schema

    def _fetch(self, context: Context, hook: BatchHook, rounds: list[list[str]]) -> dict[str, Any]:
        """Land the results of every round so far; resubmit another round when it is worth it."""
        batches = [[hook.get_batch(batch_id) for batch_id in ids] for ids in rounds]
        running = [b.id for r in batches for b in r if not b.is_terminal]
        if running:
            what = f"Batch {running[0]} has" if len(running) == 1 else f"Batches {', '.join(running)} have"
            raise LLMBatchError(
                f"{what} not ended; fetch the results once it has ended (wait with BatchSensor)"
            )
        schema = self._check_typed(hook, batches)
        destination = self._rendered("destination") or _default_destination(context, self.format)
        parts = batches[0]
        with tempfile.TemporaryDirectory(prefix="llmbatch-results-") as tmp:
            given = self._rendered("input_file")
            input_file, counts = (
                (given, part_requests(hook, parts, Path(tmp)))
                if given
                else download_inputs(hook, parts, Path(tmp))
            )
            model = job_model(input_file)
            files = [
                BatchFiles(
                    batch.status,
                    download(hook, batch.output_file_id, Path(tmp) / f"{n}-{i}.out.jsonl", self.log),
                    download(hook, batch.error_file_id, Path(tmp) / f"{n}-{i}.err.jsonl", self.log),
                    requests=counts[i] if n == 0 else None,
                    round=n,
                    sent=round_file(destination, n) if n else None,
                )
                for n, round_batches in enumerate(batches)
                for i, batch in enumerate(round_batches)
            ]
            report = join_results(
                input_file,
                destination,
                batches=files,
                include_request=self.include_request,
                output_schema=schema,
                format=self.format,
            )
            log_landing(self.log, ", ".join(b.id for r in batches for b in r), report)
            again: list[str] = []
            if len(rounds) <= self.resubmit_failed:
                # Still here: a request file downloaded from the vendor is gone once the folder is.
                again = create_round(
                    context,
                    hook,
                    self.log,
                    input_file=input_file,
                    destination=destination,
                    number=len(rounds),
                    endpoint=parts[0].endpoint,
                    format=self.format,
                )
        if again:
            return self._wait_round(context, hook, [*rounds, again])
        return self._land(context, hook, batches, report, input_file, model)

    def _wait_round(self, context: Context, hook: BatchHook, rounds: list[list[str]]) -> dict[str, Any]:
        """Wait for the newest round's batch: defer, or poll here; then fetch again."""
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key=XCOM_ROUNDS, value=rounds)  # dag.test() drops the deferral's kwargs
        waiting.wait_for_batch(
            context,
            hook,
            rounds[-1],
            self.round_wait,
            deferrable=self.deferrable,
            defer=self.defer,
            log=self.log,
            extra={"rounds": rounds},
        )
        return self._fetch(context, hook, rounds)

    def _land(
        self,
        context: Context,
        hook: BatchHook,
        batches: list[list[Batch]],
        report: JoinReport,
        input_file: str,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Announce the landed file, judge rows the batches did not count, tidy up; return the manifest."""
        parts = batches[0]
        if not report.reconciled:  # pragma: no cover - join_results writes one row per request by design
            raise LLMBatchError(f"Results do not reconcile: {report.counts}")
        extra = None if self.prices else hook.get_connection(hook.conn_id).extra_dejson
        prices = resolve_prices(self.prices, extra)
        manifest = build_manifest(
            batches, report, input_file, prices=prices, model=model, result_format=self.format
        )
        log_usage(self.log, manifest)
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key=XCOM_RESULT_URI, value=report.result_uri)
        self._announce(context, hook, manifest, parts[0])
        for batch in (b for r in batches for b in r):
            if self.delete_remote_files:
                delete_files(hook, [batch.output_file_id, batch.error_file_id, batch.input_file_id], self.log)
            elif self.delete_input_file:
                delete_files(hook, [batch.input_file_id], self.log)
        if any(request_counts(b.summary()) is None for b in parts):
            # The batches did not say how many requests failed: the landed rows do, judged like the sensor.
            failed, total = row_failures(report.counts, invalid_output_fails=self.invalid_output_fails)
            counts = {"total": total, "completed": total - failed, "failed": failed}
            judge(
                {**parts[0].summary(), "request_counts": counts}, max_failed_fraction=self.max_failed_fraction
            )
        elif self.output_schema is not None:
            # Invalid outputs show only here: the landed rows are judged, not the vendor's counts.
            judge_rows(
                report.counts,
                batch_id=parts[0].id,
                max_failed_fraction=self.max_failed_fraction,
                invalid_output_fails=self.invalid_output_fails,
            )
        return manifest

    def _announce(self, context: Context, hook: BatchHook, manifest: dict[str, Any], first: Batch) -> None:
        """Emit the results asset's event; keep what lineage reports once the task has succeeded."""
        events = context.get("outlet_events")
        if events is not None and self.results_asset is not None:
            events[self.results_asset].extra = assets.event_extra(manifest)
        self._lineage = lineage.BatchLineage.of_fetch(
            manifest,
            conn_type=hook.vendor.conn_type,
            endpoint=first.endpoint,
            input_file=self._rendered("input_file"),
        )

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage[Any, Any] | None:
        """Report the request file, the landed results file and the batches (None without OpenLineage)."""
        return None if self._lineage is None else lineage.operator_lineage(self._lineage)


XCOM_ROUNDS = "resubmission_rounds"
"""The XCom key of the batch ids of each round, pushed before a round is waited for."""


def _default_destination(context: Context, format: ResultFormat) -> str:
    """Return ``$AIRFLOW_HOME/llmbatch-results/<dag>/<run>/<task>.<jsonl|parquet>``."""
    return default_task_path("llmbatch-results", context).removesuffix(".jsonl") + f".{format}"


def _pulled(context: Context, key: str) -> Any:
    ti = context.get("ti")
    if ti is None:
        return None
    index = getattr(ti, "map_index", -1)
    return ti.xcom_pull(
        task_ids=ti.task_id, key=key, map_indexes=index if isinstance(index, int) and index >= 0 else None
    )
