"""
Operators that start and stop LLM batches.

:class:`CreateBatchOperator` checks a request file as it uploads it (or builds one from records) and
creates the batch; it is retry-safe: a retried or cleared task finds the batch it already paid for
(through Airflow's task state store, then the batch's ``llmbatch_key`` metadata) and re-attaches to
it. :class:`CancelBatchOperator` cancels a batch.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator, conf

from airflow_provider_llmbatch.exceptions import (
    InvalidInputError,
    LLMBatchError,
    NotFoundError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks._core import check_create_args
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.jsonl import (
    RequestFileCheck,
    RequestFileReport,
    build_request_file,
    validate_request_file,
)
from airflow_provider_llmbatch.links.batch import XCOM_BATCH_ID, XCOM_CONN_TYPE, BatchConsoleLink
from airflow_provider_llmbatch.models import CANCELLABLE_STATUSES, Batch, BatchStatus
from airflow_provider_llmbatch.polling import DEFAULT_MAX_POLL_INTERVAL
from airflow_provider_llmbatch.sensors.batch import DEFAULT_TIMEOUT, BatchWaitMixin

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath

    from airflow_provider_llmbatch.vendors import VendorSpec

XCOM_INPUT_FILE_ID = "input_file_id"
"""The XCom key of the uploaded request file's id, pushed as soon as the upload is done."""

XCOM_INPUT_FINGERPRINT = "input_fingerprint"
"""The XCom key of the SHA-256 of the request file's bytes."""

XCOM_INPUT_URI = "input_uri"
"""The XCom key of the request file the batch was created from (for the results join)."""

XCOM_CREATE_RESULT = "create_result"
"""The XCom key of the create result (the return value without waiting), pushed before any wait."""

KEY_LENGTH = 32
"""Hex characters of the retry-safe identity key."""
KEY_METADATA = "llmbatch_key"
"""The batch metadata key that identifies the task instance and input a batch was created for."""

STATE_KEY = "llmbatch_create"
"""The task state store key holding ``{"key", "input_file_id", "fingerprint", "batch_id"}`` across retries."""

TAG_LENGTH = 16
"""Hex characters of the task tag and of the nonce in the name of a file checked as it uploads."""

REATTACHABLE_STATUSES: frozenset[BatchStatus] = frozenset(
    {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.COMPLETED}
)
"""Statuses of an earlier batch a retry re-attaches to; any other end gets a fresh batch."""

_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._+:=-]")


def airflow_home() -> Path:
    """Return ``$AIRFLOW_HOME`` (default ``~/airflow``), as Airflow resolves it."""
    return Path(os.path.expanduser(os.environ.get("AIRFLOW_HOME", "~/airflow")))


def task_identity(context: Context) -> tuple[str, str, str, int]:
    """Return ``(dag_id, task_id, run_id, map_index)`` of the running task instance."""
    ti = context.get("ti")
    if ti is None:
        raise LLMBatchError("the task context has no task instance; run the operator as an Airflow task")
    map_index = ti.map_index
    return (
        str(ti.dag_id),
        str(ti.task_id),
        str(ti.run_id),
        map_index if isinstance(map_index, int) and map_index >= 0 else -1,
    )


def default_task_path(root: str, context: Context) -> str:
    """Return ``$AIRFLOW_HOME/<root>/<dag_id>/<run_id>/<task_id>[.<map_index>].jsonl`` for this task."""
    dag_id, task_id, run_id, map_index = task_identity(context)
    name = task_id if map_index < 0 else f"{task_id}.{map_index}"
    parts = [_UNSAFE_PATH_CHARS.sub("_", p) for p in (dag_id, run_id, name)]
    return str(airflow_home() / root / parts[0] / parts[1] / f"{parts[2]}.jsonl")


def batch_key(context: Context, input_fingerprint: str) -> str:
    """Return the short key naming this task instance's batch for this input (32 hex characters)."""
    dag_id, task_id, run_id, map_index = task_identity(context)
    identity = "\x1f".join((dag_id, task_id, run_id, str(map_index), input_fingerprint))
    return hashlib.sha256(identity.encode()).hexdigest()[:KEY_LENGTH]


