"""The emulator's store: files and batches per vendor on disk, counters, and the lazy state machine."""

from __future__ import annotations

import re
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_llmbatch.emulator import machine
from airflow_provider_llmbatch.emulator.config import Clock, EmulatorConfig
from airflow_provider_llmbatch.emulator.records import BatchRecord, FileInfo, FileKind, FileRecord, new_id
from airflow_provider_llmbatch.emulator.results import write_results
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.vendors import CompletionWindowRule, VendorSpec

_COUNTERS = ("files_uploaded", "batches_created", "cancels", "downloads", "files_deleted", "requests")


@dataclass
class VendorState:
    """
    One vendor's files, batches and counters.

    :param spec: the vendor.
    :param root: the directory holding its files.
    """

    spec: VendorSpec
    root: Path
    files: dict[str, FileRecord] = field(default_factory=dict)
    batches: dict[str, BatchRecord] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    rate_limited: set[str] = field(default_factory=set)
    """The custom ids that have failed once, rate limited (see ``transient_custom_id_pattern``)."""


def create_flag(spec: VendorSpec, extra: dict[str, Any], name: str) -> bool:
    """Return a boolean vendor-only create field: as sent, else the vendor's default, else False."""
    declared = next((f for f in spec.extra_create_fields if f.name == name), None)
    if declared is None:
        return False
    value = extra.get(name, dialect_of(spec).create_field_defaults.get(name))
    return bool(value)


