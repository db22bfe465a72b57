"""
Join a batch's request file with its output and error files into one results file.

The join streams: the output and error files are local files indexed by ``custom_id`` -> byte offset
(never holding bodies), the request file is read one line at a time, and one result row per request
is written as it is produced. Memory grows with the number of ids, not with the bytes of the files.

Each row is ``{"custom_id", "status", "response", "error", "usage"}`` (plus ``"request"`` when asked),
with ``status`` one of ``succeeded``, ``failed``, ``expired``, ``cancelled``, ``missing``. The rows are
written to a temporary name next to the destination and then moved into place, so a crash never leaves
a partial file at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeAlias

from airflow_provider_llmbatch.models import ResultLine

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

Location: TypeAlias = "str | os.PathLike[str] | ObjectStoragePath"
"""A local path, a ``file://`` or object-storage URI, or an ObjectStoragePath."""

RowStatus = Literal["succeeded", "failed", "expired", "cancelled", "missing"]
"""The closed set of result-row statuses."""

ROW_STATUSES: tuple[RowStatus, ...] = ("succeeded", "failed", "expired", "cancelled", "missing")
"""Every row status, in the order counts are reported."""

ANOMALY_KINDS: tuple[str, ...] = (
    "duplicates",
    "unknown_ids",
    "no_custom_id",
    "malformed_lines",
    "duplicate_requests",
)
"""Every anomaly the join counts."""

# What a request without an output or error line became, by the batch's final status.
_MISSING_STATUS: Mapping[str, RowStatus] = {"expired": "expired", "cancelled": "cancelled"}
_MISSING_ERROR: Mapping[RowStatus, tuple[str, str]] = {
    "expired": ("batch_expired", "the batch expired before this request was processed"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request was processed"),
    "missing": ("missing_result", "the vendor returned no output or error line for this request"),
}
# Error codes vendors write for requests that never ran (OpenAI's convention, also the emulator's).
_UNRUN_CODES: Mapping[str, RowStatus] = {"batch_expired": "expired", "batch_cancelled": "cancelled"}
_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_SAMPLES = 5


@dataclass
class JoinReport:
    """
    What a join produced.

    :param result_uri: where the results file was committed.
    :param counts: rows per status, plus ``total`` (the request lines).
    :param usage: token totals over the rows (``prompt_tokens``, ``completion_tokens``, ``total_tokens``).
    :param anomalies: vendor-file oddities: ``duplicates`` (an id repeated in the output/error files;
        the first line is kept), ``unknown_ids`` (ids not in the request file), ``no_custom_id`` (lines
        without an id), ``malformed_lines`` (lines that are not a JSON object), ``duplicate_requests``
        (ids repeated in the request file; each such line still gets a row).
    :param samples: up to five example ids (or ``file@offset``) per anomaly, for logs.
    """

    result_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def reconciled(self) -> bool:
        """Return True when every request line got exactly one row."""
        return sum(self.counts.get(s, 0) for s in ROW_STATUSES) == self.counts.get("total", -1)


class _Anomalies:
    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(ANOMALY_KINDS, 0)
        self.samples: dict[str, list[str]] = {}

    def add(self, kind: str, sample: str) -> None:
        self.counts[kind] += 1
        bucket = self.samples.setdefault(kind, [])
        if len(bucket) < _SAMPLES:
            bucket.append(sample)


@dataclass
class _Entry:
    file: int
    offset: int
    used: bool = False


class _Malformed:
    pass


_MALFORMED = _Malformed()


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


def _loads(raw: bytes) -> Any:
    """Parse a vendor line strictly: NaN, Infinity and overflowing numbers cannot be written back as JSON."""
    return json.loads(raw, parse_constant=_not_json, parse_float=_finite)


def _custom_id_of(raw: bytes) -> str | _Malformed | None:
    try:
        data = _loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser allows, a malformed line like any other.
        return _MALFORMED
    if not isinstance(data, dict):
        return _MALFORMED
    value = data.get("custom_id")
    if value is None or value == "" or isinstance(value, dict | list):
        return None
    return str(value)


def _index(files: Sequence[Path], anomalies: _Anomalies) -> dict[str, _Entry]:
    """Map each custom_id to the first line that carries it, by file number and byte offset."""
    index: dict[str, _Entry] = {}
    for file_no, path in enumerate(files):
        with open(path, "rb") as handle:
            offset = 0
            for raw in handle:
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                custom_id = _custom_id_of(raw)
                if isinstance(custom_id, _Malformed):
                    anomalies.add("malformed_lines", f"{path.name}@{start}")
                elif custom_id is None:
                    anomalies.add("no_custom_id", f"{path.name}@{start}")
                elif custom_id in index:
                    anomalies.add("duplicates", custom_id)
                else:
                    index[custom_id] = _Entry(file_no, start)
    return index


def _read_line(handles: Sequence[IO[bytes]], entry: _Entry) -> ResultLine:
    handle = handles[entry.file]
    handle.seek(entry.offset)
    return ResultLine.model_validate(_loads(handle.readline()))


def _as_readable(source: Location) -> str | os.PathLike[str] | ObjectStoragePath:
    """Turn a ``file://`` URI into a path and any other URI into an ObjectStoragePath."""
    if isinstance(source, str) and "://" in source:
        if source.startswith("file://"):
            return source[len("file://") :]
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(source)
    return source


def _open_read(source: Location) -> IO[bytes]:
    readable = _as_readable(source)
    if isinstance(readable, str | os.PathLike):
        return open(readable, "rb")
    opened: IO[bytes] = readable.open("rb")  # type: ignore[no-untyped-call]
    return opened


def _iter_requests(source: Location) -> Iterator[tuple[str, dict[str, Any] | None]]:
    with _open_read(source) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError):
                data = None
            if not isinstance(data, dict) or data.get("custom_id") in (None, ""):
                # Request files are validated before upload; a line without an id means the file
                # changed since, and no row could be placed for it.
                raise ValueError(f"{source}: line {line_no}: custom_id: expected a request line with an id")
            body = data.get("body")
            yield str(data["custom_id"]), body if isinstance(body, dict) else None


