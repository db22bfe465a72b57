"""
Streaming tools for batch request files (JSONL): validate, build, iterate, fingerprint, split.

Every function reads or writes one line at a time, so memory does not grow with the file. The rules
come from the vendor's :class:`~airflow_provider_llmbatch.vendors.VendorSpec` (limits, endpoints,
forbidden body keys); :mod:`airflow_provider_llmbatch.jsonl_lines` states them and
:mod:`airflow_provider_llmbatch.jsonl_check` applies them as the bytes pass.

A ``source`` is a local path (``str`` or ``os.PathLike``), a URI such as ``s3://bucket/key.jsonl``,
an ``ObjectStoragePath`` (anything with ``.open("rb")``), or a binary file object (left open).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, overload

from pydantic import ValidationError

from airflow_provider_llmbatch import codec
from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.jsonl_check import (
    RequestFileCheck,
    RequestFileReport,
    Tally,
    chunk_bytes,
    finish_check,
    validate_request_file,
)
from airflow_provider_llmbatch.jsonl_lines import (
    RequestChecker,
    byte_limit,
    diagnose_unparsable,
    request_limit,
    resolve_endpoint,
    resolve_vendor,
    show,
)
from airflow_provider_llmbatch.jsonl_records import request_for, structured_for
from airflow_provider_llmbatch.locations import (
    Location,
    as_path,
    atomic_writer,
    file_name,
    label,
    local_path,
    make_folder,
    open_read,
    replaceable_file,
)
from airflow_provider_llmbatch.locations import Source as RequestSource
from airflow_provider_llmbatch.models import RequestLine
from airflow_provider_llmbatch.vendors import VendorSpec

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


def fingerprint(source: RequestSource) -> str:
    """Return the SHA-256 (hex) of a file's bytes, read in chunks."""
    sha = hashlib.sha256()
    size = chunk_bytes()
    with open_read(source) as handle:
        while chunk := handle.read(size):
            sha.update(chunk)
    return sha.hexdigest()


def iter_request_lines(source: RequestSource) -> Iterator[RequestLine]:
    """
    Yield the requests of a file one at a time.

    Reading is lenient where nothing is lost (a BOM and blank lines are skipped); a line that is not a
    request raises :class:`InvalidRequestFileError` naming it. Use :func:`validate_request_file` to
    check a file against a vendor's rules.
    """
    name = label(source)
    with open_read(source) as handle:
        for lineno, raw in enumerate(iter(handle.readline, b""), start=1):
            line = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            if not line.strip():
                continue
            try:
                obj = codec.loads(line)
            except codec.CODEC_ERRORS as exc:
                field, expected, got = diagnose_unparsable(line, exc)
                problem = f"line {lineno}: {field}: expected {expected}, got {got}"
                raise InvalidRequestFileError(name, [problem]) from None
            try:
                request = RequestLine.model_validate(obj)
            except ValidationError as exc:
                problems = [
                    f"line {lineno}: {'.'.join(map(str, e['loc'])) or 'json'}: "
                    f"expected {e['msg'].lower()}, got {show(e['input'])}"
                    for e in exc.errors()
                ]
                raise InvalidRequestFileError(name, problems) from None
            yield request


def build_request_file(
    records: Iterable[Mapping[str, Any]],
    destination: Location,
    vendor: VendorSpec | str,
    endpoint: str | None = None,
    *,
    model: str | None = None,
    custom_id_field: str | None = "custom_id",
    system: str | None = None,
    params: Mapping[str, Any] | None = None,
    max_problems: int = 20,
    whole_input: bool = False,
    output_schema: Any = None,
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
    :param whole_input: build an input that :func:`~airflow_provider_llmbatch.parts.split_checked` splits
        into files within the vendor's limits: no per-file request or size limit, and custom ids are left
        to the split to check over the whole input.
    :param output_schema: a JSON Schema dict, a pydantic model class or an
        :class:`~airflow_provider_llmbatch.schema.OutputSchema`: every chat request whose body has no
        ``response_format`` asks for it the way the vendor takes structured output
        (``VendorSpec.structured_output``: the schema in ``response_format``, or JSON mode with the schema
        in the system prompt).
    :raises InvalidRequestFileError: when a record cannot be turned into a valid request line.
    :raises InvalidInputError: when ``output_schema`` is not a schema, or the vendor or endpoint has no
        structured output.
    """
    spec = resolve_vendor(vendor)
    endpoint_spec = resolve_endpoint(spec, endpoint)
    structured = structured_for(spec, endpoint_spec, output_schema)
    checker = RequestChecker(
        spec, endpoint_spec, file_name(destination), max_problems=max_problems, whole_input=whole_input
    )
    tally = Tally()
    with _open_write(destination) as handle:
        write, update, dumps = handle.write, tally.update, codec.dumps
        for number, record in enumerate(records, start=1):
            line = request_for(
                record, number, endpoint_spec, checker, model, custom_id_field, system, params, structured
            )
            if line is None:
                checker.skip()
                continue
            try:
                raw = dumps(line)
            except codec.CODEC_ERRORS as exc:
                checker.problem(f"record {number}", "body", "JSON-serializable values", f"{exc}")
                checker.skip()
                continue
            checker.line(raw, len(raw))
            raw += b"\n"
            write(raw)
            update(raw)
        # Inside the block: a file that breaks a rule is never committed.
        return finish_check(checker, tally, label(destination))


@contextmanager
def _open_write(destination: Location) -> Iterator[IO[bytes]]:
    """Open a destination for writing: a path atomically, a URI in place and removed if the block raises."""
    target = as_path(destination)
    if isinstance(target, Path):
        with atomic_writer(target) as handle:
            yield handle
        return
    local = local_path(target)
    if local is not None:
        # A file:// location is written in place and removed if the write fails: never over a FIFO (the
        # open would block) or a device (removing a failed write would remove /dev/null itself).
        replaceable_file(local)
    make_folder(target.parent)
    try:
        with target.open("wb") as handle:  # type: ignore[no-untyped-call]
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
    out_dir: Location,
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
    spec = resolve_vendor(vendor)
    endpoint_spec = resolve_endpoint(spec, endpoint)
    limits = {
        "max_requests": (max_requests, request_limit(spec, endpoint_spec)),
        "max_bytes": (max_bytes, byte_limit(spec, endpoint_spec)),
    }
    for name, (given, ceiling) in limits.items():
        if given is not None and not 0 < given <= ceiling:
            raise InvalidInputError(
                f"{name} must be from 1 to {ceiling} for {endpoint_spec.path}, got {given}"
            )
    part_requests = max_requests or limits["max_requests"][1]
    part_bytes = max_bytes or limits["max_bytes"][1]
    folder = as_path(out_dir)
    make_folder(folder)
    stem = Path(file_name(source) or "requests.jsonl").name.removesuffix(".jsonl")
    parts: list[Any] = []
    handle: IO[bytes] | None = None
    count = size = 0
    try:
        with open_read(source) as reader:
            # Lines are copied verbatim (terminators included), so the parts add up to the original.
            for lineno, raw in enumerate(iter(lambda: reader.readline(part_bytes + 1), b""), start=1):
                if len(raw) > part_bytes:
                    raise InvalidInputError(
                        f"{label(source)}: line {lineno} is over {part_bytes} bytes and cannot fit in a part"
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
