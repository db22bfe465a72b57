"""
Identity and re-attaching: how a retried or cleared task finds the batch and the upload it already paid for.

A task instance's batch is named by a key made of the task instance (dag, task, run, map index) and the
SHA-256 of its request file (:func:`batch_key`), stored in the batch's ``llmbatch_key`` metadata. The
key, the uploaded file id and the batch id are also kept in Airflow's task state store, which survives
retries. A look-up accepts a batch only if its recorded key is this task instance's key for this input:
a changed file, another run or another task never re-attaches to what the old one made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_provider_llmbatch.exceptions import LLMBatchError, NotFoundError, VendorAPIError
from airflow_provider_llmbatch.hooks.uploads import upload_name
from airflow_provider_llmbatch.jsonl import RequestFileReport
from airflow_provider_llmbatch.models import Batch, BatchStatus

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_llmbatch.hooks.batch import BatchHook
    from airflow_provider_llmbatch.parts import Part, SplitInput

KEY_LENGTH = 32
"""Hex characters of the retry-safe identity key."""

KEY_METADATA = "llmbatch_key"
"""The batch metadata key that identifies the task instance and input a batch was created for."""

REQUESTS_METADATA = "llmbatch_requests"
"""The batch metadata key holding how many requests its request file holds: where a part ends in the input."""

STATE_KEY = "llmbatch_create"
"""The task state store key holding ``{"key", "input_file_id", "fingerprint", "batch_id"}`` across retries."""

REATTACHABLE_STATUSES: frozenset[BatchStatus] = frozenset(
    {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.COMPLETED}
)
"""Statuses of an earlier batch a retry re-attaches to; any other end gets a fresh batch."""

_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._+:=-]")


def task_identity(context: Context) -> tuple[str, str, str, int]:
    """Return ``(dag_id, task_id, run_id, map_index)`` of the running task instance."""
    ti = context.get("ti")
    if ti is None:
        raise LLMBatchError("the task context has no task instance; run the operator as an Airflow task")
    map_index = ti.map_index
    index = map_index if isinstance(map_index, int) and map_index >= 0 else -1
    return str(ti.dag_id), str(ti.task_id), str(ti.run_id), index


def default_task_path(root: str, context: Context) -> str:
    """Return ``$AIRFLOW_HOME/<root>/<dag_id>/<run_id>/<task_id>[.<map_index>].jsonl`` for this task."""
    dag_id, task_id, run_id, map_index = task_identity(context)
    name = task_id if map_index < 0 else f"{task_id}.{map_index}"
    parts = [_UNSAFE_PATH_CHARS.sub("_", p) for p in (dag_id, run_id, name)]
    home = Path(os.path.expanduser(os.environ.get("AIRFLOW_HOME", "~/airflow")))
    return str(home / root / parts[0] / parts[1] / f"{parts[2]}.jsonl")


def _hash(*parts: object, length: int) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:length]


def batch_key(context: Context, input_fingerprint: str, part: int | str | None = None) -> str:
    """
    Return the key naming this task instance's batch for this input (32 hex characters).

    :param part: the part's index, when the input is split into several batches (a one-part input
        keeps the key it always had), or a resubmission round's name.
    """
    extra = () if part is None else (part if isinstance(part, str) else f"part-{part}",)
    return _hash(*task_identity(context), input_fingerprint, *extra, length=KEY_LENGTH)


class StateStore:
    """
    The task state store where the running Airflow has one; every failure degrades to "absent".

    It holds one record per batch key (``{"key", "input_file_id", "fingerprint", "batch_id"}``): one for a
    one-part input, one per part of a split one.
    """

    def __init__(self, context: Context, log: Any) -> None:
        self._store = context.get("task_state_store")
        self._log = log
        self._records: dict[str, dict[str, Any]] | None = None
        self._answered = False

    def get(self, key: str) -> dict[str, Any]:
        """Return what an earlier try stored for ``key`` (read once), or an empty dict."""
        return dict(self._load().get(key, {}))

    def knows_no_earlier_try(self) -> bool:
        """Return whether the store answered and holds nothing from an earlier try (for any input)."""
        return not self._load() and self._answered

    def set(self, record: dict[str, Any]) -> None:
        """Store ``record`` (under its ``key``) for later tries."""
        records = self._load()
        records[record["key"]] = dict(record)
        if self._store is not None:
            try:
                stored: Any = {"records": records}
                self._store.set(STATE_KEY, stored)
            except Exception as exc:
                self._disable("write", exc)

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._records is None:
            self._records = self._read()
        return self._records

    def _read(self) -> dict[str, dict[str, Any]]:
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
        stored: Any = value
        if isinstance(stored, Mapping) and isinstance(stored.get("records"), Mapping):
            return {str(k): dict(v) for k, v in stored["records"].items() if isinstance(v, Mapping)}
        if isinstance(stored, Mapping) and isinstance(stored.get("key"), str):
            return {stored["key"]: dict(stored)}  # one record, as the release before parts wrote it
        # Something an earlier try wrote, even unreadable, means this is not the first try.
        return {"unreadable": {"value": repr(value)[:100]}}

    def _disable(self, what: str, exc: Exception) -> None:
        # The batch metadata look-up still finds the batch; the state store only makes it cheaper.
        self._log.warning("Task state store %s failed (%s); relying on the batch metadata look-up", what, exc)
        self._store = None


@dataclass(frozen=True)
class Found:
    """
    The checked request file of this try, its upload, and this task instance's earlier batch of it.

    :param report: what the file holds (its SHA-256 names the input).
    :param key: this task instance's key for this input.
    :param file_id: the uploaded file the batch is (or will be) created from.
    :param batch: the earlier batch re-attached to, or None when one is to be created.
    """

    report: RequestFileReport
    key: str
    file_id: str
    batch: Batch | None


class Tracker:
    """
    Find this task instance's earlier work: its task state store, and the look-ups for its batch and upload.

    :param context: the task context.
    :param hook: the hook of the task's connection.
    :param log: the task's logger.
    :param enabled: look for earlier work at all (``reattach=True``).
    :param reattach_ended: re-attach to an earlier batch whatever it became (a resubmission round, made
        once), not only to one still running or completed.
    """

    def __init__(
        self, context: Context, hook: BatchHook, log: Any, *, enabled: bool, reattach_ended: bool = False
    ) -> None:
        self.context = context
        self.hook = hook
        self.log = log
        self.enabled = enabled
        self.reattach_ended = reattach_ended
        self.state = StateStore(context, log)
        self._first_try: bool | None = None

    def first_try(self) -> bool:
        """Return whether no earlier try can exist (decided once, before this try records anything)."""
        if self._first_try is None:
            self._first_try = not self.enabled or self.state.knows_no_earlier_try()
        return self._first_try

    def reuse_or_upload(self, source: Any, report: RequestFileReport, key: str) -> Found:
        """For a checked file: re-attach to the earlier batch, or reuse the earlier upload, or upload."""
        batch = None if self.first_try() else self._earlier_batch(key)
        if batch is not None:
            return Found(
                report, key, batch.input_file_id or self.state.get(key).get("input_file_id") or "", batch
            )
        filename = upload_name(key)
        file_id = None if self.first_try() else self._earlier_upload(key, filename, report.bytes)
        if file_id is None:
            # Noted before the upload: a try that dies once the file is stored leaves a trace, so the
            # next try looks for that file instead of uploading (and storing) it again.
            self.state.set({"key": key, "fingerprint": report.sha256})
            file_id = self.hook.upload_file(source, filename=filename).id
            self.record(key, report, file_id)
        return Found(report, key, file_id, None)

    def submit(
        self, split: SplitInput, part: Part, key: str, create: Callable[[Found], Batch]
    ) -> tuple[Found, Batch]:
        """
        Re-attach to, or upload and create (with ``create``), one part's batch; record it at once.

        The part's report keeps the split input's SHA-256: with the part's index (in ``key``), it names the
        part.
        """
        report = dataclasses.replace(split.report, source=str(part.path), lines=part.lines, bytes=part.bytes)
        with part.open() as reader:  # a span of a local input, or a part file
            found = self.reuse_or_upload(reader, report, key)
        batch = found.batch or create(found)
        self.record(key, report, found.file_id, batch.id)
        return found, batch

    def record(self, key: str, report: RequestFileReport, file_id: str, batch_id: str | None = None) -> None:
        """Record what this try made, for a later try."""
        value = {"key": key, "input_file_id": file_id, "fingerprint": report.sha256}
        self.state.set(value if batch_id is None else {**value, "batch_id": batch_id})

    def _earlier_batch(self, key: str) -> Batch | None:
        """Return this task instance's earlier batch for this input, if it is worth re-attaching to."""
        if not self.enabled:
            return None
        batch: Batch | None = None
        stored_id = self.state.get(key).get("batch_id")
        if isinstance(stored_id, str) and stored_id:
            try:
                batch = self.hook.get_batch(stored_id)
            except NotFoundError:
                self.log.info("Batch %s from the task state store no longer exists", stored_id)
        # Only a batch that records this task instance's key for this input is ever taken.
        if batch is None or (batch.metadata or {}).get(KEY_METADATA) != key:
            batch = self.hook.find_batch(metadata={KEY_METADATA: key})
        if batch is None:
            return None
        if self.reattach_ended or batch.state in REATTACHABLE_STATUSES:
            self.log.info("Re-attaching to batch %s (%s) created by an earlier try", batch.id, batch.status)
            return batch
        self.log.warning(
            "The earlier batch %s of this task ended %s; creating a fresh batch", batch.id, batch.status
        )
        return None

    def _earlier_upload(self, key: str, filename: str, size: int) -> str | None:
        """Return the id of this task instance's earlier upload of this input, if it is still usable."""
        if not self.enabled:
            return None
        stored_id = self.state.get(key).get("input_file_id")
        try:
            if isinstance(stored_id, str) and stored_id:
                try:
                    stored = self.hook.get_file(stored_id)
                except NotFoundError:
                    stored = None
                if stored is not None and stored.holds_whole(size):
                    return stored.id
            for file in self.hook.list_files(purpose="batch"):
                if file.filename == filename and file.holds_whole(size):
                    self.log.info("Reusing uploaded request file %s (%s)", file.id, filename)
                    return file.id
        except VendorAPIError as exc:
            # A duplicate upload costs storage, not money; a failed look-up must not fail the task.
            self.log.warning("Could not look for an earlier upload (%s); uploading again", exc)
        return None


def batch_metadata(found: Found) -> dict[str, str]:
    """Return the provider's metadata of a batch to create: its key, and the requests its file holds."""
    return {KEY_METADATA: found.key, REQUESTS_METADATA: str(found.report.lines)}


def recorded_requests(batch: Batch) -> int | None:
    """
    Return how many requests a batch's request file holds: as its create recorded it, or else as the
    vendor counts it; None when neither is known (no file of requests is empty, so a count of 0 is not).
    """
    recorded = (batch.metadata or {}).get(REQUESTS_METADATA)
    if isinstance(recorded, str) and recorded.isascii() and recorded.isdigit() and int(recorded) > 0:
        return int(recorded)
    total = batch.request_counts.total
    return total if isinstance(total, int) and total > 0 else None
