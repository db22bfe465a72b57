"""Receive a multipart upload straight to disk, so memory does not grow with the file."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

_MAX_FIELD_BYTES = 64 * 1024


class UploadError(ValueError):
    """Raise when a request is not a well-formed multipart upload."""


class UploadAborted(Exception):
    """Raise when the client went away before its body ended: nothing was uploaded, nobody awaits a reply."""


@dataclass
class Upload:
    """
    A received upload.

    :param fields: the small form fields, decoded.
    :param filename: the ``file`` part's file name.
    :param size: bytes written to disk.
    :param has_file: whether a ``file`` part came.
    :param complete: whether the closing boundary came (without it the body is cut short).
    """

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0
    has_file: bool = False
    complete: bool = False


class _Receiver:
    def __init__(self, sink: IO[bytes], upload: Upload) -> None:
        self.sink = sink
        self.upload = upload
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.is_file = False
        self.value = bytearray()

    def on_part_begin(self) -> None:
        self.headers = {}
        self.value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = options.get(b"name", b"").decode("latin-1")
        self.is_file = self.name == "file"
        if self.is_file:
            self.upload.has_file = True
            self.upload.filename = options.get(b"filename", b"").decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.is_file:
            self.sink.write(data[start:end])
            self.upload.size += end - start
        elif len(self.value) + end - start > _MAX_FIELD_BYTES:
            raise UploadError(f"form field {self.name!r} is larger than {_MAX_FIELD_BYTES} bytes")
        else:
            self.value += data[start:end]

    def on_part_end(self) -> None:
        if not self.is_file and self.name:
            self.upload.fields[self.name] = self.value.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.upload.complete = True


# The pace's clock and sleep, as seams: a test moves them without touching asyncio's own.
monotonic = time.monotonic
sleep = asyncio.sleep


class _Pace:
    """Hold a stream to a rate: after each piece, wait until the bytes so far are due at that rate."""

    def __init__(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second
        self.started = monotonic()
        self.bytes = 0

    async def took(self, size: int) -> None:
        if self.rate is None:
            return
        self.bytes += size
        ahead = self.bytes / self.rate - (monotonic() - self.started)
        if ahead > 0:
            await sleep(ahead)


async def receive_upload(
    request: Request, destination: Path, bytes_per_second: float | None = None
) -> Upload:
    """
    Stream a ``multipart/form-data`` body: the ``file`` part to ``destination``, other parts to fields.

    With ``bytes_per_second`` the body is taken in no faster than that: while the reader waits, the
    socket's buffers fill and TCP flow control slows the sender down, as a slower link would.

    :raises UploadError: for a body that is not a complete multipart form (no closing boundary included).
    :raises UploadAborted: when the client disconnects before the body ends (what is at ``destination``
        is a fragment, never a file).
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UploadError("expected a multipart/form-data body with a boundary")
    upload = Upload()
    with destination.open("wb") as sink:
        receiver = _Receiver(sink, upload)
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": receiver.on_part_begin,
                "on_header_field": receiver.on_header_field,
                "on_header_value": receiver.on_header_value,
                "on_header_end": receiver.on_header_end,
                "on_headers_finished": receiver.on_headers_finished,
                "on_part_data": receiver.on_part_data,
                "on_part_end": receiver.on_part_end,
                "on_end": receiver.on_end,
            },
        )
        pace = _Pace(bytes_per_second)
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                await pace.took(len(chunk))
            parser.finalize()
        except FormParserError as exc:
            raise UploadError(f"malformed multipart body: {exc}") from exc
        except ClientDisconnect as exc:
            raise UploadAborted(f"the client went away after {upload.size} bytes of the file") from exc
    if not upload.complete:
        raise UploadError("malformed multipart body: it ends before its closing boundary")
    return upload
