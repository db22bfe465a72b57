"""Fetch a finished batch's results, join them with its requests, and land one results file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias, BaseOperator

from airflow_provider_llmbatch.exceptions import (
    InvalidInputError,
    LLMBatchError,
    NotFoundError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.links.batch import XCOM_BATCH_ID, XCOM_CONN_TYPE, BatchConsoleLink
from airflow_provider_llmbatch.operators.reattach import default_task_path
from airflow_provider_llmbatch.outcomes import check_fraction, judge, request_counts
from airflow_provider_llmbatch.results import JoinReport, join_results

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_llmbatch.models import Batch

RESULTS_ASSET_ALIAS = "llmbatch-results"
"""The asset alias every results file is announced under, as ``Asset(<result URI>)``."""

XCOM_RESULT_URI = "result_uri"
"""The XCom key of the landed results file's URI."""


class FetchBatchResultsOperator(BaseOperator):
    """
    Download a finished batch's output and error files and land one results JSONL, one row per request.

    Rows follow the request file's order: ``{"custom_id", "status", "response", "error", "usage"}`` with
    ``status`` one of ``succeeded``, ``failed``, ``expired``, ``cancelled``, ``missing``. Expired and
    cancelled batches are landed too. The file is written under a temporary name and moved into place.
    Returns a small manifest (``batch_id``, ``status``, ``result_uri``, ``counts``, ``usage``,
    ``anomalies``) and emits an asset event for ``Asset(result_uri)`` through the ``llmbatch-results``
    asset alias.

    :param batch_id: the vendor's batch id, e.g. ``{{ ti.xcom_pull(task_ids='create', key='batch_id') }}``.
        (templated)
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
    """

    template_fields: Sequence[str] = ("batch_id", "conn_id", "input_file", "destination")
    operator_extra_links = (BatchConsoleLink(),)
    ui_color = "#eef8e8"

    def __init__(
        self,
        *,
        batch_id: str,
        conn_id: str = BatchHook.default_conn_name,
        input_file: str | None = None,
        destination: str | None = None,
        delete_remote_files: bool = False,
        include_request: bool = False,
        max_failed_fraction: float = 0.0,
        **kwargs: Any,
    ) -> None:
        outlets = list(kwargs.pop("outlets", None) or [])
        alias = AssetAlias(RESULTS_ASSET_ALIAS)
        if alias not in outlets:
            outlets.append(alias)
        super().__init__(outlets=outlets, **kwargs)
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.input_file = input_file
        self.destination = destination
        self.delete_remote_files = delete_remote_files
        self.include_request = include_request
        self.max_failed_fraction = check_fraction(max_failed_fraction)

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
        """Download, join and land the results; return the manifest."""
        batch_id = self._required("batch_id")
        conn_id = self._required("conn_id")
        input_file = self._rendered("input_file")
        destination = self._rendered("destination") or default_task_path("llmbatch-results", context)
        hook = BatchHook(conn_id)
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key=XCOM_BATCH_ID, value=batch_id)
            ti.xcom_push(key=XCOM_CONN_TYPE, value=hook.vendor.conn_type)
        batch = hook.get_batch(batch_id)
        if not batch.is_terminal:
            raise LLMBatchError(
                f"Batch {batch_id} is {batch.status!r}; fetch its results once it has ended "
                "(wait with BatchSensor first)"
            )
        if batch.status != "completed":
            self.log.warning("Batch %s ended %s; landing what it produced", batch_id, batch.status)
        with tempfile.TemporaryDirectory(prefix="llmbatch-results-") as tmp:
            requests = input_file or self._download_input(hook, batch, Path(tmp))
            output = self._download(hook, batch.output_file_id, Path(tmp) / "output.jsonl")
            errors = self._download(hook, batch.error_file_id, Path(tmp) / "errors.jsonl")
            report = join_results(
                requests,
                destination,
                output_file=output,
                error_file=errors,
                batch_status=batch.status,
                include_request=self.include_request,
            )
        self._log_report(batch_id, report)
        if not report.reconciled:  # pragma: no cover - join_results writes one row per request by design
            raise LLMBatchError(f"Results of batch {batch_id} do not reconcile: {report.counts}")
        manifest = {
            "batch_id": batch_id,
            "status": batch.status,
            "result_uri": report.result_uri,
            "counts": report.counts,
            "usage": report.usage,
            "anomalies": report.anomalies,
            "input_uri": input_file,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
        }
        if ti is not None:
            ti.xcom_push(key=XCOM_RESULT_URI, value=report.result_uri)
        self._emit_asset_event(context, manifest)
        if self.delete_remote_files:
            self._delete_remote_files(hook, batch)
        summary = batch.summary()
        if request_counts(summary) is None:
            # The batch did not say how many requests failed: the landed rows do, judged as the sensor would.
            total, ok = report.counts.get("total", 0), report.counts.get("succeeded", 0)
            counts = {"total": total, "completed": ok, "failed": total - ok}
            judge({**summary, "request_counts": counts}, max_failed_fraction=self.max_failed_fraction)
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

    def _emit_asset_event(self, context: Context, manifest: dict[str, Any]) -> None:
        events = context.get("outlet_events")
        if events is None:
            return
        extra = {
            "batch_id": manifest["batch_id"],
            "status": manifest["status"],
            "counts": manifest["counts"],
        }
        events[AssetAlias(RESULTS_ASSET_ALIAS)].add(Asset(uri=manifest["result_uri"]), extra=extra)

    def _delete_remote_files(self, hook: BatchHook, batch: Batch) -> None:
        for file_id in (batch.output_file_id, batch.error_file_id, batch.input_file_id):
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
