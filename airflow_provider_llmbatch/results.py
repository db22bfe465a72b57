"""
Join a batch's request file with its output and error files into one results file.

The join streams and keeps its working state on disk, so memory stays flat whatever the line count:

1. every output and error line is parsed once, strictly, and turned into its finished row right away;
   the row is stored under its ``custom_id`` in a SQLite index in a temporary directory (the first
   line of an id is kept, later ones are counted as duplicates);
2. the request file is read one line at a time and its ids are appended to the index;
3. one query joins the two in request order, and the rows are written as they come out of it.

Each row is ``{"custom_id", "status", "response", "error", "usage"}`` (plus ``"request"`` when asked),
with ``status`` one of ``succeeded``, ``failed``, ``expired``, ``cancelled``, ``missing``. The rows are
written to a temporary name next to the destination and then moved into place, so a crash never leaves
a partial file at the destination. The index is removed when the join ends, whether it succeeded or not;
it takes about as much disk as the output files (plus the request bodies with ``include_request``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias

from airflow_provider_llmbatch.jsonl_lines import is_utf8
from airflow_provider_llmbatch.models import read_result_line

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

# Lines are stored, requests looked up and rows written in batches of at most this many lines or bytes.
_BATCH_LINES = 512
_BATCH_BYTES = 512 * 1024
# SQLite integers are 64-bit; a larger token count (never a real one) is stored as its digits.
_INT64 = 1 << 63
# A throwaway database: no journal, no fsync, a bounded page cache (KiB), sorts spilled to files.
_PRAGMAS = (
    "PRAGMA journal_mode = OFF",
    "PRAGMA synchronous = OFF",
    "PRAGMA temp_store = FILE",
    "PRAGMA cache_size = -8192",
)
# ``lines``: one row per custom_id of the output and error files, for its first line: the line's place
# among them (``seq``), its status and tokens, and where its finished row is in the spool file.
# ``missing``: the request ids that have no line, to tell a repeated one. Ids are UTF-8 blobs (lone
# surrogates kept); the token columns have no type, so a count beyond 64 bits can be stored as text.
_SCHEMA = """
CREATE TABLE lines (
    id BLOB PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    prompt,
    completion,
    total,
    pos INTEGER NOT NULL,
    size INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE missing (id BLOB PRIMARY KEY) WITHOUT ROWID;
"""
_INSERT_LINES = "INSERT OR IGNORE INTO lines VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_LOOKUP_LINES = "SELECT id, seq, status, prompt, completion, total, pos, size FROM lines WHERE id IN ({})"
_LOOKUP_MISSING = "SELECT id FROM missing WHERE id IN ({})"


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

    def full(self, kind: str) -> bool:
        return len(self.samples.get(kind, ())) >= _SAMPLES


class _ParsedFloat(float):
    """
    A float read from a line.

    msgspec's encoder refuses it, so any value holding a float is written by :mod:`json`, whose float
    text (``1e+16``) the rows have always had; msgspec would write ``1e16``.
    """

    __slots__ = ()


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _finite(text: str) -> float:
    value = _ParsedFloat(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


# Built once (``json.loads`` with hooks builds a new decoder for every call). Vendor lines are read
# strictly; request lines as ``json.loads`` reads them (NaN and Infinity pass).
_STRICT = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)
_LENIENT = json.JSONDecoder(parse_constant=_ParsedFloat, parse_float=_ParsedFloat)
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


class _FastCodec(NamedTuple):
    """msgspec's JSON codec, used where it gives exactly what :mod:`json` gives (see :func:`_loads`)."""

    decode: Callable[[bytes], Any]
    request_id: Callable[[bytes], Any]
    unset: Any
    encode: Callable[[Any], bytes]
    errors: tuple[type[Exception], ...]


def _fast_codec() -> _FastCodec | None:
    """Return msgspec's codec, or None when it is not installed (the standard library then does it all)."""
    try:
        import msgspec
    except ImportError:  # pragma: no cover - msgspec comes with Airflow; json alone gives the same rows
        return None
    request_id = msgspec.defstruct("RequestId", [("custom_id", Any, msgspec.UNSET)])
    return _FastCodec(
        decode=msgspec.json.Decoder(float_hook=_finite).decode,
        request_id=msgspec.json.Decoder(request_id).decode,
        unset=msgspec.UNSET,
        encode=msgspec.json.Encoder().encode,
        errors=(msgspec.MsgspecError, ValueError, TypeError, RecursionError),
    )


_FAST = _fast_codec()
# Lines with fewer brackets than this are nested too shallowly for either parser's recursion limit, so
# msgspec and json agree on them; deeper ones are left to json, whose limit the rules were written for.
_FAST_NESTING = 512


def _shallow(raw: bytes) -> bool:
    # Nesting N levels deep takes 2N bytes of brackets in a line either parser accepts.
    return len(raw) < 2 * _FAST_NESTING or raw.count(b"[") + raw.count(b"{") < _FAST_NESTING


def _parse(raw: bytes, decoder: json.JSONDecoder) -> Any:
    """Parse one line exactly as ``json.loads(raw)`` does, with the decoder's hooks."""
    return decoder.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def _loads(raw: bytes) -> Any:
    """
    Parse a vendor line strictly: NaN, Infinity and overflowing numbers cannot be written back as JSON.

    msgspec reads the line when it can; it refuses everything :mod:`json` refuses here (and a few lines
    json takes: a BOM, UTF-16, lone surrogates), and each line it refuses is read again by json, so a
    line reads the same either way. Floats come back as :class:`_ParsedFloat`.
    """
    if _FAST is not None and _shallow(raw):
        try:
            return _FAST.decode(raw)
        except _FAST.errors:
            pass
    return _parse(raw, _STRICT)


def _dumps(value: Any) -> bytes:
    """
    Serialize compactly, non-ASCII as UTF-8: ``json.dumps(value, ensure_ascii=False, separators=...)``.

    msgspec writes the same bytes for everything but floats, which it refuses as :class:`_ParsedFloat`
    (as it refuses lone surrogates); those values are written by json.
    """
    if _FAST is not None:
        try:
            return _FAST.encode(value)
        except (TypeError, ValueError):
            pass
    return _utf8(_ENCODE(value))


def _utf8(text: str) -> bytes:
    """Encode JSON text; a lone surrogate (legal in a JSON string escape) is written back as its escape."""
    return text.encode("utf-8", "backslashreplace")


def _key(custom_id: str) -> bytes:
    return custom_id.encode("utf-8", "surrogatepass")


def _id_of(key: bytes) -> str:
    return key.decode("utf-8", "surrogatepass")


def _stored_int(value: int) -> int | str:
    return value if -_INT64 <= value < _INT64 else str(value)


def _finish(data: Mapping[str, Any]) -> tuple[RowStatus, int | str, int | str, int | str, bytes]:
    """
    Turn one parsed output or error line into its result row, all but the custom_id (the request's).

    :param data: the parsed line.
    :return: the row's status; its prompt, completion and total tokens (as stored); and the row's
        ``status``, ``response``, ``error`` and ``usage`` members as JSON.
    """
    line = read_result_line(data)
    status: RowStatus = "succeeded"
    error: dict[str, str | None] | None = None
    if not line.succeeded:
        status = "failed"
        error = {"code": line.error_code, "message": line.error_message or "request failed"}
        if not line.has_response:
            # A line without a response for a request that never ran carries the batch's outcome.
            status = _UNRUN_CODES.get(line.error_code or "", "failed")
    usage = line.usage
    # The responses endpoint names them input/output tokens; chat and embeddings prompt/completion.
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    total = usage.get("total_tokens", prompt + completion)
    members = _dumps({"status": status, "response": line.body, "error": error, "usage": usage})[1:-1]
    return status, _stored_int(prompt), _stored_int(completion), _stored_int(total), members


def _missing_fragment(status: RowStatus) -> bytes:
    code, message = _MISSING_ERROR[status]
    error = {"code": code, "message": message}
    return _utf8(_ENCODE({"status": status, "response": None, "error": error, "usage": {}})[1:-1])


def _finished_lines(path: Path, anomalies: _Anomalies) -> Iterator[tuple[Any, ...]]:
    """
    Yield each line of an output or error file that has a custom_id, finished (see :func:`_finish`).

    Lines without an id and malformed lines (not a JSON object, not strict JSON, nested deeper than
    the parser allows) are counted, with ``file@offset`` samples.

    :return: tuples of the id as stored, then what :func:`_finish` returns.
    """
    with open(path, "rb") as handle:
        offset = 0
        for raw in handle:
            start, offset = offset, offset + len(raw)
            if raw.isspace():
                continue
            try:
                data = _loads(raw)
                if type(data) is not dict:
                    raise ValueError("not a JSON object")
                value = data.get("custom_id")
                if value is None or value == "" or isinstance(value, dict | list):
                    anomalies.add("no_custom_id", f"{path.name}@{start}")
                    continue
                finished = _finish(data)
            except (ValueError, RecursionError):
                # RecursionError: nesting deeper than the parser allows, a malformed line like any other.
                anomalies.add("malformed_lines", f"{path.name}@{start}")
                continue
            yield (_key(str(value)), *finished)


class _Index:
    """
    The join's working state on disk, in a temporary directory: the SQLite index and the spool file.

    The spool holds every finished row (less its custom_id) in the order of the lines; the index maps
    each custom_id to its first line. In memory there is one byte per line (was it used?), a batch
    of lines or requests at a time, and SQLite's page cache.
    """

    def __init__(self, directory: str) -> None:
        self.db = sqlite3.connect(os.path.join(directory, "index.sqlite"), isolation_level=None)
        for pragma in _PRAGMAS:
            self.db.execute(pragma)
        self.db.executescript(_SCHEMA)
        # One transaction for the whole join: nothing is ever committed, the file is thrown away.
        self.db.execute("BEGIN")
        self.spool_path = os.path.join(directory, "rows.spool")
        self.lines = 0
        self.stored = 0
        self.used = bytearray()

    def close(self) -> None:
        self.db.close()

    def add_lines(self, files: Sequence[Path], anomalies: _Anomalies) -> None:
        """Parse every output and error line once; spool its finished row and index its custom_id."""
        batch: list[tuple[Any, ...]] = []
        rows: list[bytes] = []
        pos = spooled = 0
        with open(self.spool_path, "wb") as spool:
            for path in files:
                for key, status, prompt, completion, total, members in _finished_lines(path, anomalies):
                    self.lines += 1
                    rows.append(members)
                    size = len(members)
                    batch.append((key, self.lines, status, prompt, completion, total, pos, size))
                    pos += size
                    if len(batch) >= _BATCH_LINES or pos - spooled >= _BATCH_BYTES:
                        spool.write(b"".join(rows))
                        self._store(batch, anomalies)
                        batch, rows, spooled = [], [], pos
            spool.write(b"".join(rows))
            self._store(batch, anomalies)
        self.used = bytearray(self.lines + 1)

    def _store(self, batch: list[tuple[Any, ...]], anomalies: _Anomalies) -> None:
        """Index a batch of lines; an id already indexed keeps its first line."""
        if not batch:
            return
        added = self.db.executemany(_INSERT_LINES, batch).rowcount
        self.stored += added
        duplicates = len(batch) - added
        if not duplicates:
            return
        if anomalies.full("duplicates"):
            anomalies.counts["duplicates"] += duplicates
            return
        # Name the lines that lost: their id is indexed under another (earlier) line.
        for key, seq, *_ in batch:
            if self.db.execute("SELECT seq FROM lines WHERE id = ?", (key,)).fetchone() != (seq,):
                anomalies.add("duplicates", _id_of(key))

    def write_rows(
        self,
        requests: Location,
        out: IO[bytes],
        *,
        missing_status: RowStatus,
        include_request: bool,
        anomalies: _Anomalies,
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Write one row per request line, in request order; return the counts and the token totals."""
        writer = _RowWriter(self, out, missing_status, anomalies)
        batch: list[tuple[bytes, bytes | None, bytes | None]] = []
        size = 0
        with open(self.spool_path, "rb") as spool:
            writer.spool = spool
            for custom_id, body in _iter_requests(requests, with_body=include_request):
                label = encode_basestring(custom_id)
                request = _dumps(body) if include_request else None
                plain = custom_id.isascii() and len(label) == len(custom_id) + 2
                batch.append((_key(custom_id), None if plain else _utf8(label), request))
                size += len(request) if request is not None else 0
                if len(batch) >= _BATCH_LINES or size >= _BATCH_BYTES:
                    writer.write(batch)
                    batch, size = [], 0
            writer.write(batch)
            writer.flush()
        return writer.counts, writer.usage()

    def count_unknown(self, anomalies: _Anomalies) -> None:
        """Count the ids of the output and error files that no request line has, in order of appearance."""
        used = self.used
        if self.stored == used.count(1):
            return
        for key, seq in self.db.execute("SELECT id, seq FROM lines ORDER BY seq"):
            if not used[seq]:
                anomalies.add("unknown_ids", _id_of(key))


class _RowWriter:
    """Write the rows of batches of requests: look their ids up, read their rows from the spool."""

    def __init__(
        self, index: _Index, out: IO[bytes], missing_status: RowStatus, anomalies: _Anomalies
    ) -> None:
        self.index = index
        self.out = out
        self.spool: IO[bytes] | None = None
        self.missing_status = missing_status
        self.missing = _missing_fragment(missing_status)
        self.anomalies = anomalies
        self.counts: dict[str, int] = dict.fromkeys((*ROW_STATUSES, "total"), 0)
        self.tokens = [0, 0, 0]
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.at = 0

    def write(self, batch: list[tuple[bytes, bytes | None, bytes | None]]) -> None:
        """Write the rows of a batch of requests: (key, JSON of the id or None, JSON of the body or None)."""
        if not batch:
            return
        db, used, spool = self.index.db, self.index.used, self.spool
        assert spool is not None
        keys = list(dict.fromkeys(key for key, _, _ in batch))
        marks = ",".join("?" * len(keys))
        found = {row[0]: row for row in db.execute(_LOOKUP_LINES.format(marks), keys)}
        absent = [key for key in keys if key not in found]
        seen: set[bytes] = set()
        if absent:
            marks = ",".join("?" * len(absent))
            seen.update(k for (k,) in db.execute(_LOOKUP_MISSING.format(marks), absent))
            db.executemany("INSERT OR IGNORE INTO missing VALUES (?)", [(k,) for k in absent])
        counts, tokens, pending = self.counts, self.tokens, self.pending
        for key, label, request in batch:
            line = found.get(key)
            if line is None:
                status, fragment = self.missing_status, self.missing
                if key in seen:
                    self.anomalies.add("duplicate_requests", _id_of(key))
                seen.add(key)
            else:
                _, seq, status, prompt, completion, total, pos, size = line
                if used[seq]:
                    self.anomalies.add("duplicate_requests", _id_of(key))
                used[seq] = 1
                tokens[0] += int(prompt)
                tokens[1] += int(completion)
                tokens[2] += int(total)
                if pos != self.at:
                    spool.seek(pos)
                fragment = spool.read(size)
                self.at = pos + size
            counts[status] += 1
            row = _row(label if label is not None else b'"' + key + b'"', fragment, request)
            pending.append(row)
            self.pending_bytes += len(row)
            if self.pending_bytes >= _BATCH_BYTES:
                self.flush()

    def flush(self) -> None:
        self.out.write(b"".join(self.pending))
        self.pending.clear()
        self.pending_bytes = 0

    def usage(self) -> dict[str, int]:
        self.counts["total"] = sum(self.counts[s] for s in ROW_STATUSES)
        return dict(zip(_TOKEN_FIELDS, self.tokens, strict=True))


@contextlib.contextmanager
def _open_index() -> Iterator[_Index]:
    """Yield an empty index in a new temporary directory; the directory is removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="llmbatch-join-") as directory:
        index = _Index(directory)
        try:
            yield index
        finally:
            index.close()


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


def _fast_request(raw: bytes, with_body: bool) -> tuple[str, dict[str, Any] | None] | None:
    """
    Read a request line's id (and body) with msgspec; None when json must decide.

    Without the body, only the id is built: the rest is checked for syntax but skipped, and a skipped
    part is not checked for what json would refuse in it, invalid UTF-8 and integers too long to read
    (``sys.get_int_max_str_digits``), so such lines are read in full instead.
    """
    assert _FAST is not None
    limit = sys.get_int_max_str_digits()
    try:
        if not with_body and (not limit or len(raw) <= limit) and (raw.isascii() or is_utf8(raw)):
            custom_id, body = _FAST.request_id(raw).custom_id, None
        else:
            data = _FAST.decode(raw)
            if type(data) is not dict:
                return None
            custom_id, body = data.get("custom_id"), data.get("body")
    except _FAST.errors:
        return None
    if custom_id is None or custom_id is _FAST.unset or custom_id == "":
        return None
    return str(custom_id), body if type(body) is dict else None


def _iter_requests(source: Location, with_body: bool = True) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """
    Yield each request line's custom_id and body (a dict, or None), as ``json.loads`` reads the line.

    :param source: the request file.
    :param with_body: read the bodies too; without, None stands for every body.
    """
    fast = _FAST is not None
    with _open_read(source) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.isspace():
                continue
            request = _fast_request(raw, with_body) if fast and _shallow(raw) else None
            if request is not None:
                yield request
                continue
            try:
                data = _parse(raw, _LENIENT)
            except (ValueError, RecursionError):
                data = None
            if not isinstance(data, dict) or data.get("custom_id") in (None, ""):
                # Request files are validated before upload; a line without an id means the file
                # changed since, and no row could be placed for it.
                raise ValueError(f"{source}: line {line_no}: custom_id: expected a request line with an id")
            body = data.get("body") if with_body else None
            yield str(data["custom_id"]), body if isinstance(body, dict) else None


def _row(label: bytes, fragment: bytes, request: bytes | None) -> bytes:
    """
    Return one results line: the request's id, the finished members of its row, and its body if asked.

    :param label: the custom_id as JSON.
    :param fragment: the row's ``status``, ``response``, ``error`` and ``usage`` members as JSON.
    :param request: the request body as JSON, or None to leave ``request`` out.
    """
    if request is None:
        return b'{"custom_id":' + label + b"," + fragment + b"}\n"
    return b'{"custom_id":' + label + b"," + fragment + b',"request":' + request + b"}\n"


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

    Memory stays flat: the lines are indexed in a temporary SQLite database (removed when the join
    ends, on error too), and rows are written as the request-ordered join produces them.

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
    missing_status = _MISSING_STATUS.get(batch_status or "", "missing")
    with _open_index() as index:
        index.add_lines(files, anomalies)
        with atomic_writer(destination) as out:
            counts, usage = index.write_rows(
                requests,
                out,
                missing_status=missing_status,
                include_request=include_request,
                anomalies=anomalies,
            )
        index.count_unknown(anomalies)
    return JoinReport(
        result_uri=result_uri(destination),
        counts=counts,
        usage=usage,
        anomalies=anomalies.counts,
        samples=anomalies.samples,
    )