def task_tag(context: Context) -> str:
    """Return the short tag naming this task instance whatever its input (16 hex characters)."""
    identity = "\x1f".join(map(str, task_identity(context)))
    return hashlib.sha256(identity.encode()).hexdigest()[:TAG_LENGTH]


def checked_upload_name(context: Context) -> str:
    """
    Return the name of a file checked as it uploads: ``llmbatch-<task tag>-<nonce>.jsonl``.

    Its key is known only once the whole file has passed, after the name is sent; the random nonce
    makes the name unique, so the hook's lookup of an upload of unknown effect finds this upload only.
    """
    return f"llmbatch-{task_tag(context)}-{uuid.uuid4().hex[:TAG_LENGTH]}.jsonl"


def _push(context: Context, key: str, value: Any) -> None:
    ti = context.get("ti")
    if ti is not None:
        ti.xcom_push(key=key, value=value)


class _StateStore:
    """The task state store where the running Airflow has one; every failure degrades to "absent"."""

    def __init__(self, context: Context, log: Any) -> None:
        self._store = context.get("task_state_store")
        self._log = log
        self._value: dict[str, Any] | None = None
        self._answered = False

    def _load(self) -> dict[str, Any]:
        if self._value is None:
            self._value = self._read()
        return self._value

    def get(self, key: str) -> dict[str, Any]:
        """Return what an earlier try stored for ``key`` (read once), or an empty dict."""
        value = self._load()
        return value if value.get("key") == key else {}

    def knows_no_earlier_try(self) -> bool:
        """Return whether the store answered and holds nothing from an earlier try (for any input)."""
        return not self._load() and self._answered

    def _read(self) -> dict[str, Any]:
        if self._store is None:
            return {}
        try:
            value = self._store.get(STATE_KEY)
        except Exception as exc:
            self._disable("read", exc)
            return {}
        self._answered = True
        if value is None:
            return {}
        # Something an earlier try wrote, even unreadable, means this is not the first try.
        return dict(value) if isinstance(value, Mapping) else {"unreadable": repr(value)[:100]}

    def set(self, value: dict[str, Any]) -> None:
        """Store ``value`` for later tries."""
        self._value = dict(value)
        if self._store is None:
            return
        try:
            self._store.set(STATE_KEY, value)
        except Exception as exc:
            self._disable("write", exc)

    def _disable(self, what: str, exc: Exception) -> None:
        # The batch metadata lookup still finds the batch; the state store only makes it cheaper.
        self._log.warning("Task state store %s failed (%s); relying on the batch metadata lookup", what, exc)
        self._store = None


