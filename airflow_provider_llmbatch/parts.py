"""
Split a request file into parts within a vendor's per-file limits, checking it, in one streaming pass.

An input of any size becomes as many files as the vendor's limits need (requests per file, bytes per
file); a line is never split, and the per-line rules stay errors. The whole input is checked as one
file would be (every custom id unique over all parts, one model, the vendor's line rules), with the
problems named by their line in the input. Memory stays flat: the input is read in chunks, each line
goes to its part file on local disk as it passes, and custom ids are kept as 8-byte keys.
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
from airflow_provider_llmbatch.locations import Source, file_name, label, open_read
from airflow_provider_llmbatch.request_blocks import BlockPath
from airflow_provider_llmbatch.token_estimate import TokenEstimator
from airflow_provider_llmbatch.vendors import VendorSpec


@dataclass(frozen=True)
class Part:
    """
    One file of a split input.

    :param index: its place among the parts, from 0.
    :param path: the local file.
    :param lines: the requests it holds.
    :param bytes: its size.

    A part has no hash of its own: it is named by the input's SHA-256 and its index, as its batch's
    identity is, and the bytes are hashed once, as the input's.
    """

    index: int
    path: Path
    lines: int
    bytes: int


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
    """Write lines into numbered part files, starting a new one before a line would break a limit."""

    def __init__(self, folder: Path, stem: str, max_requests: int, max_bytes: int) -> None:
        self.folder, self.stem = folder, stem
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.parts: list[Part] = []
        self._handle: IO[bytes] | None = None
        self._path = Path()
        self._lines = self._bytes = 0

    def add(self, line: bytes) -> None:
        """Write one line (with its newline)."""
        self._write(line, 1)

    def add_block(self, block: bytes, count: int) -> None:
        """Write ``count`` whole lines at once when the current part has room for all, else line by line."""
        if self._handle is None or not self._fits(len(block), count):
            for line in block.splitlines(keepends=True):
                self._write(line, 1)
        else:
            self._write(block, count)

    def _fits(self, size: int, count: int) -> bool:
        return self._lines + count <= self.max_requests and self._bytes + size <= self.max_bytes

    def _write(self, data: bytes, count: int) -> None:
        size = len(data)
        if self._handle is None or not self._fits(size, count):
            self.close()
            self._path = self.folder / f"{self.stem}.part-{len(self.parts) + 1:04d}.jsonl"
            self._handle = open(self._path, "wb", buffering=_BUFFER)  # noqa: SIM115 - closed in close()
        assert self._handle is not None
        self._handle.write(data)
        self._lines += count
        self._bytes += size

    def close(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        self.parts.append(Part(len(self.parts), self._path, self._lines, self._bytes))
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
        spec, endpoint_spec, file_name(source), max_problems=max_problems, whole_input=True
    )
    writer = _PartWriter(where, stem, max_requests or most_requests, max_bytes or most_bytes)

    def take(line: bytes, size: int) -> None:
        checker.line(line, size)
        if line.strip() and not checker.failed:
            writer.add(line.rstrip(b"\r") + b"\n")
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
        writer.close()
        _name_duplicates(source, checker, max_problems)
        report = finish_check(checker, feed.tally, label(source))
    except BaseException:
        writer.close()
        for part in writer.parts:
            part.path.unlink(missing_ok=True)
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
