"""
Fetch a finished job's results, join them with its requests, resubmit what is worth it, land one file.

A job is one batch, or the parts of an input split over a vendor's limits; its results land as one file
in input order. With ``resubmit_failed=N``, rows that failed for a reason that may not last go into a new
request file and a new batch (a round), up to N rounds; their results replace the failed rows and each
row carries ``attempts``. A round's request file is kept beside the results file, and its batch is
named by this task instance and the round's requests, so a retried task re-attaches to it.
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
from airflow_provider_llmbatch.exceptions import (
    InvalidInputError,
    LLMBatchError,
    NotFoundError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.jsonl import validate_request_file
from airflow_provider_llmbatch.links.batch import XCOM_BATCH_ID, XCOM_CONN_TYPE, BatchConsoleLink
from airflow_provider_llmbatch.manifest import build_manifest
from airflow_provider_llmbatch.operators import reattach
from airflow_provider_llmbatch.operators.reattach import default_task_path
from airflow_provider_llmbatch.outcomes import check_fraction, judge, request_counts
from airflow_provider_llmbatch.polling import DEFAULT_POLL_INTERVAL
from airflow_provider_llmbatch.resubmit import retryable_ids, write_round
from airflow_provider_llmbatch.results import BatchFiles, JoinReport, join_results

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import Asset, Context

    from airflow_provider_llmbatch.models import Batch

XCOM_RESULT_URI = "result_uri"
"""The XCom key of the landed results file's URI."""