def _row(
    custom_id: str,
    line: ResultLine | None,
    missing_status: RowStatus,
    request_body: dict[str, Any] | None,
    include_request: bool,
) -> tuple[RowStatus, dict[str, Any]]:
    status: RowStatus
    row: dict[str, Any]
    if line is None:
        status = missing_status
        code, message = _MISSING_ERROR[status]
        row = {
            "custom_id": custom_id,
            "status": status,
            "response": None,
            "error": {"code": code, "message": message},
            "usage": {},
        }
    else:
        status = "succeeded" if line.succeeded else "failed"
        error = None
        if status == "failed":
            error = {"code": line.error_code, "message": line.error_message or "request failed"}
            unrun = _UNRUN_CODES.get(line.error_code or "")
            if line.response is None and unrun is not None:
                status = unrun
        row = {
            "custom_id": custom_id,
            "status": status,
            "response": line.response.body if line.response is not None else None,
            "error": error,
            "usage": line.usage,
        }
    if include_request:
        row["request"] = request_body
    return status, row


def _add_usage(totals: dict[str, int], usage: Mapping[str, int]) -> None:
    # The responses endpoint names them input/output tokens; chat and embeddings prompt/completion.
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    totals["prompt_tokens"] += prompt
    totals["completion_tokens"] += completion
    totals["total_tokens"] += usage.get("total_tokens", prompt + completion)


def _local_path(destination: Location) -> Path | None:
    """Return the local filesystem path of a location, or None if it is remote."""
    if isinstance(destination, str | os.PathLike):
        text = os.fspath(destination)
        if "://" not in text:
            return Path(text)
        if text.startswith("file://"):
            return Path(text[len("file://") :])
        return None
    if destination.protocol in ("file", "local", ""):
        return Path(destination.path)
    return None


