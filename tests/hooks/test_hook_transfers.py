"""Uploads and downloads on the sync face: every source and destination kind, streamed, repeated safely."""

from __future__ import annotations

import functools
import io
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hookmock import Broken, Script, file_json, ok

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    InvalidInputError,
    NotFoundError,
    ServerError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook

CONTENT = b"".join(b'{"custom_id": "r%d", "response": {}}\n' % i for i in range(2000))


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(b'{"custom_id": "r%d"}\n' % i for i in range(1000)))
    return path


def form_file(body: bytes) -> bytes:
    marker = b"Content-Type: application/octet-stream\r\n\r\n"
    return body[body.index(marker) + len(marker) : body.rindex(b"\r\n--")]


class Pipe(io.RawIOBase):
    """A non-seekable binary stream."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class Storage:
    """Like ObjectStoragePath for reading, but without a size: ``stat()`` is not there."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, mode: str) -> Any:
        return self.path.open(mode)


def _source(kind: str, path: Path) -> Any:
    if kind == "path":
        return str(path)
    if kind == "fileobj":
        return path.open("rb")
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(f"file://{path}")


# -- upload -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "fileobj", "storage"])
def test_upload_streams_each_source_kind(
    kind: str, mock_hook: Callable[..., BatchHook], script: Script, request_file: Path
) -> None:
    size = request_file.stat().st_size
    script.on("POST", "/files", lambda r: ok(file_json("file-1", "requests.jsonl", size)))
    source = _source(kind, request_file)
    assert mock_hook().upload_file(source, filename="requests.jsonl").id == "file-1"
    request, body = script.requests[0], script.bodies[0]
    assert request.headers["content-length"] == str(len(body))
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert form_file(body) == request_file.read_bytes()
    assert b'name="purpose"\r\n\r\nbatch\r\n' in body
    if kind == "fileobj":
        source.close()


def test_upload_of_unknown_effect_is_found_not_repeated(
    mock_hook: Callable[..., BatchHook], script: Script, request_file: Path
) -> None:
    size, now = request_file.stat().st_size, time.time()
    script.on("POST", "/files", ok({}, 502))
    listed = [
        file_json("file-old", "requests.jsonl", size, created=now - 3600),
        file_json("file-other-size", "requests.jsonl", size + 1, created=now),
        file_json("file-mine", "requests.jsonl", size, created=now),
    ]
    script.on("GET", "/files", ok({"data": listed, "has_more": False}))
    assert mock_hook().upload_file(request_file).id == "file-mine"
    assert script.calls("POST", "/files") == 1


def test_upload_repeated_when_not_found_rewinds_the_source(
    mock_hook: Callable[..., BatchHook], script: Script, request_file: Path
) -> None:
    size = request_file.stat().st_size
    timeout = lambda r: httpx.ReadTimeout("timed out", request=r)  # noqa: E731
    script.on("POST", "/files", timeout, lambda r: ok(file_json("file-2", "requests.jsonl", size)))
    script.on("GET", "/files", ok({"data": None}))
    with request_file.open("rb") as handle:
        handle.read(10)  # uploads read from the current position
        assert mock_hook().upload_file(handle, filename="x.jsonl").id == "file-2"
    first, second = script.sent("POST")
    assert form_file(first) == form_file(second) == request_file.read_bytes()[10:]


@pytest.mark.parametrize(
    ("source", "answer"),
    [
        (lambda path: Pipe(b"abc"), lambda r: httpx.ConnectError("refused", request=r)),
        (Storage, ok({}, 502)),
    ],
    ids=["non-seekable-after-connect-error", "unknown-size-after-502"],
)
def test_upload_that_cannot_be_repeated_or_looked_up_is_not_repeated(
    source: Callable[[Path], Any],
    answer: Any,
    mock_hook: Callable[..., BatchHook],
    script: Script,
    request_file: Path,
) -> None:
    # A pipe cannot be read twice; a file of unknown size cannot be told apart in a listing, so an
    # upload of unknown effect must not be blindly repeated (it may be stored already).
    script.on("POST", "/files", answer, ok(file_json("f", "x.jsonl", 3)))
    with pytest.raises((APIConnectionError, ServerError)):
        mock_hook().upload_file(source(request_file), filename="x.jsonl")
    assert script.calls("POST", "/files") == 1
    assert script.calls("GET", "/files") == 0


def test_unknown_size_uploads_go_chunked(
    mock_hook: Callable[..., BatchHook], script: Script, request_file: Path
) -> None:
    script.on("POST", "/files", ok(file_json("f", "x.jsonl", 3)))
    mock_hook().upload_file(Storage(request_file), filename="x.jsonl")
    assert "content-length" not in script.requests[0].headers
    assert script.requests[0].headers["transfer-encoding"] == "chunked"
    assert form_file(script.bodies[0]) == request_file.read_bytes()


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_text_mode_files_are_refused(
    direction: str, mock_hook: Callable[..., BatchHook], script: Script, request_file: Path
) -> None:
    hook = mock_hook()
    transfer = hook.upload_file if direction == "upload" else functools.partial(hook.download_file, "f1")
    with request_file.open("r+") as handle, pytest.raises(InvalidInputError, match="binary mode"):
        transfer(handle)
    assert script.requests == []