class FetchBatchResultsOperator(BaseOperator):
    """
    Download a finished batch's output and error files and land one results JSONL, one row per request.

    Rows follow the request file's order: ``{"custom_id", "status", "response", "error", "usage"}`` with
    ``status`` one of ``succeeded``, ``failed``, ``expired``, ``cancelled``, ``missing``. Expired and
    cancelled batches are landed too. The file is written under a temporary name and moved into place.
    Returns a small manifest (``batch_id``, ``status``, ``result_uri``, ``counts``, ``usage``,
    ``anomalies``) and emits an event of the task's results asset (one asset per task, see
    :func:`~airflow_provider_llmbatch.assets.results_asset`) whose extra carries ``result_uri`` and the
    manifest's summary. With OpenLineage installed and configured, it reports the request file and the
    results file as datasets and the batches as a run facet.

    :param batch_id: the vendor's batch id, e.g. ``{{ ti.xcom_pull(task_ids='create', key='batch_id') }}``,
        or the list of a split job's batch ids (its ``batch_ids`` XCom), in input order. (templated)
    :param conn_id: the LLM batch connection. (templated) (default: ``llmbatch_default``)
    :param input_file: the request file the batch ran (path or URI), e.g.
        ``create.output["input_uri"]``. (templated) (default: the batch's input
        file downloaded from the vendor, where the vendor allows it)
    :param destination: the results file (path or URI). (templated)
        (default: ``$AIRFLOW_HOME/llmbatch-results/<dag>/<run>/<task>.jsonl``)
    :param delete_remote_files: delete the batch's input, output and error files at the vendor once the
        results are landed. (default: False)
    :param include_request: add each request's body to its row as ``request``. (default: False)
    :param max_failed_fraction: the share of failed rows allowed when the batch itself did not report its
        request counts (the sensor could not judge it; the rows are judged here, as the sensor would
        have, after they are landed). (default: 0.0)
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

    template_fields: Sequence[str] = ("batch_id", "conn_id", "input_file", "destination")
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

    def _fetch(self, context: Context, hook: BatchHook, rounds: list[list[str]]) -> dict[str, Any]:
        """Land the results of every round so far; resubmit another round when it is worth it."""
        batches = [[hook.get_batch(batch_id) for batch_id in ids] for ids in rounds]
        running = [b.id for r in batches for b in r if not b.is_terminal]
        if running:
            what = f"Batch {running[0]} has" if len(running) == 1 else f"Batches {', '.join(running)} have"
            raise LLMBatchError(
                f"{what} not ended; fetch the results once it has ended (wait with BatchSensor)"
            )
        destination = self._rendered("destination") or default_task_path("llmbatch-results", context)
        parts = batches[0]
        with tempfile.TemporaryDirectory(prefix="llmbatch-results-") as tmp:
            input_file = self._rendered("input_file") or self._download_input(hook, parts[0], Path(tmp))
            files = [
                BatchFiles(
                    batch.status,
                    self._download(hook, batch.output_file_id, Path(tmp) / f"{n}-{i}.out.jsonl"),
                    self._download(hook, batch.error_file_id, Path(tmp) / f"{n}-{i}.err.jsonl"),
                    requests=batch.request_counts.total if n == 0 and len(parts) > 1 else None,
                    round=n,
                    sent=_round_file(destination, n) if n else None,
                )
                for n, round_batches in enumerate(batches)
                for i, batch in enumerate(round_batches)
            ]
            report = join_results(
                input_file, destination, batches=files, include_request=self.include_request
            )
        self._log_report(", ".join(b.id for r in batches for b in r), report)
        if len(rounds) <= self.resubmit_failed:
            again = self._resubmit(context, hook, input_file, destination, len(rounds))
            if again is not None:
                return self._wait_round(context, hook, [*rounds, [again]])
        return self._land(context, hook, batches, report, input_file)

    def _resubmit(
        self, context: Context, hook: BatchHook, input_file: str, destination: str, number: int
    ) -> str | None:
        """Create round ``number``'s batch of the rows worth resubmitting, or re-attach; None if none."""
        ids = set(retryable_ids(destination, hook.vendor))
        if not ids:
            return None
        path = _round_file(destination, number)
        count, sha256 = write_round(input_file, ids, path)
        key = reattach.batch_key(context, sha256, f"round-{number}")
        tracker = reattach.Tracker(context, hook, self.log, enabled=True)
        report = validate_request_file(path, hook.vendor)
        found = tracker.reuse_or_upload(path, report, key)
        batch = found.batch or hook.create_batch(
            input_file_id=found.file_id,
            endpoint=report.endpoint,
            metadata={reattach.KEY_METADATA: key},
        )
        tracker.record(key, report, found.file_id, batch.id)
        self.log.info("Round %d: %d request(s) worth sending again, in batch %s", number, count, batch.id)
        return batch.id

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
    ) -> dict[str, Any]:
        """Announce the landed file, judge rows the batches did not count, tidy up; return the manifest."""
        parts = batches[0]
        if not report.reconciled:  # pragma: no cover - join_results writes one row per request by design
            raise LLMBatchError(f"Results do not reconcile: {report.counts}")
        manifest = build_manifest(batches, report, input_file)
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key=XCOM_RESULT_URI, value=report.result_uri)
        self._announce(context, hook, manifest, parts[0])
        for batch in (b for r in batches for b in r):
            if self.delete_remote_files:
                self._delete_remote_files(hook, batch)
            elif self.delete_input_file:
                self._delete_files(hook, [batch.input_file_id])
        if any(request_counts(b.summary()) is None for b in parts):
            # The batches did not say how many requests failed: the landed rows do, judged like the sensor.
            total, ok = report.counts.get("total", 0), report.counts.get("succeeded", 0)
            counts = {"total": total, "completed": ok, "failed": total - ok}
            judge(
                {**parts[0].summary(), "request_counts": counts}, max_failed_fraction=self.max_failed_fraction
            )
        return manifest

    def _download_input(self, hook: BatchHook, batch: Batch, tmp: Path) -> str:
        spec = hook.vendor
        if not batch.input_file_id:
            raise InvalidInputError(f"Batch {batch.id} names no input file; pass input_file=")
        if not spec.input_content_downloadable:
            raise InvalidInputError(
                f"{spec.display_name} does not serve the content of request files, so the results of "
                f"batch {batch.id} cannot be joined without them; pass input_file= (for example "
                "\"{{ ti.xcom_pull(task_ids='<create task>')['input_uri'] }}\")"
            )
        path = tmp / "input.jsonl"
        try:
            hook.download_file(batch.input_file_id, path)
        except NotFoundError as exc:
            raise InvalidInputError(
                f"The request file {batch.input_file_id} of batch {batch.id} is gone at the vendor "
                f"(some vendors delete it after the batch); pass input_file=. ({exc})"
            ) from exc
        return str(path)

    def _download(self, hook: BatchHook, file_id: str | None, path: Path) -> Path | None:
        if not file_id:
            return None
        expected: int | None = None
        try:
            # The listed size lets the download refuse a garbled body that would land as the file.
            expected = hook.get_file(file_id).bytes
        except VendorAPIError as exc:
            self.log.warning("Could not read the size of %s (%s); downloading unchecked", file_id, exc)
        size = hook.download_file(file_id, path, expected_bytes=expected)
        self.log.info("Downloaded %s (%d bytes)", file_id, size)
        return path

    def _log_report(self, batch_id: str, report: JoinReport) -> None:
        counts, usage = report.counts, report.usage
        self.log.info(
            "Landed %d rows of batch %s at %s: %s; tokens %d prompt + %d completion = %d",
            counts.get("total", 0),
            batch_id,
            report.result_uri,
            ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total" and v),
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            usage.get("total_tokens", 0),
        )
        for kind, count in report.anomalies.items():
            if count:
                self.log.warning(
                    "Vendor files of batch %s: %d %s (e.g. %s)",
                    batch_id,
                    count,
                    kind.replace("_", " "),
                    ", ".join(report.samples.get(kind, [])),
                )

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

    def _delete_remote_files(self, hook: BatchHook, batch: Batch) -> None:
        self._delete_files(hook, [batch.output_file_id, batch.error_file_id, batch.input_file_id])

    def _delete_files(self, hook: BatchHook, file_ids: list[str | None]) -> None:
        for file_id in file_ids:
            if not file_id:
                continue
            try:
                hook.delete_file(file_id)
                self.log.info("Deleted remote file %s", file_id)
            except NotFoundError:
                self.log.info("Remote file %s was already gone", file_id)
            except VendorAPIError as exc:
                # The results are landed; a leftover remote file is not worth failing (and re-running) for.
                self.log.warning("Could not delete remote file %s: %s", file_id, exc)


XCOM_ROUNDS = "resubmission_rounds"
"""The XCom key of the batch ids of each round, pushed before a round is waited for."""


def _round_file(destination: str, number: int) -> str:
    """Return where round ``number``'s request file is kept: beside the results file."""
    stem = destination.removesuffix(".jsonl")
    return f"{stem}.round-{number}.requests.jsonl"


def _pulled(context: Context, key: str) -> Any:
    ti = context.get("ti")
    if ti is None:
        return None
    index = getattr(ti, "map_index", -1)
    return ti.xcom_pull(
        task_ids=ti.task_id, key=key, map_indexes=index if isinstance(index, int) and index >= 0 else None
    )