def _temp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


@contextlib.contextmanager
def atomic_writer(destination: Location) -> Iterator[IO[bytes]]:
    """
    Open a binary writer whose bytes appear at ``destination`` only when the block succeeds.

    A local destination is written to a hidden sibling and committed with ``os.replace``; an object
    storage destination is written to a sibling key and renamed (a copy and delete on stores that have
    no rename). On error the temporary is removed and nothing new is left at ``destination``.

    :param destination: a local path, a ``file://`` URI, an object-storage URI or an ObjectStoragePath.
    """
    local = _local_path(destination)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(_temp_name(local.name))
        try:
            with open(tmp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return
    readable = _as_readable(destination)
    if isinstance(readable, str | os.PathLike):  # pragma: no cover - local paths are handled above
        raise TypeError(f"not an object storage location: {destination!r}")
    remote_tmp = readable.parent / _temp_name(readable.name)
    try:
        with remote_tmp.open("wb") as handle:  # type: ignore[no-untyped-call]
            yield handle
        remote_tmp.rename(readable)
    finally:
        with contextlib.suppress(Exception):
            if remote_tmp.exists():
                remote_tmp.unlink()


def result_uri(destination: Location) -> str:
    """Return the URI of a location: ``file:///abs/path`` for local paths, the URI otherwise."""
    local = _local_path(destination)
    if local is not None:
        # Not Path.as_uri(): it percent-encodes run ids (":" and "+"), which object-storage paths keep.
        return f"file://{local.absolute()}"
    return str(destination)


def join_results(
    requests: Location,
    destination: Location,
    *,
    output_file: str | os.PathLike[str] | None = None,
    error_file: str | os.PathLike[str] | None = None,
    batch_status: str | None = None,
    include_request: bool = False,
) -> JoinReport:
    """
    Write one result row per request line, joining the vendor's output and error lines by custom_id.

    :param requests: the request file the batch ran; rows come out in its order.
    :param destination: where the results JSONL goes; written to a temporary name, then moved.
    :param output_file: the downloaded output file (local), if the batch has one.
    :param error_file: the downloaded error file (local), if the batch has one.
    :param batch_status: the batch's final status; decides what a request without a line became
        (``expired`` -> expired, ``cancelled`` -> cancelled, anything else -> missing).
    :param include_request: add each request's body to its row as ``request``.
    """
    anomalies = _Anomalies()
    files = [Path(p) for p in (output_file, error_file) if p is not None]
    index = _index(files, anomalies)
    missing_status = _MISSING_STATUS.get(batch_status or "", "missing")
    counts: dict[str, int] = dict.fromkeys((*ROW_STATUSES, "total"), 0)
    usage = dict.fromkeys(_TOKEN_FIELDS, 0)
    seen: set[str] = set()
    with contextlib.ExitStack() as stack:
        handles: list[IO[bytes]] = [stack.enter_context(open(p, "rb")) for p in files]
        out = stack.enter_context(atomic_writer(destination))
        for custom_id, body in _iter_requests(requests):
            if custom_id in seen:
                anomalies.add("duplicate_requests", custom_id)
            seen.add(custom_id)
            entry = index.get(custom_id)
            line = None
            if entry is not None:
                entry.used = True
                line = _read_line(handles, entry)
            status, row = _row(custom_id, line, missing_status, body, include_request)
            counts[status] += 1
            counts["total"] += 1
            _add_usage(usage, row["usage"])
            out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
            out.write(b"\n")
    for custom_id, entry in index.items():
        if not entry.used:
            anomalies.add("unknown_ids", custom_id)
    return JoinReport(
        result_uri=result_uri(destination),
        counts=counts,
        usage=usage,
        anomalies=anomalies.counts,
        samples=anomalies.samples,
    )
