"""
Split a request file into parts within a vendor's per-file limits, checking it, in one streaming pass.

An input of any size becomes as many files as the vendor's limits need (requests per file, bytes per
file); a line is never split, and the per-line rules stay errors. The whole input is checked as one
file would be (every custom id unique over all parts, one model, the vendor's line rules), with the
problems named by their line in the input. Memory stays flat: the input is read in chunks, and custom
ids are kept as 8-byte keys.

A local input is not copied: its parts are spans of the input file, read from it when they are sent (and
refused then if the file changed since it was checked). The lines of any other input (object storage, a
file object), and of a local one whose lines are sent otherwise than written (a CR before a newline is
dropped, a last line gets its newline), go to part files on local disk as they pass.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from airflow_provider_llmbatch import codec
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.id_keys import id_key
from airflow_provider_llmbatch.jsonl_check import (
    LineFeed,
    RequestFileReport,
    Tally,
    chunk_bytes,
    finish_check,
)
from airflow_provider_llmbatch.jsonl_lines import (
    RequestChecker,
    byte_limit,
    request_limit,
    resolve_endpoint,
    resolve_vendor,
)
from airflow_provider_llmbatch.locations import Source, file_name, label, local_path, open_read, regular_file
from airflow_provider_llmbatch.request_blocks import BlockPath
from airflow_provider_llmbatch.spans import PartReader, Stamp, refuse_if_changed, stamp_of
from airflow_provider_llmbatch.token_estimate import TokenEstimator
from airflow_provider_llmbatch.vendors import VendorSpec


@dataclass(frozen=True)
class Part:
    """
    One part of a split input: a span of a local file (the input itself, or a part file).

    :param index: its place among the parts, from 0.
    :param path: the local file that holds it.
    :param lines: the requests it holds.
    :param bytes: its size.
    :param offset: where it starts in ``path``.
    :param stamp: what ``path`` was when it was checked (for a span of the input): reading refuses a
        file that changed since (:class:`PartReader`).

    A part has no hash of its own: it is named by the input's SHA-256 and its index, as its batch's
    identity is, and the bytes are hashed once, as the input's.
    """

    index: int
    path: Path
    lines: int
    bytes: int
    offset: int = 0
    stamp: Stamp | None = None

    def open(self) -> PartReader:
        """Return a reader of exactly this part's bytes (seekable, so an upload can start over)."""
        return PartReader(self.path, self.offset, self.bytes, self.stamp)


@dataclass(frozen=True)
class SplitInput:
    """
    A checked input and its parts.

    :param report: the whole input, as one file (its ``sha256`` is the input's bytes').
    :param parts: the parts, in input order.
    """

    report: RequestFileReport
    parts: tuple[Part, ...]


_BOM = b"\xef\xbb\xbf"
_BUFFER = 1 << 20
"""Bytes buffered per part file: lines are written a block at a time, not a system call per line."""


class _PartWriter:
    """
    Cut lines into parts, starting a new one before a line would break a limit.

    While every line is sent as the input has it, a part of a local input (``origin``) is only a span
    of it; from the first line sent otherwise, the part so far is copied into a part file and every
    later line goes to part files.
    """

    def __init__(
        self, folder: Path, stem: str, max_requests: int, max_bytes: int, origin: Path | None = None
    ) -> None:
        self.folder, self.stem = folder, stem
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.parts: list[Part] = []
        self.files: list[Path] = []
        """The part files written (a span of the input is not one)."""
        self._origin = origin
        self._stamp: Stamp | None = None
        if origin is not None:
            with open(origin, "rb") as handle:
                self._stamp = stamp_of(handle)
        self._handle: IO[bytes] | None = None
        self._started = False
        self._start = self._written = 0
        self._lines = self._bytes = 0

    def add(self, line: bytes, as_written: bool = True) -> None:
        """Add one line (with its newline); ``as_written``: the input has these very bytes here."""
        self._add(line, 1, as_written)

    def add_block(self, block: bytes, count: int) -> None:
        """Add ``count`` whole lines, as written, at once when the current part has room for all."""
        if not self._started or not self._fits(len(block), count):
            for line in block.splitlines(keepends=True):
                self._add(line, 1, True)
        else:
            self._add(block, count, True)

    def finish(self, input_bytes: int) -> None:
        """Close the last part, once the whole input (``input_bytes``) has passed and was found good."""
        if self._origin is not None:
            # Changed while it was read: what was checked is not what the spans would send.
            assert self._stamp is not None
            refuse_if_changed(self._origin, self._stamp)
        if self._origin is not None and self._written == input_bytes + 1:
            self._to_file(b"\n")  # the last line is sent with the newline the input does not end with
        self.close()

    def _fits(self, size: int, count: int) -> bool:
        return self._lines + count <= self.max_requests and self._bytes + size <= self.max_bytes

    def _add(self, data: bytes, count: int, as_written: bool) -> None:
        size = len(data)
        if not self._started or not self._fits(size, count):
            self.close()
            self._begin()
        if self._origin is not None and not as_written:
            self._to_file()
        if self._handle is not None:
            self._handle.write(data)
        self._lines += count
        self._bytes += size
        self._written += size

    def _begin(self) -> None:
        self._handle = None if self._origin is not None else self._new_file()
        self._start = self._written
        self._started = True

    def _new_file(self) -> IO[bytes]:
        path = self.folder / f"{self.stem}.part-{len(self.parts) + 1:04d}.jsonl"
        self.files.append(path)
        return open(path, "wb", buffering=_BUFFER)

    def _to_file(self, tail: bytes = b"") -> None:
        """Copy the current part, a span of the input so far, into a part file; part files from now on."""
        assert self._origin is not None
        handle = self._new_file()
        try:
            with PartReader(self._origin, self._start, self._bytes - len(tail), self._stamp) as span:
                while chunk := span.read(_BUFFER):
                    handle.write(chunk)
            handle.write(tail)
        except BaseException:
            handle.close()
            raise
        self._handle, self._origin = handle, None

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._handle is None:
            assert self._origin is not None
            part = Part(len(self.parts), self._origin, self._lines, self._bytes, self._start, self._stamp)
        else:
            self._handle.close()
            self._handle = None
            part = Part(len(self.parts), self.files[-1], self._lines, self._bytes)
        self.parts.append(part)
        self._lines = self._bytes = 0


