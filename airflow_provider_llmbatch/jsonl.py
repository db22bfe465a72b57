"""
Streaming tools for batch request files (JSONL): validate, build, iterate, fingerprint, split.

Every function reads or writes one line at a time, so memory does not grow with the file. The rules
come from the vendor's :class:`~airflow_provider_llmbatch.vendors.VendorSpec` (limits, endpoints,
forbidden body keys); the line scanner and the per-line checks live in
:mod:`airflow_provider_llmbatch.jsonl_lines`.

A ``source`` is a local path (``str`` or ``os.PathLike``), a URI such as ``s3://bucket/key.jsonl``,
an ``ObjectStoragePath`` (anything with ``.open("rb")``), or a binary file object (left open).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TypeAlias, overload

from pydantic import ValidationError

from airflow_provider_llmbatch import jsonl_lines as core
from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.models import RequestLine
from airflow_provider_llmbatch.vendors import EndpointSpec, VendorSpec

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

__all__ = [
    "RequestFileCheck",
    "RequestFileReport",
    "RequestSource",
    "build_request_file",
    "fingerprint",
    "iter_request_lines",
    "split_request_file",
    "validate_request_file",
]

RequestSource: TypeAlias = "str | os.PathLike[str] | ObjectStoragePath | BinaryIO"
"""Where a request file is read from."""

RequestDestination: TypeAlias = "str | os.PathLike[str] | ObjectStoragePath"
"""Where a request file is written to."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RequestFileReport:
    """
    What a valid request file holds.

    :param source: the file's name or URI.
    :param vendor: the vendor's registry name.
    :param endpoint: the batch endpoint every line names.
    :param lines: the number of requests.
    :param bytes: the file's size in bytes.
    :param model: the one model of the file.
    :param sha256: the SHA-256 of the file's bytes (hex), the same as :func:`fingerprint`.
    """

    source: str
    vendor: str
    endpoint: str
    lines: int
    bytes: int
    model: str | None
    sha256: str

    @property
    def custom_ids_sha256(self) -> str:
        """Return the fingerprint of the input (an alias of ``sha256``)."""
        return self.sha256

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON primitives, small enough for XCom."""
        return {
            "source": self.source,
            "vendor": self.vendor,
            "endpoint": self.endpoint,
            "lines": self.lines,
            "bytes": self.bytes,
            "model": self.model,
            "sha256": self.sha256,
        }


def _is_uri(text: str) -> bool:
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1


def _object_path(uri: str) -> ObjectStoragePath:
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(uri)


def _label(source: object) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(source)
    if hasattr(source, "open"):
        return str(source)
    return str(getattr(source, "name", None) or "<stream>")


def _file_name(source: object) -> str | None:
    """Return the name whose extension matters, or None for an anonymous file object."""
    if isinstance(source, str | os.PathLike):
        return os.path.basename(_label(source).rstrip("/"))
    if hasattr(source, "open"):
        return str(getattr(source, "name", "")) or None
    return None


@contextmanager
def _open_read(source: RequestSource) -> Iterator[IO[bytes]]:
    """Open a source for binary reading; a file object given by the caller is left open."""
    if isinstance(source, str | os.PathLike):
        path = _label(source)
        handle: IO[bytes] = (
            _object_path(path).open("rb")  # type: ignore[no-untyped-call]
            if _is_uri(path)
            else open(path, "rb")  # noqa: SIM115 - closed below
        )
    elif hasattr(source, "open"):
        handle = source.open("rb")
    elif hasattr(source, "readline"):
        yield source
        return
    else:
        raise InvalidInputError(f"cannot read a request file from {type(source).__name__}")
    with handle:
        yield handle


class RequestFileCheck:
    """
    Check a request file as its bytes pass by, with the rules and messages of ``validate_request_file``.

    It is the engine of :func:`validate_request_file`, in a form that is fed: an upload with
    ``BatchHook.upload_file(..., check=...)`` feeds it each chunk before sending that chunk, so the file
    is read once for both. :meth:`begin` starts a pass (again for a repeated upload), :meth:`feed` takes
    the next bytes and tells whether the file can still pass, :meth:`finish` runs the end-of-file checks
    and returns the report (kept as :attr:`report`).

    :param vendor: the vendor's spec, or its registry name.
    :param endpoint: the batch endpoint (default: the vendor's first).
    :param max_problems: how many problems to list; further ones are counted.
    :raises InvalidInputError: when the endpoint is not one of the vendor's.
    """

    def __init__(
        self, vendor: VendorSpec | str, endpoint: str | None = None, *, max_problems: int = 20
    ) -> None:
        self.spec = core.resolve_vendor(vendor)
        self.endpoint = core.resolve_endpoint(self.spec, endpoint)
        self.max_problems = max_problems
        self.report: RequestFileReport | None = None
        """The report of the last pass that passed; None before, and while a pass runs."""
        self._checker: core.RequestChecker | None = None
        self._lines: core.LineFeed | None = None
        self._label = ""

    def begin(self, source: object) -> None:
        """
        Start a pass over ``source``, dropping any unfinished one.

        :param source: what the bytes come from: its name is checked (``.jsonl``; a file object without
            a name is not) and names the file in problems.
        """
        self.close()
        self.report = None
        checker = core.RequestChecker(
            self.spec, self.endpoint, _file_name(source), max_problems=self.max_problems
        )
        self._checker = checker
        self._lines = core.LineFeed(checker.max_line_bytes, core.Tally(), checker.line)
        self._label = _label(source)

    def feed(self, chunk: bytes) -> bool:
        """
        Check the lines ``chunk`` completes (the unfinished last one waits for the next chunk).

        :param chunk: the next bytes of the file.
        :return: False once the file cannot pass any more (a problem, or over a request or size limit).
        """
        lines, checker = self._lines, self._checker
        if lines is None or checker is None:
            raise RuntimeError("begin() a pass before feeding it")
        lines.feed(chunk)
        return not (
            checker.failed
            or checker.requests > checker.max_requests
            or lines.tally.bytes > checker.max_file_bytes
        )

    def finish(self) -> RequestFileReport:
        """
        End the pass: check the last line and the whole file.

        :return: the report (also kept as :attr:`report`).
        :raises InvalidRequestFileError: listing every problem found (``line N: field: expected ...``).
        """
        lines, checker = self._lines, self._checker
        if lines is None or checker is None:
            raise RuntimeError("begin() a pass before finishing it")
        self._lines = self._checker = None
        lines.end()
        tally = lines.tally
        checker.finish(tally.bytes, self._label)
        self.report = RequestFileReport(
            source=self._label,
            vendor=self.spec.name,
            endpoint=self.endpoint.path,
            lines=checker.requests,
            bytes=tally.bytes,
            model=checker.model,
            sha256=tally.hexdigest(),
        )
        return self.report

    def close(self) -> None:
        """Drop an unfinished pass (and stop its hashing thread); a finished one needs no closing."""
        lines, self._lines, self._checker = self._lines, None, None
        if lines is not None:
            lines.tally.close()


def validate_request_file(
    source: RequestSource,
    vendor: VendorSpec | str,
    endpoint: str | None = None,
    *,
    max_problems: int = 20,
) -> RequestFileReport:
    """
    Check a request file against a vendor's rules in one streaming pass, and describe it.

    Checks the name (``.jsonl``), UTF-8 without a BOM, one JSON object per line (strict JSON: no
    NaN/Infinity), no blank lines between requests (a final newline is fine, CRLF too), the keys
    ``custom_id`` (a unique non-empty string), ``method`` (``POST``), ``url`` (the batch endpoint)
    and ``body`` (an object with a string ``model``, the same on every line, and none of the
    vendor's forbidden keys), the endpoint's required model, and the request, file-size and
    line-size limits of the vendor and the endpoint. An upload can run the same checks as it
    streams (see :class:`RequestFileCheck`).

    :param source: the request file.
    :param vendor: the vendor's spec, or its registry name.
    :param endpoint: the batch endpoint (default: the vendor's first).
    :param max_problems: how many problems to list; further ones are counted.
    :raises InvalidInputError: when the endpoint is not one of the vendor's.
    :raises InvalidRequestFileError: listing every problem found (``line N: field: expected ..., got ...``).
    """
    check = RequestFileCheck(vendor, endpoint, max_problems=max_problems)
    check.begin(source)
    try:
        size = core.chunk_bytes()
        feed = check.feed
        with _open_read(source) as handle:
            read = handle.read
            while chunk := read(size):
                feed(chunk)
        return check.finish()
    finally:
        check.close()


def fingerprint(source: RequestSource) -> str:
    """Return the SHA-256 (hex) of a file's bytes, read in chunks."""
    sha = hashlib.sha256()
    with _open_read(source) as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def iter_request_lines(source: RequestSource) -> Iterator[RequestLine]:
    """
    Yield the requests of a file one at a time.

    Reading is lenient where nothing is lost (a BOM and blank lines are skipped); a line that is not a
    request raises :class:`InvalidRequestFileError` naming it. Use :func:`validate_request_file` to
    check a file against a vendor's rules.
    """
    label = _label(source)
    with _open_read(source) as handle:
        for lineno, raw in enumerate(iter(handle.readline, b""), start=1):
            line = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            if not line.strip():
                continue
            try:
                obj = core.loads(line)
            except core.CODEC_ERRORS as exc:
                field, expected, got = core.diagnose_unparsable(line, exc)
                problem = f"line {lineno}: {field}: expected {expected}, got {got}"
                raise InvalidRequestFileError(label, [problem]) from None
            try:
                request = RequestLine.model_validate(obj)
            except ValidationError as exc:
                problems = [
                    f"line {lineno}: {'.'.join(map(str, e['loc'])) or 'json'}: "
                    f"expected {e['msg'].lower()}, got {core.show(e['input'])}"
                    for e in exc.errors()
                ]
                raise InvalidRequestFileError(label, problems) from None
            yield request


def _body_for(record: Mapping[str, Any], kind: str, system: str | None) -> dict[str, Any] | str:
    """Return a request body built from a prompt record, or why it cannot be built."""
    system = record.get("system", system)
    if kind in ("chat", "test"):
        messages = record.get("messages")
        if messages is None:
            if "prompt" not in record:
                return "prompt or messages"
            messages = [{"role": "user", "content": record["prompt"]}]
        if system is not None and not any(
            isinstance(m, Mapping) and m.get("role") == "system" for m in messages
        ):
            messages = [{"role": "system", "content": system}, *messages]
        return {"messages": messages}
    if kind == "responses":
        body: dict[str, Any] = {"input": record.get("input", record.get("prompt", record.get("messages")))}
        if body["input"] is None:
            return "input, prompt or messages"
        if system is not None:
            body["instructions"] = system
        return body
    key = "input" if kind == "embeddings" else "prompt"
    if key not in record:
        return key
    return {key: record[key]}


def build_request_file(
    records: Iterable[Mapping[str, Any]],
    destination: RequestDestination,
    vendor: VendorSpec | str,
    endpoint: str | None = None,
    *,
    model: str | None = None,
    custom_id_field: str | None = "custom_id",
    system: str | None = None,
    params: Mapping[str, Any] | None = None,
    max_problems: int = 20,
) -> RequestFileReport:
    """
    Write records as a request file, streaming, and check the result against the vendor's rules.

    A record is one of: a full request line (``custom_id``, ``method``, ``url``, ``body``); ``custom_id``
    and ``body`` (``method`` and ``url`` are filled in); a prompt record for a chat endpoint
    (``prompt`` or ``messages``, optional ``system`` and ``params``); or ``input`` for embeddings. A
    body without ``model`` gets ``model``. The file is checked as it is written, exactly as
    :func:`validate_request_file` would; a local destination appears only once it is complete and
    valid, a remote one is removed again if it is not.

    :param records: the records, consumed once.
    :param destination: a local path, a URI or an ``ObjectStoragePath`` (name ending in ``.jsonl``).
    :param vendor: the vendor's spec, or its registry name.
    :param endpoint: the batch endpoint (default: the vendor's first).
    :param model: the model of every request.
    :param custom_id_field: the record key holding the id; None takes ``custom_id`` when present and
        generates ``request-<n>`` (n from 1) otherwise.
    :param system: a system prompt for prompt records that have none.
    :param params: body fields added to every request built from a prompt record (a record's own
        ``params`` win), e.g. ``{"max_tokens": 512}``.
    :param max_problems: how many problems to list; further ones are counted.
    :raises InvalidRequestFileError: when a record cannot be turned into a valid request line.
    """
    spec = core.resolve_vendor(vendor)
    endpoint_spec = core.resolve_endpoint(spec, endpoint)
    label = _label(destination)
    checker = core.RequestChecker(spec, endpoint_spec, _file_name(destination), max_problems=max_problems)
    tally = core.Tally()
    with _open_write(destination) as handle:
        write, update, dumps = handle.write, tally.update, core.dumps
        for number, record in enumerate(records, start=1):
            line = _request_for(
                record, number, endpoint_spec, checker, model, custom_id_field, system, params
            )
            if line is None:
                checker.skip()
                continue
            try:
                raw = dumps(line)
            except core.CODEC_ERRORS as exc:
                checker.problem(f"record {number}", "body", "JSON-serializable values", f"{exc}")
                checker.skip()
                continue
            checker.line(raw, len(raw))
            raw += b"\n"
            write(raw)
            update(raw)
        checker.finish(tally.bytes, label)
    return RequestFileReport(
        source=label,
        vendor=spec.name,
        endpoint=endpoint_spec.path,
        lines=checker.requests,
        bytes=tally.bytes,
        model=checker.model,
        sha256=tally.hexdigest(),
    )


def _request_for(
    record: Any,
    number: int,
    endpoint: EndpointSpec,
    checker: core.RequestChecker,
    model: str | None,
    custom_id_field: str | None,
    system: str | None,
    params: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """Return the request line for one record, or None after reporting why there is none."""
    where = f"record {number}"
    if not isinstance(record, Mapping):
        checker.problem(where, "record", "a mapping", core.show(record))
        return None
    if custom_id_field is None:
        custom_id = record.get("custom_id") or f"request-{number}"
    else:
        custom_id = record.get(custom_id_field)
        if isinstance(custom_id, int) and not isinstance(custom_id, bool):
            custom_id = str(custom_id)
        if custom_id is None:
            checker.problem(where, custom_id_field, "the request's custom id", "nothing (the key is missing)")
            return None
    if "body" in record:
        body = record["body"]
        if not isinstance(body, Mapping):
            checker.problem(where, "body", "an object", core.show(body))
            return None
        body = dict(body)
    else:
        built = _body_for(record, endpoint.kind, system)
        if isinstance(built, str):
            keys = ", ".join(sorted(map(str, record))) or "none"
            checker.problem(
                where, "record", f"body or {built} for a {endpoint.kind} endpoint", f"the keys {keys}"
            )
            return None
        own = record.get("params") or {}
        if not isinstance(own, Mapping):
            checker.problem(where, "params", "an object of body fields", core.show(own))
            return None
        body = {**(params or {}), **built, **own}
    if model is not None and body.setdefault("model", model) != model:
        checker.problem(where, "body.model", f"{model!r} (the model argument)", core.show(body["model"]))
    return {
        "custom_id": custom_id,
        "method": record.get("method", "POST"),
        "url": record.get("url", endpoint.path),
        "body": body,
    }


def _make_local_folder(folder: Any) -> None:
    """Create a folder on a local file system; object stores have no folders to create."""
    if getattr(folder, "protocol", "file") in ("file", "local", ""):
        folder.mkdir(parents=True, exist_ok=True)


@contextmanager
def _open_write(destination: RequestDestination) -> Iterator[IO[bytes]]:
    """Open a destination for writing; remove what was written if the block raises."""
    if isinstance(destination, str | os.PathLike) and not _is_uri(_label(destination)):
        final = Path(_label(destination))
        final.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so the target never holds a partial or invalid file.
        temp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with temp.open("wb") as handle:
                yield handle
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        return
    target: Any = (
        _object_path(_label(destination)) if isinstance(destination, str | os.PathLike) else destination
    )
    _make_local_folder(target.parent)
    try:
        with target.open("wb") as handle:
            yield handle
    except BaseException:
        # Best effort: the original error is the one worth raising.
        with suppress(Exception):
            target.unlink()
        raise


@overload
def split_request_file(
    source: RequestSource,
    vendor: VendorSpec | str,
    out_dir: str | os.PathLike[str],
    *,
    endpoint: str | None = None,
    max_requests: int | None = None,
    max_bytes: int | None = None,
) -> list[Path]: ...


@overload
def split_request_file(
    source: RequestSource,
    vendor: VendorSpec | str,
    out_dir: ObjectStoragePath,
    *,
    endpoint: str | None = None,
    max_requests: int | None = None,
    max_bytes: int | None = None,
) -> list[ObjectStoragePath]: ...


def split_request_file(
    source: RequestSource,
    vendor: VendorSpec | str,
    out_dir: RequestDestination,
    *,
    endpoint: str | None = None,
    max_requests: int | None = None,
    max_bytes: int | None = None,
) -> list[Path] | list[ObjectStoragePath]:
    """
    Split a request file into parts within the vendor's limits, streaming, never splitting a line.

    Parts are named ``<stem>.part-0001.jsonl`` in ``out_dir``; their concatenation is the original file.

    :param source: the request file.
    :param vendor: the vendor's spec, or its registry name.
    :param out_dir: the folder for the parts (created if missing).
    :param endpoint: the batch endpoint whose limits apply (default: the vendor's first).
    :param max_requests: requests per part (default: the vendor's limit; never above it).
    :param max_bytes: bytes per part (default: the vendor's limit; never above it).
    :raises InvalidInputError: for limits out of range, or a line that cannot fit in a part.
    """
    spec = core.resolve_vendor(vendor)
    endpoint_spec = core.resolve_endpoint(spec, endpoint)
    limits = {
        "max_requests": (max_requests, core.request_limit(spec, endpoint_spec)),
        "max_bytes": (max_bytes, core.byte_limit(spec, endpoint_spec)),
    }
    for name, (given, ceiling) in limits.items():
        if given is not None and not 0 < given <= ceiling:
            raise InvalidInputError(
                f"{name} must be from 1 to {ceiling} for {endpoint_spec.path}, got {given}"
            )
    part_requests = max_requests or limits["max_requests"][1]
    part_bytes = max_bytes or limits["max_bytes"][1]
    folder: Any
    if isinstance(out_dir, str | os.PathLike) and not _is_uri(_label(out_dir)):
        folder = Path(_label(out_dir))
    else:
        folder = _object_path(_label(out_dir)) if isinstance(out_dir, str | os.PathLike) else out_dir
    _make_local_folder(folder)
    stem = Path(_file_name(source) or "requests.jsonl").name.removesuffix(".jsonl")
    parts: list[Any] = []
    handle: IO[bytes] | None = None
    count = size = 0
    try:
        with _open_read(source) as reader:
            # Lines are copied verbatim (terminators included), so the parts add up to the original.
            for lineno, raw in enumerate(iter(lambda: reader.readline(part_bytes + 1), b""), start=1):
                if len(raw) > part_bytes:
                    raise InvalidInputError(
                        f"{_label(source)}: line {lineno} is over {part_bytes} bytes and cannot fit in a part"
                    )
                request = 1 if raw.strip() else 0
                if handle is None or count + request > part_requests or size + len(raw) > part_bytes:
                    if handle is not None:
                        handle.close()
                    parts.append(folder / f"{stem}.part-{len(parts) + 1:04d}.jsonl")
                    handle = parts[-1].open("wb")
                    count = size = 0
                handle.write(raw)
                count += request
                size += len(raw)
    except BaseException:
        if handle is not None:
            handle.close()
            handle = None
        for part in parts:
            part.unlink(missing_ok=True)
        raise
    finally:
        if handle is not None:
            handle.close()
    return parts
