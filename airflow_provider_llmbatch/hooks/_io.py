"""
Local ends of streamed transfers: upload sources and their multipart framing, checked bodies, download sinks.

Each works with a local path, a binary file object or anything with ``.open()`` such as
``ObjectStoragePath``. Their methods are plain blocking calls; the async face runs them in a worker
thread so no file I/O happens on the event loop.
"""

from __future__ import annotations

import io
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, NoReturn, Protocol, cast

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.locations import local_path, object_path, regular_file, replaceable_file

CHUNK_SIZE = 256 * 1024
"""Bytes read per upload chunk: large enough to keep thread hops rare, small enough to keep memory flat."""

CHECKED_CHUNK_SIZE = 1024 * 1024
"""Bytes read per chunk of a checked upload: what the line checker reads (it hashes these on a thread)."""


def _kind(obj: object, writing: bool) -> str:
    if isinstance(obj, str | os.PathLike):
        return "path"
    if isinstance(obj, io.TextIOBase):
        raise InvalidInputError("open the file in binary mode ('rb'/'wb'), not text mode")
    if hasattr(obj, "write" if writing else "read"):
        return "file"
    if hasattr(obj, "open"):
        return "storage"
    raise InvalidInputError(
        f"expected a path, a binary file object or an ObjectStoragePath, got {type(obj).__name__}"
    )


class UploadSource:
    """
    Where an upload reads from; opened afresh, or rewound, for every attempt.

    :param source: a local path, a binary file object or an object with ``.open("rb")``.
    """

    def __init__(self, source: object) -> None:
        self.source = source
        self.kind = _kind(source, writing=False)
        self.size: int | None = None
        self._start: int | None = None
        self._used = False

    def prepare(self) -> None:
        """Find the size (None if unknown) and, for a file object, the position to rewind to."""
        if self.kind == "path":
            self.size = os.path.getsize(regular_file(cast("os.PathLike[str]", self.source)))
        elif self.kind == "storage":
            local = local_path(cast("Any", self.source))
            if local is not None:
                # file:// is a local path too: a FIFO would block the open, /dev/zero never end.
                regular_file(local)
            elif hasattr(type(self.source), "fs"):
                object_path(cast("Any", self.source))  # an ObjectStoragePath: a missing filesystem is named
            try:
                self.size = int(cast("Any", self.source).stat().st_size)
            except (AttributeError, OSError, TypeError, ValueError):
                self.size = None
        else:
            handle = cast("IO[bytes]", self.source)
            seekable = getattr(handle, "seekable", None)
            if callable(seekable) and seekable():
                self._start = handle.tell()
                end = handle.seek(0, io.SEEK_END)
                handle.seek(self._start)
                self.size = end - self._start

    def can_repeat(self) -> bool:
        """Return whether another attempt can read the whole source again."""
        return self.kind != "file" or self._start is not None or not self._used

    def open(self) -> tuple[IO[bytes], bool]:
        """Return a handle positioned at the start and whether the caller must close it."""
        if self.kind == "path":
            return open(cast("os.PathLike[str]", self.source), "rb"), True
        if self.kind == "storage":
            return cast("IO[bytes]", cast("Any", self.source).open("rb")), True
        handle = cast("IO[bytes]", self.source)
        if self._start is not None:
            handle.seek(self._start)
        self._used = True
        return handle, False


class UploadCheck(Protocol):
    """
    What checks a file as it uploads, such as :class:`airflow_provider_llmbatch.jsonl.RequestFileCheck`.

    ``begin`` starts a pass (each attempt of an upload starts over), ``feed`` takes the next bytes and
    returns False once the file cannot pass, ``finish`` runs the end-of-file checks (raising on any
    problem) and ``close`` drops an unfinished pass.
    """

    def begin(self, source: object) -> None:
        """Start a pass over ``source``."""

    def feed(self, chunk: bytes) -> bool:
        """Check the next bytes; return False once the file cannot pass."""

    def finish(self) -> object:
        """Run the end-of-file checks; raise listing every problem."""

    def close(self) -> None:
        """Drop an unfinished pass."""