def split_checked(
    source: Source,
    vendor: VendorSpec | str,
    endpoint: str | None = None,
    *,
    folder: str | os.PathLike[str] | None = None,
    max_requests: int | None = None,
    max_bytes: int | None = None,
    max_problems: int = 20,
    estimator: TokenEstimator | None = None,
) -> SplitInput:
    """
    Check a request file as one and write it into parts within the vendor's limits, in one pass.

    :param source: the request file (a path, a URI, an ObjectStoragePath or a binary file object).
    :param vendor: the vendor's spec, or its registry name.
    :param endpoint: the batch endpoint whose limits apply (default: the vendor's first).
    :param folder: where the parts are written (default: a new temporary folder; the caller removes it).
    :param max_requests: requests per part (default and most: the vendor's per-file limit).
    :param max_bytes: bytes per part (default and most: the vendor's per-file limit).
    :param max_problems: how many problems to list; further ones are counted.
    :param estimator: a token estimate to add every line kept to, in the same pass.
    :raises InvalidRequestFileError: listing every problem of the input (``line N: field: ...``).
    :raises InvalidInputError: for limits out of range.
    """
    spec = resolve_vendor(vendor)
    endpoint_spec = resolve_endpoint(spec, endpoint)
    most_requests, most_bytes = request_limit(spec, endpoint_spec), byte_limit(spec, endpoint_spec)
    for name, given, most in (
        ("max_requests", max_requests, most_requests),
        ("max_bytes", max_bytes, most_bytes),
    ):
        if given is not None and (
            isinstance(given, bool) or not isinstance(given, int) or not 0 < given <= most
        ):
            raise InvalidInputError(
                f"{name} must be from 1 to {most} for {endpoint_spec.path}, got {given!r}"
            )
    where = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="llmbatch-parts-"))
    where.mkdir(parents=True, exist_ok=True)
    stem = Path(file_name(source) or "requests.jsonl").name.removesuffix(".jsonl")
    checker = RequestChecker(
        spec,
        endpoint_spec,
        file_name(source),
        max_problems=max_problems,
        whole_input=True,
        part_bytes=max_bytes,
    )
    local = local_path(source) if isinstance(source, str | os.PathLike) else None
    # Resolved: the spans are read from the file checked, whatever the working folder or a link later.
    origin = regular_file(local).resolve() if local is not None else None
    writer = _PartWriter(where, stem, max_requests or most_requests, max_bytes or most_bytes, origin)

    def take(line: bytes, size: int) -> None:
        checker.line(line, size)
        if line.strip() and not checker.failed:
            writer.add(line.rstrip(b"\r") + b"\n", as_written=not line.endswith(b"\r"))
            if estimator is not None:
                estimator.line(line)

    blocks = BlockPath(checker, estimator)

    def take_block(block: bytes) -> bool:
        count = blocks.take(block)
        if count:
            writer.add_block(block, count)
        return bool(count)

    feed = LineFeed(checker.max_line_bytes, Tally(), take, take_block)
    try:
        with open_read(source) as handle:
            while chunk := handle.read(chunk_bytes()):
                feed.feed(chunk)
        feed.end()
        _name_duplicates(source, checker, max_problems)
        report = finish_check(checker, feed.tally, label(source))
        writer.finish(report.bytes)
    except BaseException:
        writer.close()
        for path in writer.files:
            path.unlink(missing_ok=True)
        if folder is None:
            where.rmdir()
        feed.tally.close()
        raise
    return SplitInput(report, tuple(writer.parts))


def _name_duplicates(source: Source, checker: RequestChecker, max_problems: int) -> None:
    """Report each custom id used more than once with its lines: a second pass, only when there are any."""
    repeated = checker.duplicated_keys()
    if not repeated:
        return
    checker.duplicates_named = True
    first: dict[int, int] = {}
    listed = 0
    with open_read(source) as handle:
        for lineno, raw in enumerate(iter(handle.readline, b""), start=1):
            try:
                # Only the id is built, as the checks built it: any line they keyed gives its id.
                custom_id = codec.request_id(raw.removeprefix(_BOM) if lineno == 1 else raw)
            except codec.CODEC_ERRORS:
                continue
            if not isinstance(custom_id, str) or (key := id_key(custom_id)) not in repeated:
                continue
            if key not in first:
                first[key] = lineno
            elif listed < max_problems:
                listed += 1
                checker.problem(
                    f"line {lineno}",
                    "custom_id",
                    f"an id used once in the whole input (it is on line {first[key]} already)",
                    f"{custom_id!r} again",
                )
    # Nothing listed: two ids shared a 64-bit key, no id was repeated.
