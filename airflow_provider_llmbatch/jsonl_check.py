"""
Check a request file as its bytes pass: split them into lines, count and hash them, apply the rules.

:class:`RequestFileCheck` is fed chunks (an upload feeds it what it sends); :func:`validate_request_file`
feeds it a file. Either way the bytes are read once: :class:`LineFeed` cuts them into lines for the
:class:`~airflow_provider_llmbatch.jsonl_lines.RequestChecker` while :class:`Tally` counts and hashes
them, and a pass that keeps every rule ends in a :class:`RequestFileReport` (:func:`finish_check`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.jsonl_lines import RequestChecker, resolve_endpoint, resolve_vendor
from airflow_provider_llmbatch.locations import Source, file_name, label, open_read
from airflow_provider_llmbatch.vendors import VendorSpec

_CHUNK = 1 << 20
_CPUS = os.cpu_count() or 1


def chunk_bytes() -> int:
    """Return the bytes read per chunk: few calls, flat memory, and the size hashing moves to a thread at."""
    return _CHUNK


class Tally:
    """
    Count and hash the bytes of a file as they pass.

    Large files are hashed on a helper thread (hashlib releases the GIL), so hashing overlaps with
    parsing; a bounded queue keeps at most a few chunks in flight.
    """

    __slots__ = ("_queue", "_thread", "bytes", "sha")

    def __init__(self) -> None:
        self.bytes = 0
        self.sha = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None

    def update(self, data: bytes) -> None:
        """Count and hash the next bytes, in order."""
        self.bytes += len(data)
        if self._queue is None:
            if len(data) < _CHUNK or _CPUS < 2:
                self.sha.update(data)
                return
            self._queue = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._drain, name="llmbatch-sha256", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def _drain(self) -> None:
        assert self._queue is not None
        while (data := self._queue.get()) is not None:
            self.sha.update(data)

    def close(self) -> None:
        """Wait until every byte given is hashed."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        """Return the SHA-256 of all bytes given."""
        self.close()
        return self.sha.hexdigest()


class _PartialLine:
    """A line that spans chunks, keeping at most ``keep`` of its bytes while counting all of them."""

    __slots__ = ("cr", "keep", "kept", "parts", "size")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.parts: list[bytes] = []
        self.kept = self.size = 0
        self.cr = False

    def add(self, piece: bytes) -> None:
        if not piece:
            return
        self.size += len(piece)
        self.cr = piece[-1] == 13
        room = self.keep - self.kept
        if room > 0:
            self.parts.append(piece[:room])
            self.kept += min(room, len(piece))

    def take(self, end: bytes) -> tuple[bytes, int]:
        self.add(end)
        line, size = b"".join(self.parts), self.size - self.cr
        self.parts, self.kept, self.size, self.cr = [], 0, 0, False
        return line, size


class LineFeed:
    r"""
    Split pushed chunks into lines and hand each to ``check(line, size)``, counting and hashing every byte.

    The push form of :func:`scan_lines`, for bytes that pass by anyway (an upload): ``line`` has no
    terminator and ``size`` excludes a final ``\r``. A line longer than ``cap`` may be handed over
    truncated (``len(line) < size``): the rest is hashed and counted but not kept.

    :param cap: the longest line kept whole (the vendor's line limit).
    :param tally: counts and hashes the bytes.
    :param check: called once per line, in order.
    :param block: offered the whole lines of each chunk first, as one block of bytes (each line ending
        in ``\n``); it returns whether it took them, else they go to ``check`` one by one.
    """

    __slots__ = ("_block", "_check", "_partial", "_update", "tally")

    def __init__(
        self,
        cap: int,
        tally: Tally,
        check: Callable[[bytes, int], None],
        block: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.tally = tally
        self._update = tally.update
        self._check = check
        self._block = block
        self._partial = _PartialLine(cap + 2)

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the file: check the lines they finish, keep the unfinished one."""
        if not isinstance(chunk, bytes):
            raise InvalidInputError("request files must be opened in binary mode ('rb')")
        if not chunk:
            return
        self._update(chunk)
        partial = self._partial
        if self._block is not None and (end := chunk.rfind(b"\n") + 1):
            start = 0
            if partial.size:
                start = chunk.index(b"\n") + 1
                self._check(*partial.take(chunk[: start - 1]))
            if start < end and self._block(chunk[start:end]):
                start = end
            if start:
                chunk = chunk[start:]
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if lines:
            check = self._check
            rest = iter(lines)
            if partial.size:
                check(*partial.take(next(rest)))
            for line in rest:
                check(line, len(line) - line.endswith(b"\r"))
        partial.add(tail)

    def end(self) -> None:
        """Check the last line when the file does not end with a newline, and finish hashing."""
        try:
            if self._partial.size:
                self._check(*self._partial.take(b""))
        finally:
            self.tally.close()


@dataclasses.dataclass(frozen=True)
class RequestFileReport:
    """
    What a valid request file holds.

    :param source: the file's name or URI.
    :param vendor: the vendor's registry name.
    :param endpoint: the batch endpoint every line names.
    :param lines: the number of requests.
    :param bytes: the file's size in bytes.
    :param model: the one model of the file.
    :param sha256: the SHA-256 of the file's bytes (hex), as
        :func:`~airflow_provider_llmbatch.jsonl.fingerprint` returns it.
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
        return dataclasses.asdict(self)


def finish_check(checker: RequestChecker, tally: Tally, source: str) -> RequestFileReport:
    """
    End a pass: run the checks of the whole file and describe it.

    :param checker: the pass's checker, fed every line.
    :param tally: the pass's count and hash of the bytes.
    :param source: the file's name or URI.
    :raises InvalidRequestFileError: listing every problem found (``line N: field: expected ...``).
    """
    sha256 = tally.hexdigest()
    checker.finish(tally.bytes, source)
    return RequestFileReport(
        source=source,
        vendor=checker.spec.name,
        endpoint=checker.endpoint.path,
        lines=checker.requests,
        bytes=tally.bytes,
        model=checker.model,
        sha256=sha256,
    )


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
        self.spec = resolve_vendor(vendor)
        self.endpoint = resolve_endpoint(self.spec, endpoint)
        self.max_problems = max_problems
        self.report: RequestFileReport | None = None
        """The report of the last pass that passed; None before, and while a pass runs."""
        self._checker: RequestChecker | None = None
        self._lines: LineFeed | None = None
        self._label = ""

    def begin(self, source: object) -> None:
        """
        Start a pass over ``source``, dropping any unfinished one.

        :param source: what the bytes come from: its name is checked (``.jsonl``; a file object without
            a name is not) and names the file in problems.
        """
        self.close()
        self.report = None
        checker = RequestChecker(self.spec, self.endpoint, file_name(source), max_problems=self.max_problems)
        self._checker = checker
        self._lines = LineFeed(checker.max_line_bytes, Tally(), checker.line)
        self._label = label(source)

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
        self.report = finish_check(checker, lines.tally, self._label)
        return self.report

    def close(self) -> None:
        """Drop an unfinished pass (and stop its hashing thread); a finished one needs no closing."""
        lines, self._lines, self._checker = self._lines, None, None
        if lines is not None:
            lines.tally.close()


def validate_request_file(
    source: Source,
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
        size = chunk_bytes()
        feed = check.feed
        with open_read(source) as handle:
            read = handle.read
            while chunk := read(size):
                feed(chunk)
        return check.finish()
    finally:
        check.close()