class UploadStopped(Exception):
    """Raised from a checked upload body at the first problem, so the request is aborted unfinished."""


class CheckedBody:
    """
    The multipart body of an upload whose file is checked as it streams, chunk by chunk.

    A chunk is sent only after the lines it completes passed the check; the last chunk and the closing
    boundary only after the whole file passed, end-of-file checks included. On the first problem the
    body raises :class:`UploadStopped`: the request is aborted with its body unfinished, so the server
    never gets a file. :meth:`prime` checks the first chunks before the request starts, so a file whose
    problems show there (or that fits in a chunk) costs no request at all.

    :param handle: the file, positioned at its start.
    :param check: the check, fed every byte once.
    :param source: what the file was opened from (named in problems).
    :param head: the multipart bytes before the file.
    :param tail: the multipart bytes after the file.
    """

    def __init__(
        self, handle: IO[bytes], check: UploadCheck, source: object, head: bytes, tail: bytes
    ) -> None:
        self._read = handle.read
        self._check = check
        self._source = source
        self._head = head
        self._tail = tail
        self._chunks: Iterator[bytes] | None = None
        self._first = b""

    def _checked(self) -> Iterator[bytes]:
        read, feed = self._read, self._check.feed
        held = read(CHECKED_CHUNK_SIZE)
        if not feed(held):
            raise UploadStopped
        while chunk := read(CHECKED_CHUNK_SIZE):
            if not feed(chunk):
                raise UploadStopped
            yield held
            held = chunk
        # Held back until now: without its last bytes the body is incomplete, whatever the server saw.
        self._check.finish()
        yield held

    def prime(self) -> None:
        """Start the check and check the first chunk (the whole file, if it fits) before any request."""
        self._check.begin(self._source)
        self._chunks = self._checked()
        self._first = next(self._chunks)

    def __iter__(self) -> Iterator[bytes]:
        if self._chunks is None:
            raise RuntimeError("prime() the body before sending it")
        yield self._head
        first, self._first = self._first, b""
        yield first
        yield from self._chunks
        yield self._tail

    def fail(self) -> NoReturn:
        """After :class:`UploadStopped`: check the rest of the file, unsent; raise what the check found."""
        read, feed = self._read, self._check.feed
        while chunk := read(CHECKED_CHUNK_SIZE):
            feed(chunk)
        self._check.finish()
        raise RuntimeError("the upload check stopped the upload but reported no problem")