# -- download ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "fileobj", "storage"])
def test_download_restarts_after_a_reset(
    kind: str, mock_hook: Callable[..., BatchHook], script: Script, tmp_path: Path
) -> None:
    script.on(
        "GET",
        "/files/f1/content",
        httpx.Response(200, stream=Broken(CONTENT[:5000])),
        httpx.Response(200, content=CONTENT),
    )
    target = tmp_path / "sub" / "out.jsonl"
    handle = None
    if kind == "path":
        destination: Any = target
    elif kind == "fileobj":
        target.parent.mkdir()
        handle = target.open("wb")
        handle.write(b"HEADER\n")
        destination = handle
    else:
        from airflow.sdk import ObjectStoragePath

        destination = ObjectStoragePath(f"file://{target}")
    written = mock_hook().download_file("f1", destination)
    if handle is not None:
        handle.close()
        assert target.read_bytes() == b"HEADER\n" + CONTENT
    else:
        assert target.read_bytes() == CONTENT
        assert sorted(p.name for p in target.parent.iterdir()) == ["out.jsonl"]
    assert written == len(CONTENT)


def test_download_of_another_size_than_listed_is_retried_then_refused(
    mock_hook: Callable[..., BatchHook], script: Script, tmp_path: Path
) -> None:
    # A proxy's own 200 page instead of the file: only the size the vendor lists tells it apart.
    script.on("GET", "/files/f1/content", httpx.Response(200, content=b"<html>login</html>"))
    target = tmp_path / "out.jsonl"
    with pytest.raises(
        APIConnectionError, match=f"the download has 18 bytes, the vendor lists the file at {len(CONTENT)}"
    ):
        mock_hook().download_file("f1", target, expected_bytes=len(CONTENT))
    assert list(tmp_path.iterdir()) == []
    assert script.calls("GET", "/files/f1/content") == 4
    script.on(
        "GET",
        "/files/f1/content",
        httpx.Response(200, content=b"short"),
        httpx.Response(200, content=CONTENT),
    )
    assert mock_hook().download_file("f1", target, expected_bytes=len(CONTENT)) == len(CONTENT)
    assert target.read_bytes() == CONTENT


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (lambda r: httpx.Response(200, stream=Broken(b"partial")), APIConnectionError),
        (httpx.Response(404, json={"error": {"message": "no such file"}}), NotFoundError),
    ],
    ids=["broken-every-time", "404"],
)
def test_failed_download_keeps_what_was_there(
    answer: Any, error: type[Exception], mock_hook: Callable[..., BatchHook], script: Script, tmp_path: Path
) -> None:
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"previous")
    script.on("GET", "/files/f1/content", answer)
    with pytest.raises(error):
        mock_hook().download_file("f1", target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_download_into_a_pipe_is_not_restarted_once_written(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    class Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def write(self, data: Any) -> int:
            self.data += data
            return len(data)

    script.on("GET", "/files/f1/content", lambda r: httpx.Response(200, stream=Broken(b"partial")))
    sink = Sink()
    with pytest.raises(APIConnectionError):
        mock_hook().download_file("f1", sink)  # type: ignore[arg-type]
    assert script.calls("GET", "/files/f1/content") == 1
    assert bytes(sink.data) == b"partial"


# -- memory stays flat ----------------------------------------------------------------------------------


class Zeros(httpx.SyncByteStream):
    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[bytes]:
        chunk = b"0" * 65536
        for _ in range(self.size // len(chunk)):
            yield chunk


class CountingTransport(httpx.BaseTransport):
    """Consume uploads chunk by chunk (MockTransport would read them whole) and serve a large download."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.received = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            for chunk in request.stream:  # type: ignore[union-attr]
                self.received += len(chunk)
            return ok(file_json("big", "big.jsonl", 0))
        return httpx.Response(200, headers={"content-length": str(self.size)}, stream=Zeros(self.size))


def test_large_transfers_stream(transport_hook: Callable[..., BatchHook], tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    big = tmp_path / "big.jsonl"
    with big.open("wb") as handle:
        handle.truncate(size)  # sparse: fast to make, 64 MB to read
    transport = CountingTransport(size)
    hook = transport_hook(transport)
    out = tmp_path / "out.jsonl"
    tracemalloc.start()
    try:
        hook.upload_file(big)
        written = hook.download_file("big", out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert transport.received > size
    assert written == size == os.path.getsize(out)
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak} bytes for a {size}-byte transfer"