class Store:
    """
    Every vendor's state, guarded by one lock (calls come from the server's threads and from tests).

    :param config: the emulator's settings.
    :param clock: the time source.
    :param root: the directory the store owns; emptied on reset.
    """

    def __init__(self, config: EmulatorConfig, clock: Clock, root: Path) -> None:
        self.config = config
        self.clock = clock
        self.root = root
        self.lock = threading.RLock()
        self.fail_pattern = re.compile(config.fail_custom_id_pattern)
        self.transient_pattern = re.compile(config.transient_custom_id_pattern)
        self._seq = 0
        self._vendors: dict[str, VendorState] = {}
        self.reset()

    def reset(self) -> None:
        """Drop every file, batch and counter."""
        with self.lock:
            for state in self._vendors.values():
                shutil.rmtree(state.root, ignore_errors=True)
            self._vendors = {}
            for name, spec in self.config.vendors.items():
                directory = self.root / name
                directory.mkdir(parents=True, exist_ok=True)
                self._vendors[name] = VendorState(spec, directory)

    def fails_once(self, vendor: str, custom_id: str) -> bool:
        """Return whether a request fails now, rate limited: the first time its id matches the pattern."""
        if not self.transient_pattern.search(custom_id):
            return False
        with self.lock:
            seen = self.vendor(vendor).rate_limited
            first = custom_id not in seen
            seen.add(custom_id)
            return first

    def vendor(self, name: str) -> VendorState:
        """Return a vendor's state; raise KeyError for a vendor not served."""
        try:
            return self._vendors[name]
        except KeyError:
            raise KeyError(f"unknown vendor {name!r}; served: {', '.join(self._vendors)}") from None

    def vendor_names(self) -> list[str]:
        """Return the vendors served."""
        return list(self._vendors)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def new_path(self, vendor: str, suffix: str = ".part") -> Path:
        """Return a fresh path in the vendor's directory."""
        return self.vendor(vendor).root / f"{new_id('')}{suffix}"

    def count(self, vendor: str, key: str, operation: str | None = None) -> None:
        """Bump a counter (and an operation counter) of a vendor."""
        with self.lock:
            state = self.vendor(vendor)
            state.counters[key] += 1
            if operation:
                state.operations[operation] += 1

    # files

    def add_file(
        self,
        vendor: str,
        path: Path,
        *,
        filename: str,
        purpose: str,
        kind: FileKind,
        info: FileInfo | None = None,
        file_id: str | None = None,
        created_at: float | None = None,
    ) -> FileRecord:
        """Register a file whose content is already at ``path``."""
        with self.lock:
            record = FileRecord(
                id=file_id or new_id("file-"),
                filename=filename,
                purpose=purpose,
                bytes=path.stat().st_size,
                created_at=self.clock() if created_at is None else created_at,
                path=path,
                kind=kind,
                seq=self._next_seq(),
                info=info,
            )
            self.vendor(vendor).files[record.id] = record
            return record

    def get_file(self, vendor: str, file_id: str) -> FileRecord | None:
        """Return a file, or None."""
        with self.lock:
            return self.vendor(vendor).files.get(file_id)

    def list_files(self, vendor: str) -> list[FileRecord]:
        """Return a vendor's files, newest first."""
        with self.lock:
            return sorted(self.vendor(vendor).files.values(), key=lambda f: f.seq, reverse=True)

    def delete_file(self, vendor: str, file_id: str) -> bool:
        """Delete a file; its content stays on disk while a running batch still reads it."""
        with self.lock:
            record = self.vendor(vendor).files.pop(file_id, None)
            if record is None:
                return False
            self._release(vendor, record.path)
            return True

    def _release(self, vendor: str, path: Path) -> None:
        state = self.vendor(vendor)
        in_use = any(f.path == path for f in state.files.values()) or any(
            b.input_path == path and not b.results_written for b in state.batches.values()
        )
        if not in_use:
            path.unlink(missing_ok=True)

    # batches

    def create_batch(
        self,
        vendor: str,
        *,
        endpoint: str,
        input_file: FileRecord,
        completion_window: str | None,
        metadata: dict[str, str] | None,
        extra: dict[str, Any],
        info: FileInfo,
    ) -> BatchRecord:
        """Create a batch in ``validating``."""
        with self.lock:
            state = self.vendor(vendor)
            rule = state.spec.completion_window
            window = dialect_of(state.spec).completion_window_echo or completion_window or rule.default
            hours = CompletionWindowRule.hours(window) or 24
            now = self.clock()
            outcome = (metadata or {}).get(machine.OUTCOME_KEY)
            batch = BatchRecord(
                id=new_id("batch_"),
                endpoint=endpoint,
                input_file_id=input_file.id,
                input_path=input_file.path,
                completion_window=completion_window,
                metadata=metadata,
                extra=extra,
                created_at=now,
                expires_at=now + self.config.scaled(hours * self.config.window_seconds_per_hour),
                seq=self._next_seq(),
                info=info,
                outcome=outcome if outcome in machine.OUTCOMES else None,
            )
            machine.enter(batch, "validating", now)
            batch.times.pop("validating_at", None)
            state.batches[batch.id] = batch
            state.counters["batches_created"] += 1
            return batch

    def get_batch(self, vendor: str, batch_id: str) -> BatchRecord | None:
        """Return a batch brought up to date, or None."""
        with self.lock:
            batch = self.vendor(vendor).batches.get(batch_id)
            if batch is not None:
                machine.advance(batch, self.clock(), self.config, self._finisher(vendor))
            return batch

    def list_batches(self, vendor: str) -> list[BatchRecord]:
        """Return a vendor's batches brought up to date, newest first."""
        with self.lock:
            now = self.clock()
            finish = self._finisher(vendor)
            batches = sorted(self.vendor(vendor).batches.values(), key=lambda b: b.seq, reverse=True)
            for batch in batches:
                machine.advance(batch, now, self.config, finish)
            return batches

    def cancel_batch(self, vendor: str, batch_id: str) -> tuple[BatchRecord | None, bool]:
        """Request a cancel; return the batch (None if unknown) and whether the cancel was accepted."""
        with self.lock:
            batch = self.vendor(vendor).batches.get(batch_id)
            if batch is None:
                return None, False
            now, finish = self.clock(), self._finisher(vendor)
            machine.advance(batch, now, self.config, finish)
            starts = batch.status in machine.CANCELLABLE
            accepted = machine.request_cancel(batch, now, self.config, finish)
            if starts:
                self.vendor(vendor).counters["cancels"] += 1
            return batch, accepted

    def force_status(self, vendor: str, batch_id: str, status: str, *, hold: bool = True) -> BatchRecord:
        """Put a batch in ``status`` now; raise KeyError for an unknown batch, ValueError for a bad status."""
        with self.lock:
            batch = self.vendor(vendor).batches.get(batch_id)
            if batch is None:
                raise KeyError(f"no batch {batch_id!r} at {vendor}")
            machine.force(batch, status, self.clock(), self.config, self._finisher(vendor), hold=hold)
            return batch

    def _finisher(self, vendor: str) -> machine.Finisher:
        def finish(batch: BatchRecord, at: float) -> None:
            self._finish(vendor, batch, at)

        return finish

    def _finish(self, vendor: str, batch: BatchRecord, at: float) -> None:
        if batch.results_written:
            return
        batch.results_written = True
        state = self.vendor(vendor)
        spec = state.spec
        dialect = dialect_of(spec)
        if batch.status != "failed":
            unfinished_code: str | None = None
            if batch.status == "expired":
                unfinished_code = "batch_expired"
            elif batch.status == "cancelled" and dialect.cancel_counts_unfinished_as_failed:
                unfinished_code = "batch_cancelled"
                batch.unfinished_failed = batch.total - batch.processed
            out_path, err_path = self.new_path(vendor, ".jsonl"), self.new_path(vendor, ".jsonl")
            ok, bad = write_results(
                spec,
                batch,
                out_path,
                err_path,
                created=int(at),
                unfinished_code=unfinished_code,
                reply_to=self.config.reply_to,
                invalid_output=self.config.invalid_output,
            )
            if ok:
                batch.output_file_id = self._result_file(vendor, out_path, batch, "output", "file-", at)
            else:
                out_path.unlink()
            if bad:
                prefix = dialect.error_file_id_prefix
                batch.error_file_id = self._result_file(vendor, err_path, batch, "error", prefix, at)
            else:
                err_path.unlink()
        if create_flag(spec, batch.extra, "auto_delete_input_file"):
            state.files.pop(batch.input_file_id, None)
        self._release(vendor, batch.input_path)

    def _result_file(
        self, vendor: str, path: Path, batch: BatchRecord, kind: FileKind, prefix: str, at: float
    ) -> str:
        record = self.add_file(
            vendor,
            path,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose="batch_output",
            kind=kind,
            file_id=new_id(prefix),
            created_at=at,
        )
        return record.id

    def stats(self, vendor: str) -> dict[str, Any]:
        """Return a vendor's counters and current totals."""
        with self.lock:
            state = self.vendor(vendor)
            statuses = Counter(b.status for b in self.list_batches(vendor))
            result: dict[str, Any] = {key: state.counters[key] for key in _COUNTERS}
            result["files"] = len(state.files)
            result["batches"] = len(state.batches)
            result["statuses"] = dict(statuses)
            result["operations"] = dict(state.operations)
            return result