class DownloadSink:
    """
    Where a download writes to; a path or storage path is written under a temporary name and renamed.

    No partial file ever appears at the final path: a failed download leaves nothing there (or what
    was there before).

    :param destination: a local path, a binary file object or an object with ``.open("wb")``.
    """

    def __init__(self, destination: object) -> None:
        self.destination = destination
        self.kind = _kind(destination, writing=True)
        self.written = 0
        self._handle: IO[bytes] | None = None
        self._temp: Any = None
        self._start: int | None = None
        self._started = False

    def begin(self) -> None:
        """Start (or restart) writing from the beginning."""
        self._close()
        self.written = 0
        if self.kind == "path":
            final = os.fspath(replaceable_file(cast("os.PathLike[str]", self.destination)))
            if self._temp is None:
                parent = os.path.dirname(os.path.abspath(final))
                os.makedirs(parent, exist_ok=True)
                fd, self._temp = tempfile.mkstemp(
                    dir=parent, prefix=f".{os.path.basename(final)}.", suffix=".part"
                )
                os.close(fd)
            self._handle = open(self._temp, "wb")  # noqa: SIM115 - closed in commit/abort
        elif self.kind == "storage":
            dest = cast("Any", self.destination)
            local = local_path(dest)
            if local is not None:
                replaceable_file(local)
            elif hasattr(type(dest), "fs"):
                object_path(dest)  # an ObjectStoragePath: a missing filesystem is named
            if self._temp is None:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._temp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")
            self._handle = cast("IO[bytes]", self._temp.open("wb"))
        else:
            handle = cast("IO[bytes]", self.destination)
            if not self._started:
                seekable = getattr(handle, "seekable", None)
                self._start = handle.tell() if callable(seekable) and seekable() else None
            elif self._start is not None:
                handle.seek(self._start)
                handle.truncate()
            self._handle = handle
        self._started = True

    def can_repeat(self) -> bool:
        """Return whether a failed attempt can be started over."""
        return self.kind != "file" or self._start is not None or self.written == 0

    def write(self, data: bytes) -> None:
        """Write one chunk."""
        assert self._handle is not None, "begin() first"
        self._handle.write(data)
        self.written += len(data)

    def commit(self) -> None:
        """Finish: move the temporary file to the final path."""
        self._close()
        if self.kind == "path":
            os.replace(self._temp, os.fspath(cast("os.PathLike[str]", self.destination)))
            self._temp = None
        elif self.kind == "storage":
            self._temp.rename(self.destination)
            self._temp = None
        else:
            cast("IO[bytes]", self.destination).flush()

    def abort(self) -> None:
        """Give up: remove the temporary file."""
        self._close()
        if self._temp is None:
            return
        try:
            if self.kind == "path":
                os.unlink(self._temp)
            else:
                self._temp.unlink(missing_ok=True)
        except (FileNotFoundError, OSError):
            pass
        self._temp = None

    def _close(self) -> None:
        if self._handle is not None and self.kind != "file":
            self._handle.close()
        self._handle = None


@dataclass(frozen=True)
class MultipartLayout:
    """
    The bytes around a streamed file in a ``multipart/form-data`` upload.

    :param boundary: the multipart boundary.
    :param head: the form fields and the file part's headers.
    :param tail: the closing boundary.
    """

    boundary: str
    head: bytes
    tail: bytes

    @property
    def content_type(self) -> str:
        """Return the request's Content-Type header."""
        return f"multipart/form-data; boundary={self.boundary}"

    def headers(self, size: int | None) -> dict[str, str]:
        """Return the upload's headers for a file of ``size`` bytes; an unknown size goes chunked."""
        headers = {"Content-Type": self.content_type}
        if size is not None:
            headers["Content-Length"] = str(len(self.head) + size + len(self.tail))
        return headers

    def body(self, handle: IO[bytes]) -> Iterator[bytes]:
        """Yield the whole body: the form fields, the file read in chunks, the closing boundary."""
        yield self.head
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk
        yield self.tail


def _form_quote(value: str) -> str:
    # As browsers (and httpx) do: escape what would end the quoted string.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart_layout(
    fields: Mapping[str, str], *, filename: str, boundary: str | None = None
) -> MultipartLayout:
    """
    Return the multipart framing of an upload: the form ``fields`` first, then the file as ``file``.

    :param fields: plain form fields (``purpose``).
    :param filename: the file name sent to the vendor.
    :param boundary: a fixed boundary, for tests.
    """
    boundary = boundary or uuid.uuid4().hex
    head = bytearray()
    for name, value in fields.items():
        head += f'--{boundary}\r\nContent-Disposition: form-data; name="{_form_quote(name)}"\r\n\r\n'.encode()
        head += f"{value}\r\n".encode()
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_form_quote(filename)}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return MultipartLayout(boundary=boundary, head=bytes(head), tail=f"\r\n--{boundary}--\r\n".encode())


def source_name(source: object, default: str = "input.jsonl") -> str:
    """Return the file name to upload a source under: its base name, else ``default``."""
    if isinstance(source, str | os.PathLike):
        return os.path.basename(os.fspath(source)) or default
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return os.path.basename(name) or default
    return default