class CreateBatchOperator(BatchWaitMixin, BaseOperator):
    """
    Upload a request file and create an LLM batch; optionally wait for it to end.

    The request file is checked against the vendor's rules (see
    :func:`~airflow_provider_llmbatch.jsonl.validate_request_file`) in the same pass that uploads it: each
    chunk is sent once the lines it completes passed, and the last bytes only once the whole file
    passed. At the first problem the upload is aborted unfinished, so the vendor never stores the file
    and no batch is created; the task fails with every problem listed (line, field, what was expected).
    A file built from ``requests`` is checked while it is written and uploaded as it is. XCom keys
    ``input_file_id``, ``batch_id``, ``conn_type`` and ``input_fingerprint`` are pushed the moment each is
    known; the return value is a small dict (``batch_id``, ``input_file_id``, ``status``, ``endpoint``,
    ``request_count``, ``input_uri``, ``reattached``, ...), or with ``wait_for_completion`` the final batch
    summary merged over it.

    A retry (or a clear) of the same task instance with the same input re-attaches to the batch it
    created, when that batch is in progress or completed, instead of paying for a second one; the
    uploaded file is reused as well. The key of that lookup is made of the task instance and the
    SHA-256 of the file, so a changed file never re-attaches to or reuses what the old one made. The
    first try of a task instance (its task state store holds nothing yet) checks while uploading, names
    the file ``llmbatch-<task tag>-<nonce>.jsonl`` and stores the key and file id as soon as the upload
    returns; a later try, or a run without a readable task state store, checks the file first, looks
    for the earlier batch and upload, and uploads (as ``llmbatch-<key>.jsonl``) only if none is usable.

    :param conn_id: the LLM batch connection; its type decides the vendor. (templated)
        (default: ``llmbatch_default``)
    :param input_file: the request file: a local path, or a URI such as ``file:///...`` or ``s3://...``.
        (templated)
    :param requests: records to build the request file from (a list or an XComArg), instead of
        ``input_file``; see :func:`~airflow_provider_llmbatch.jsonl.build_request_file`. A literal list
        is rendered as a template like any templated field: wrap it in ``airflow.sdk.literal(...)`` when
        prompts contain Jinja syntax (``{{``, ``{%``, ``{#``). (templated)
    :param model: the model of every request built from ``requests``. (templated)
    :param endpoint: the batch endpoint. (templated) (default: the vendor's first)
    :param completion_window: the batch window, e.g. ``24h``. (templated) (default: the vendor's)
    :param metadata: string pairs stored on the batch. (templated)
    :param vendor_options: vendor-only create fields, e.g. Zhipu ``auto_delete_input_file``. (templated)
    :param request_file_destination: where a file built from ``requests`` is kept for the results join.
        (templated) (default: ``$AIRFLOW_HOME/llmbatch-requests/<dag>/<run>/<task>.jsonl``)
    :param wait_for_completion: wait for the batch to end and judge it. (default: False)
    :param deferrable: wait in the triggerer. (default: ``[operators] default_deferrable``)
    :param poll_interval: the typical seconds between polls. (default: 30)
    :param max_poll_interval: no wait between polls is longer. (default: 600)
    :param timeout: seconds (or timedelta) to wait before giving up. (default: 7 days)
    :param max_failed_fraction: share of failed requests a completed batch may have. (default: 0.0)
    :param cancel_on_kill: cancel the batch when the task is killed. (default: True)
    :param cancel_on_timeout: cancel the batch when the wait times out. (default: True)
    :param reattach: look for this task instance's earlier batch before creating one. (default: True)
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
        poll_interval: float = 30.0,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        max_failed_fraction: float = 0.0,
        cancel_on_kill: bool = True,
        cancel_on_timeout: bool = True,
        reattach: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
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
        if not poll_interval > 0 or not max_poll_interval > 0:
            raise ValueError("poll_interval and max_poll_interval must be positive")
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.timeout = timeout
        if math.isnan(max_failed_fraction) or not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be between 0.0 and 1.0, got {max_failed_fraction!r}")
        self.max_failed_fraction = max_failed_fraction
        self.cancel_on_kill = cancel_on_kill
        self.cancel_on_timeout = cancel_on_timeout
        self.reattach = reattach
        self._owned_batch_id: str | None = None

    # -- rendered arguments -------------------------------------------------------------------------

    def _check_rendered(self, spec: VendorSpec) -> None:
        """Check the templated arguments after rendering, against the vendor's rules."""
        if not isinstance(self.conn_id, str) or not self.conn_id:
            raise InvalidInputError(f"conn_id must be a non-empty string, got {self.conn_id!r}")
        if (self.input_file is None) == (self.requests is None):
            raise InvalidInputError("give exactly one of input_file and requests")
        if isinstance(self.input_file, str) and not self.input_file.strip():
            raise InvalidInputError("input_file rendered to an empty string")
        if self.requests is not None:
            if isinstance(self.requests, str | bytes | Mapping) or not isinstance(self.requests, Sequence):
                raise InvalidInputError(
                    f"requests must be a list of records, got {type(self.requests).__name__}; "
                    "pass an XComArg or render templates as native objects"
                )
            if not isinstance(self.model, str) or not self.model:
                raise InvalidInputError("model is required when requests are given")
        for name in ("endpoint", "completion_window", "model"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(f"{name} must be a string, got {type(value).__name__}")
        metadata = self.metadata if self.metadata is not None else {}
        options = self.vendor_options if self.vendor_options is not None else {}
        if not isinstance(metadata, Mapping) or not isinstance(options, Mapping):
            raise InvalidInputError("metadata and vendor_options must be dicts")
        if KEY_METADATA in metadata:
            raise InvalidInputError(f"metadata key {KEY_METADATA!r} is reserved for retry-safe re-attaching")
        # The key's value is a fixed-length hash, so a placeholder of that length checks the limits exactly.
        check_create_args(
            spec,
            endpoint=self.endpoint,
            completion_window=self.completion_window,
            metadata={**metadata, KEY_METADATA: "0" * KEY_LENGTH},
            extra=options,
        )

    # -- the request file ---------------------------------------------------------------------------

    def _input_source(self) -> tuple[Any, str]:
        """Return the request file to read (a URI as an ``ObjectStoragePath``) and its URI for the join."""
        source = self.input_file
        if isinstance(source, str) and "://" in source:
            from airflow.sdk import ObjectStoragePath

            source = ObjectStoragePath(source)
        return source, _as_uri(self.input_file)

    def _prepare_input(self, context: Context, spec: VendorSpec) -> tuple[Any, str, RequestFileReport]:
        """Return the request file to upload, its URI for the results join, and its report (checked)."""
        if self.requests is not None:
            destination = self.request_file_destination or default_task_path("llmbatch-requests", context)
            report = build_request_file(
                list(self.requests), destination, spec, self.endpoint, model=self.model
            )
            self.log.info("Built %d requests into %s", report.lines, destination)
            return destination, _as_uri(destination), report
        source, input_uri = self._input_source()
        report = validate_request_file(source, spec, self.endpoint)
        return source, input_uri, report

    def _checks_while_uploading(self, state: _StateStore) -> bool:
        """Return whether the file is checked as it uploads: nothing needs its key before the upload."""
        if self.requests is not None:
            return False  # built and checked while written: uploaded as it is
        # A first try has no earlier batch or upload to find. Without a readable state store a first try
        # cannot be told from a retry, so the file is checked first and the earlier try's objects looked up.
        return not self.reattach or state.knows_no_earlier_try()

    # -- execution ----------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        """Check and upload (one pass) and create, or re-attach; wait if asked."""
        hook = self._batch_hook()
        spec = hook.vendor
        self._check_rendered(spec)
        state = _StateStore(context, self.log)
        batch: Batch | None = None
        if self._checks_while_uploading(state):
            source, input_uri = self._input_source()
            input_file_id, report = self._upload_checked(context, hook, state, source, spec)
            key = batch_key(context, report.sha256)
            self._log_report(input_uri, report)
            if self.reattach:
                # The task state store may have been emptied (a cleared run, a retention cleanup) while
                # the batch this task instance paid for still runs: the metadata lookup finds it.
                batch = self._find_earlier_batch(hook, state, key)
            if batch is not None:
                self._discard_upload(hook, input_file_id)
                input_file_id = batch.input_file_id or ""
        else:
            source, input_uri, report = self._prepare_input(context, spec)
            key = batch_key(context, report.sha256)
            self._log_report(input_uri, report)
            batch = self._find_earlier_batch(hook, state, key) if self.reattach else None
            if batch is not None:
                input_file_id = batch.input_file_id or state.get(key).get("input_file_id") or ""
            else:
                input_file_id = self._upload(hook, state, key, source, report)
        fingerprint = report.sha256
        reattached = batch is not None
        _push(context, XCOM_INPUT_FILE_ID, input_file_id)
        if batch is None:
            batch = self._create(hook, key, input_file_id, report)
        state.set(
            {"key": key, "input_file_id": input_file_id, "fingerprint": fingerprint, "batch_id": batch.id}
        )
        self._owned_batch_id = batch.id
        _push(context, XCOM_BATCH_ID, batch.id)
        _push(context, XCOM_CONN_TYPE, spec.conn_type)
        _push(context, XCOM_INPUT_FINGERPRINT, fingerprint)
        _push(context, XCOM_INPUT_URI, input_uri)
        result = {
            "batch_id": batch.id,
            "input_file_id": input_file_id,
            "status": batch.status,
            "endpoint": batch.endpoint or report.endpoint,
            "request_count": report.lines,
            "input_uri": input_uri,
            "reattached": reattached,
            "conn_type": spec.conn_type,
            "input_fingerprint": fingerprint,
            KEY_METADATA: key,
        }
        if not self.wait_for_completion:
            return result
        # Deferral kwargs carry the result in a real deployment; dag.test() drops them on resume, so
        # execute_complete can also read it back from XCom.
        _push(context, XCOM_CREATE_RESULT, result)
        return self._wait_for_batch(context, batch.id, extra=result)

    def _log_report(self, input_uri: str, report: RequestFileReport) -> None:
        self.log.info(
            "Request file %s: %d requests, %d bytes, model %s, endpoint %s",
            input_uri,
            report.lines,
            report.bytes,
            report.model,
            report.endpoint,
        )

    def execute_complete(
        self, context: Context, event: Any = None, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resume after the trigger fired: judge the batch, return its summary over the create result."""
        if extra is None:
            extra = self._pulled_result(context)
        return super().execute_complete(context, event, extra)

    def _pulled_result(self, context: Context) -> dict[str, Any] | None:
        ti = context.get("ti")
        if ti is None:
            return None
        map_index = getattr(ti, "map_index", -1)
        try:
            value = ti.xcom_pull(
                task_ids=ti.task_id,
                key=XCOM_CREATE_RESULT,
                map_indexes=map_index if isinstance(map_index, int) and map_index >= 0 else None,
            )
        except Exception as exc:
            self.log.warning("Could not read back the create result: %s", exc)
            return None
        return dict(value) if isinstance(value, Mapping) else None

    def _find_earlier_batch(self, hook: BatchHook, state: _StateStore, key: str) -> Batch | None:
        """Return this task instance's earlier batch for this input, if it is worth re-attaching to."""
        batch: Batch | None = None
        stored_id = state.get(key).get("batch_id")
        if isinstance(stored_id, str) and stored_id:
            try:
                batch = hook.get_batch(stored_id)
            except NotFoundError:
                self.log.info("Batch %s from the task state store no longer exists", stored_id)
        if batch is None:
            batch = hook.find_batch(metadata={KEY_METADATA: key})
        if batch is None:
            return None
        if batch.state in REATTACHABLE_STATUSES:
            self.log.info("Re-attaching to batch %s (%s) created by an earlier try", batch.id, batch.status)
            return batch
        self.log.warning(
            "The earlier batch %s of this task ended %s; creating a fresh batch", batch.id, batch.status
        )
        return None

    def _upload_checked(
        self, context: Context, hook: BatchHook, state: _StateStore, source: Any, spec: VendorSpec
    ) -> tuple[str, RequestFileReport]:
        """Check the request file as it uploads (one pass); record the upload as soon as it returns."""
        check = RequestFileCheck(spec, self.endpoint)
        filename = checked_upload_name(context)
        uploaded = hook.upload_file(source, filename=filename, purpose="batch", check=check)
        report = check.report
        if report is None:  # pragma: no cover - upload_file returns only after the check passed
            raise LLMBatchError(f"the upload of {filename} returned without a finished check")
        key = batch_key(context, report.sha256)
        # Recorded before anything else can fail: a retry reuses this upload instead of making another.
        state.set({"key": key, "input_file_id": uploaded.id, "fingerprint": report.sha256})
        self.log.info("Checked and uploaded %s as %s (%d bytes)", filename, uploaded.id, report.bytes)
        return uploaded.id, report

    def _discard_upload(self, hook: BatchHook, file_id: str) -> None:
        """Delete this try's own upload when an earlier batch (with its own input file) is re-attached to."""
        try:
            hook.delete_file(file_id)
        except VendorAPIError as exc:
            self.log.warning("Could not delete the unneeded upload %s (%s)", file_id, exc)
        else:
            self.log.info("Deleted upload %s: the earlier batch has its own input file", file_id)

    def _upload(
        self, hook: BatchHook, state: _StateStore, key: str, source: Any, report: RequestFileReport
    ) -> str:
        """Upload the checked request file, or reuse this task instance's earlier upload of it."""
        filename = f"llmbatch-{key}.jsonl"
        if self.reattach:
            reused = self._find_upload(hook, state, key, filename, report.bytes)
            if reused is not None:
                self.log.info("Reusing uploaded request file %s (%s)", reused, filename)
                return reused
        uploaded = hook.upload_file(source, filename=filename, purpose="batch")
        self.log.info("Uploaded %s as %s (%d bytes)", filename, uploaded.id, report.bytes)
        state.set({"key": key, "input_file_id": uploaded.id, "fingerprint": report.sha256})
        return uploaded.id

    def _find_upload(
        self, hook: BatchHook, state: _StateStore, key: str, filename: str, size: int
    ) -> str | None:
        def usable(file_bytes: int | None, status: str | None) -> bool:
            return (file_bytes is None or file_bytes == size) and status not in ("error", "deleted")

        stored_id = state.get(key).get("input_file_id")
        try:
            if isinstance(stored_id, str) and stored_id:
                try:
                    stored = hook.get_file(stored_id)
                except NotFoundError:
                    stored = None
                if stored is not None and usable(stored.bytes, stored.status):
                    return stored.id
            for file in hook.list_files(purpose="batch"):
                if file.filename == filename and usable(file.bytes, file.status):
                    return file.id
        except VendorAPIError as exc:
            # A duplicate upload costs storage, not money; a failed lookup must not fail the task.
            self.log.warning("Could not look for an earlier upload (%s); uploading again", exc)
        return None

    def _create(self, hook: BatchHook, key: str, input_file_id: str, report: RequestFileReport) -> Batch:
        metadata = {**(self.metadata or {}), KEY_METADATA: key}
        batch = hook.create_batch(
            input_file_id=input_file_id,
            endpoint=report.endpoint,
            completion_window=self.completion_window,
            metadata=metadata,
            extra=self.vendor_options or None,
        )
        self.log.info("Created batch %s (%s) from %s", batch.id, batch.status, input_file_id)
        return batch

    def on_kill(self) -> None:
        """Cancel the batch this task instance created or re-attached to, if it still runs."""
        batch_id = self._owned_batch_id or self._waiting_for
        if not batch_id or not self.cancel_on_kill:
            return
        try:
            batch = self._batch_hook().get_batch(batch_id)
        except Exception as exc:
            self.log.warning("Could not check batch %s before cancelling: %s", batch_id, exc)
            return
        if batch.state in CANCELLABLE_STATUSES:
            self._cancel_batch(batch_id, "the task was killed")
        else:
            self.log.info("Batch %s is %s; nothing to cancel", batch_id, batch.status)


def _as_uri(location: Any) -> str:
    """Return a location as text: URIs as given, local paths made absolute."""
    text = str(location)
    if "://" in text:
        return text
    return str(Path(os.fspath(location)).absolute())


class CancelBatchOperator(BaseOperator):
    """
    Cancel an LLM batch; a batch that has already ended is left as it is.

    Returns the batch summary after the cancel request (often ``cancelling``; the vendor finishes it).

    :param batch_id: the vendor's batch id. (templated)
    :param conn_id: the LLM batch connection. (templated) (default: ``llmbatch_default``)
    """

    template_fields: Sequence[str] = ("batch_id", "conn_id")
    operator_extra_links = (BatchConsoleLink(),)

    def __init__(self, *, batch_id: str, conn_id: str = BatchHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_id = batch_id
        self.conn_id = conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        """Cancel the batch unless it has already ended; return its summary."""
        if not isinstance(self.batch_id, str) or not self.batch_id.strip():
            raise InvalidInputError(f"batch_id must be a non-empty string, got {self.batch_id!r}")
        batch_id = self.batch_id.strip()
        hook = BatchHook(self.conn_id)
        _push(context, XCOM_BATCH_ID, batch_id)
        _push(context, XCOM_CONN_TYPE, hook.vendor.conn_type)
        batch = hook.get_batch(batch_id)
        if batch.state in CANCELLABLE_STATUSES:
            batch = hook.cancel_batch(batch_id)
            self.log.info("Cancel requested for batch %s: now %s", batch_id, batch.status)
        else:
            self.log.info("Batch %s is %s; not cancelling", batch_id, batch.status)
        return batch.summary()
