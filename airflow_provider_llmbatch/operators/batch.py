"""The operator that checks a request file, uploads it in parts, creates their batches, optionally waits."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator, conf

from airflow_provider_llmbatch import budget, lineage, waiting
from airflow_provider_llmbatch.checks import check_count
from airflow_provider_llmbatch.exceptions import InputChangedError, InvalidInputError
from airflow_provider_llmbatch.hooks.arguments import check_create_args, check_user_metadata
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.uploads import upload_name
from airflow_provider_llmbatch.jsonl import build_request_file
from airflow_provider_llmbatch.links.batch import XCOM_BATCH_ID, XCOM_CONN_TYPE, BatchConsoleLink
from airflow_provider_llmbatch.locations import object_path
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.operators import reattach
from airflow_provider_llmbatch.parts import Part, SplitInput, split_checked
from airflow_provider_llmbatch.polling import DEFAULT_MAX_POLL_INTERVAL, DEFAULT_POLL_INTERVAL
from airflow_provider_llmbatch.pricing import PriceTable, resolve_prices
from airflow_provider_llmbatch.schema import OutputSchema

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import Context, ObjectStoragePath

    from airflow_provider_llmbatch.vendors import VendorSpec

XCOM_INPUT_FILE_ID = "input_file_id"
XCOM_INPUT_FINGERPRINT = "input_fingerprint"
XCOM_INPUT_URI = "input_uri"
XCOM_CREATE_RESULT = "create_result"
XCOM_BATCH_IDS = "batch_ids"
PUSHED = (
    XCOM_INPUT_FILE_ID,
    XCOM_BATCH_ID,
    XCOM_BATCH_IDS,
    XCOM_CONN_TYPE,
    XCOM_INPUT_FINGERPRINT,
    XCOM_INPUT_URI,
)
"""XCom keys pushed once the batch is known (and the create result, before any wait)."""


class CreateBatchOperator(BaseOperator):
    """
    Check and upload a request file (or build one from records), create an LLM batch, optionally wait.

    The whole input is checked before anything is sent, in the one pass that splits it into parts within
    the vendor's per-file limits (see :func:`~airflow_provider_llmbatch.parts.split_checked`): a bad input
    fails the task listing every problem (line, field, what was expected) without a single request, and
    so does one needing more than ``max_batches`` batches or more files than the vendor's quota leaves
    room for. Each part becomes one batch. Returns a small dict (also pushed as XCom keys; ``batch_ids``
    lists every part's batch), or with ``wait_for_completion`` the judged end of all of them merged over
    it. Retry-safe per part: a retry of the same task instance with the same input re-attaches to the
    batches it made and reuses its uploads (see :mod:`~airflow_provider_llmbatch.operators.reattach`).
    With OpenLineage installed and configured, it reports the request file as an input dataset and the
    batches as a run facet (see :mod:`~airflow_provider_llmbatch.lineage`).

    :param conn_id: the LLM batch connection; its type decides the vendor. (templated)
        (default: ``llmbatch_default``)
    :param input_file: the request file: a local path, or a URI such as ``file:///...`` or ``s3://...``.
        (templated)
    :param requests: records to build the request file from (a list or an XComArg), instead of
        ``input_file``; see :func:`~airflow_provider_llmbatch.jsonl.build_request_file`. Wrap a literal
        list in ``airflow.sdk.literal(...)`` when prompts contain Jinja syntax. (templated)
    :param model: the model of every request built from ``requests``. (templated)
    :param endpoint: the batch endpoint. (templated) (default: the vendor's first)
    :param completion_window: the batch window, e.g. ``24h``. (templated) (default: the vendor's)
    :param metadata: string pairs stored on the batch; ``llmbatch_*`` keys are reserved. (templated)
    :param vendor_options: vendor-only create fields, e.g. Zhipu ``auto_delete_input_file``. (templated)
    :param request_file_destination: where a file built from ``requests`` is kept for the results join.
        (templated) (default: ``$AIRFLOW_HOME/llmbatch-requests/<dag>/<run>/<task>.jsonl``)
    :param wait_for_completion: wait for the batch to end and judge it. (default: False)
    :param deferrable: wait in the triggerer. (default: ``[operators] default_deferrable``)
    :param poll_interval: the typical seconds between polls. (default: 30)
    :param max_poll_interval: no scheduled wait between polls is longer. (default: 600)
    :param timeout: seconds (or timedelta) to wait before giving up. (default: 7 days)
    :param max_failed_fraction: share of failed requests a completed batch may have. (default: 0.0)
    :param cancel_on_kill: cancel the batch when the task is killed. (default: True)
    :param cancel_on_timeout: cancel the batch when the wait times out. (default: True)
    :param reattach: look for this task instance's earlier batch before creating one. (default: True)
    :param max_batches: the most batches an input may be split into (over a vendor's per-file limits);
        checked before anything is uploaded. (default: 10)
    :param max_input_tokens: refuse, before anything is uploaded, an input estimated above this many
        input tokens (see :mod:`~airflow_provider_llmbatch.budget`). (default: no limit)
    :param max_cost: refuse, before anything is uploaded, a job estimated to cost more than this, in the
        price table's currency: estimated input tokens at the input price, plus each request's
        ``max_tokens`` at the output price where it sets one. Needs a price for the model. (default: no limit)
    :param prices: the batch prices per model (see :class:`~airflow_provider_llmbatch.pricing.PriceTable`),
        a mapping or its JSON text; wins over the connection extra ``prices``. (templated)
    :param output_schema: the answer's shape, a JSON Schema dict or a pydantic model class: requests built
        from ``requests`` ask for it as the vendor takes structured output (see
        :mod:`~airflow_provider_llmbatch.vendor_outputs`); a request file given as ``input_file`` is sent
        as written. Not templated (a class stays a class). (default: None)
    """

    template_fields: Sequence[str] = (
        "conn_id",
        "input_file",
        "requests",
        "model",
        "endpoint",
        "completion_window",
        "metadata",
        "vendor_options",
        "request_file_destination",
        "prices",
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {
        "metadata": "json",
        "vendor_options": "json",
        "requests": "json",
    }
    operator_extra_links = (BatchConsoleLink(),)
    ui_color = "#e8eef8"

    def __init__(
        self,
        *,
        conn_id: str = BatchHook.default_conn_name,
        input_file: str | os.PathLike[str] | ObjectStoragePath | None = None,
        requests: Any = None,
        model: str | None = None,
        endpoint: str | None = None,
        completion_window: str | None = None,
        metadata: dict[str, str] | None = None,
        vendor_options: dict[str, Any] | None = None,
        request_file_destination: str | None = None,
        wait_for_completion: bool = False,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        timeout: float | timedelta = waiting.DEFAULT_TIMEOUT,
        max_failed_fraction: float = 0.0,
        cancel_on_kill: bool = True,
        cancel_on_timeout: bool = True,
        reattach: bool = True,
        max_batches: int = 10,
        max_input_tokens: int | None = None,
        max_cost: float | None = None,
        prices: PriceTable | Mapping[str, Any] | str | None = None,
        output_schema: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Checked now (no I/O), so a wrong schema fails the DAG file; kept as given (a class stays a class).
        if output_schema is not None:
            OutputSchema.of(output_schema)
        self.output_schema = output_schema
        self.budget = budget.Budget.checked(max_input_tokens=max_input_tokens, max_cost=max_cost)
        self.prices = prices
        self.conn_id = conn_id
        self.input_file = input_file
        self.requests = requests
        self.model = model
        self.endpoint = endpoint
        self.completion_window = completion_window
        self.metadata = metadata
        self.vendor_options = vendor_options
        self.request_file_destination = request_file_destination
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.reattach = reattach
        self.max_batches = check_count("max_batches", max_batches, minimum=1)
        self.wait_settings = waiting.WaitSettings.checked(
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            timeout=timeout,
            max_failed_fraction=max_failed_fraction,
            cancel_on_timeout=cancel_on_timeout,
            cancel_on_kill=cancel_on_kill,
        )
        self._batch_ids: list[str] = []
        self._lineage: lineage.BatchLineage | None = None

    @cached_property
    def hook(self) -> BatchHook:
        """Return the hook of ``conn_id`` (after rendering)."""
        return BatchHook(self.conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        """Check (and split) the input; re-attach, reuse or upload each part; create; wait if asked."""
        spec = self.hook.vendor
        self._check_arguments(spec)
        tracker = reattach.Tracker(context, self.hook, self.log, enabled=self.reattach)
        uri, source = self._request_file(context, spec)
        self._batch_ids = []
        with tempfile.TemporaryDirectory(prefix="llmbatch-parts-") as folder:
            estimator = budget.TokenEstimator()
            split = split_checked(source, spec, self.endpoint, folder=folder, estimator=estimator)
            estimate = self._check_budget(split, estimator.estimate())
            self._check_room(context, split, tracker)
            try:
                made = [self._submit(context, tracker, split, part) for part in split.parts]
            except InputChangedError:
                # The parts sent so far are of the input checked, the rest would not be: no half job runs.
                self._cancel_made("the input changed after it was checked")
                raise
        result = {**_result(spec, uri, split, made), "estimate": estimate}
        for key in PUSHED:
            _push(context, key, result[key])
        if not self.wait_for_completion:
            return self._reported(result)
        # dag.test() drops deferral kwargs on resume; execute_complete then reads the result back from XCom.
        _push(context, XCOM_CREATE_RESULT, result)
        return self._reported(
            waiting.wait_for_batch(
                context,
                self.hook,
                self._batch_ids,
                self.wait_settings,
                deferrable=self.deferrable,
                defer=self.defer,
                log=self.log,
                extra=result,
            )
        )

    def _check_arguments(self, spec: VendorSpec) -> None:
        """Check the templated arguments after rendering, against the vendor's rules; nothing is sent."""
        if (self.input_file is None) == (self.requests is None):
            raise InvalidInputError("give exactly one of input_file and requests")
        if isinstance(self.input_file, str) and not self.input_file.strip():
            raise InvalidInputError("input_file rendered to an empty string")
        if self.requests is not None and (
            isinstance(self.requests, str | bytes | Mapping) or not isinstance(self.requests, Sequence)
        ):
            raise InvalidInputError(
                f"requests must be a list of records, got {type(self.requests).__name__}; "
                "pass an XComArg or render templates as native objects"
            )
        if self.requests is not None and not self.model:
            raise InvalidInputError("model is required when requests are given")
        for name in ("endpoint", "completion_window", "model"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        metadata, options = self.metadata or {}, self.vendor_options or {}
        if not isinstance(metadata, Mapping) or not isinstance(options, Mapping):
            raise InvalidInputError("metadata and vendor_options must be dicts")
        check_user_metadata(metadata)
        key = {reattach.KEY_METADATA: "0" * reattach.KEY_LENGTH, reattach.REQUESTS_METADATA: "50000"}
        check_create_args(
            spec,
            endpoint=self.endpoint,
            completion_window=self.completion_window,
            metadata={**metadata, **key},
            extra=options,
        )

    def _request_file(self, context: Context, spec: VendorSpec) -> tuple[str, Any]:
        """Return the request file's URI (for the results join) and what to read it from."""
        if self.requests is None:
            return _as_uri(self.input_file), self._source()
        path = self.request_file_destination or reattach.default_task_path("llmbatch-requests", context)
        # Checked as one input: the split that follows applies the per-file limits, part by part.
        build_request_file(
            list(self.requests),
            path,
            spec,
            self.endpoint,
            model=self.model,
            whole_input=True,
            output_schema=self.output_schema,
        )
        return _as_uri(path), path

    def _check_budget(self, split: SplitInput, estimate: budget.TokenEstimate) -> dict[str, Any]:
        """Refuse, before the first upload, a job estimated above ``max_input_tokens`` or ``max_cost``."""
        extra = None if self.prices else self.hook.get_connection(self.conn_id).extra_dejson
        prices = resolve_prices(self.prices, extra)
        cost = budget.check_budget(self.budget, estimate, split.report.model, prices)
        self.log.info("Estimate: %s", budget.describe(estimate, cost))
        return budget.as_record(estimate, cost)

    def _check_room(self, context: Context, split: SplitInput, tracker: reattach.Tracker) -> None:
        """Refuse, before the first upload, more parts than ``max_batches`` or the vendor's file quota."""
        count = len(split.parts)
        if count > self.max_batches:
            raise InvalidInputError(
                f"the input needs {count} batches ({split.report.lines} requests, {split.report.bytes} "
                f"bytes), more than max_batches={self.max_batches}; raise max_batches or send less"
            )
        # Every try counts; a retry reuses the uploads an earlier one made (named by their part's key).
        earlier = () if tracker.first_try() else split.parts
        reusable = {upload_name(_part_key(context, split, part)): part.bytes for part in earlier}
        self.hook.check_file_quota(count, reusable=reusable)
        self.log.info("Input of %d requests in %d batch(es)", split.report.lines, count)

    def _submit(
        self, context: Context, tracker: reattach.Tracker, split: SplitInput, part: Part
    ) -> tuple[reattach.Found, Batch]:
        """Re-attach to, or upload and create, one part's batch; record it at once for a later try."""
        found, batch = tracker.submit(split, part, _part_key(context, split, part), self._create)
        # Known to on_kill at once: a kill while later parts upload still cancels this one.
        self._batch_ids.append(batch.id)
        return found, batch

    def _source(self) -> Any:
        """Return the request file to read: a URI as an ``ObjectStoragePath``, a path as it is."""
        if isinstance(self.input_file, str) and "://" in self.input_file:
            # Resolved now: a filesystem that is not installed is named with what to install.
            return object_path(self.input_file)
        return self.input_file

    def _create(self, found: reattach.Found) -> Batch:
        batch = self.hook.create_batch(
            input_file_id=found.file_id,
            endpoint=found.report.endpoint,
            completion_window=self.completion_window,
            metadata={**(self.metadata or {}), **reattach.batch_metadata(found)},
            extra=self.vendor_options or None,
        )
        self.log.info("Created batch %s (%s) from %s", batch.id, batch.status, found.file_id)
        return batch

    def execute_complete(
        self, context: Context, event: Any = None, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resume after the trigger fired: judge the batch, return its summary over the create result."""
        if extra is None:
            ti = context.get("ti")
            value = (
                ti.xcom_pull(task_ids=ti.task_id, key=XCOM_CREATE_RESULT, map_indexes=ti.map_index)
                if ti
                else None
            )
            extra = value if isinstance(value, Mapping) else None
        return self._reported(
            waiting.complete(context, event, self.wait_settings, extra, conn_id=self.conn_id)
        )

    def _reported(self, result: dict[str, Any]) -> dict[str, Any]:
        """Keep what lineage reports of ``result`` once the task has succeeded; return it."""
        self._lineage = lineage.BatchLineage.of_create(result)
        return result

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage[Any, Any] | None:
        """Report the request file and the batches (None without OpenLineage)."""
        return None if self._lineage is None else lineage.operator_lineage(self._lineage)

    def on_kill(self) -> None:
        """Cancel the batch this task instance created or re-attached to, if it still runs."""
        if self.wait_settings.cancel_on_kill:
            self._cancel_made("the task was killed")

    def _cancel_made(self, reason: str) -> None:
        """Cancel every batch this try created or re-attached to, if it still runs."""
        for batch_id in self._batch_ids:
            waiting.cancel(self.hook, batch_id, reason, self.log)


def _result(
    spec: VendorSpec, uri: str, split: SplitInput, made: list[tuple[reattach.Found, Batch]]
) -> dict[str, Any]:
    """Return the small result of the create: the first part's fields, and every part's."""
    (first, batch), report = made[0], split.report
    return {
        "batch_id": batch.id,
        "batch_ids": [b.id for _, b in made],
        "input_file_id": first.file_id,
        "input_file_ids": [f.file_id for f, _ in made],
        "status": batch.status,
        "endpoint": batch.endpoint or report.endpoint,
        "request_count": report.lines,
        "model": report.model,
        "request_counts": [f.report.lines for f, _ in made],
        "input_uri": uri,
        "reattached": all(f.batch is not None for f, _ in made),
        "conn_type": spec.conn_type,
        "input_fingerprint": report.sha256,
        reattach.KEY_METADATA: first.key,
    }


def _part_key(context: Context, split: SplitInput, part: Part) -> str:
    """Return the key of a part's batch (and upload): a one-part input keeps the key it always had."""
    return reattach.batch_key(context, split.report.sha256, None if len(split.parts) == 1 else part.index)


def _push(context: Context, key: str, value: Any) -> None:
    ti = context.get("ti")
    if ti is not None:
        ti.xcom_push(key=key, value=value)


def _as_uri(location: Any) -> str:
    """Return a location as text: URIs as given, local paths made absolute."""
    text = str(location)
    return text if "://" in text else str(Path(os.fspath(location)).absolute())
