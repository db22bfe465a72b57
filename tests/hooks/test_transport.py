"""
Both faces' transport (``hooks/transport.py``) against scripted servers on loopback, byte for byte.

What the emulator cannot answer: compressed and hostile bodies, broken or stalled answers, redirects,
TLS trust, keep-alive and the async face's shared sessions.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hookmock import FACES, MOCK_KEY, batch_json, file_json, get_batch_on
from loopback import Received, Vendor, Writer, response, self_signed, server_context

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    MalformedResponseError,
    RateLimitError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.settings import MAX_CONNECTIONS

MB = 1024 * 1024


def answer(data: Any, status: int = 200, *headers: str) -> bytes:
    return response(status, json.dumps(data).encode(), "Content-Type: application/json", *headers)


def batches(request: Received) -> bytes:
    """A vendor that knows every batch: its id is the last path segment."""
    return answer(batch_json(request.path.rsplit("/", 1)[-1], "in_progress"))


@pytest.fixture
def hook_on(connect: Callable[..., str], hooks: Callable[[BatchHook], BatchHook]) -> Callable[..., BatchHook]:
    """Return a hook on a connection to ``server`` (no retries unless asked; ``path`` after the origin)."""

    def make(
        server: Vendor, path: str = "/v1", *, extra: dict[str, Any] | None = None, **kw: Any
    ) -> BatchHook:
        conn_id = connect(host=server.origin + path, extra={"max_retries": 0, **(extra or {})}, **kw)
        return hooks(BatchHook(conn_id))

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- bodies: decoded, bounded, hostile ---------------------------------------------------------------


BATCH = json.dumps(batch_json("b1", "completed")).encode()


def chunked(data: bytes) -> bytes:
    """Frame ``data`` as two chunks, one with an extension, and a trailer."""
    half = len(data) // 2
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x;ext=1\r\n%s\r\n%x\r\n%s\r\n" % (half, data[:half], len(data) - half, data[half:])
        + b"0\r\nX-Trailer: t\r\n\r\n"
    )


ENCODED: list[tuple[str, bytes]] = [
    ("gzip", response(200, gzip.compress(BATCH), "Content-Encoding: gzip")),
    ("deflate", response(200, zlib.compress(BATCH), "Content-Encoding: deflate")),
    ("raw-deflate", response(200, zlib.compress(BATCH, wbits=-15), "Content-Encoding: deflate")),
    ("chunked", chunked(BATCH)),
    (
        "chunked-gzip",
        chunked(gzip.compress(BATCH)).replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n", 1),
    ),
]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("wire", [e[1] for e in ENCODED], ids=[e[0] for e in ENCODED])
def test_encoded_answers_are_decoded(
    face: str, wire: bytes, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    server = vendor_server(lambda r: wire)
    hook = hook_on(server)
    assert get_batch_on(face, hook, "b1").status == "completed"
    assert "gzip" in server.requests[0].headers.get("accept-encoding", "")


def gzip_bomb(megabytes: int) -> bytes:
    """Return a valid gzip stream of ``megabytes`` MB of zeros, about 1 KB per MB, built in a blink."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MB)
    # A full flush resets the compressor, so every later megabyte compresses to the same bytes.
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush()[:-8]
    crc = 0
    for _ in range(megabytes):
        crc = zlib.crc32(zeros, crc)
    return first + block * (megabytes - 1) + end + struct.pack("<II", crc, (megabytes * MB) & 0xFFFFFFFF)


BOMB_MB = 1024


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = gzip_bomb(BOMB_MB)
    assert len(zlib.decompressobj(31).decompress(data[:4096])) > 1 * MB  # it is a bomb
    return data


def test_gzip_bomb_helper_is_valid_gzip() -> None:
    assert gzip.decompress(gzip_bomb(3)) == bytes(3 * MB)


@pytest.mark.parametrize("face", FACES)
def test_gzip_bomb_is_refused_without_inflating_it(
    face: str, bomb: bytes, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    async def send(writer: Writer) -> None:
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n".encode()
        )
        view = memoryview(bomb)
        for start in range(0, len(bomb), 65536):
            writer.write(view[start : start + 65536])
            await writer.drain()

    hook = hook_on(vendor_server(lambda r: send))
    tracemalloc.start()
    try:
        with pytest.raises(MalformedResponseError, match=f"larger than {transport.MAX_BODY_BYTES} bytes"):
            get_batch_on(face, hook, "b1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Inflated whole it is 1 GB; read up to the cap it is the cap and a decoded chunk or two (httpx
    # inflates each socket read whole: one 64 KB read of this bomb is 64 MB).
    assert peak < 8 * transport.MAX_BODY_BYTES < BOMB_MB * MB, f"peak traced memory {peak // MB} MB"


@pytest.mark.parametrize("face", FACES)
def test_401_with_a_huge_body_stays_an_authentication_error(
    face: str, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    size = 50 * MB
    sent = {"all": False}

    async def send(writer: Writer) -> None:
        writer.write(f"HTTP/1.1 401 Unauthorized\r\nContent-Length: {size}\r\n\r\n".encode())
        writer.write(b'{"error": {"message": "bad key", "code": "invalid_api_key"}' + b" " * 65536)
        chunk = b" " * MB
        for _ in range(size // MB):
            writer.write(chunk)
            await writer.drain()
        sent["all"] = True

    with pytest.raises(AuthenticationError) as info:
        get_batch_on(face, hook_on(vendor_server(lambda r: send)), "b1")
    assert info.value.status_code == 401
    # The client stopped reading after the error's head: 50 MB never fit in the socket buffers.
    assert not sent["all"]


@pytest.mark.parametrize("face", FACES)
def test_redirects_are_not_followed(
    face: str, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    elsewhere = json.dumps(batch_json("b1", "completed")).encode()
    server = vendor_server(
        lambda r: (
            response(200, elsewhere) if r.path == "/elsewhere" else response(302, b"", "Location: /elsewhere")
        )
    )
    with pytest.raises(VendorAPIError) as info:
        get_batch_on(face, hook_on(server), "b1")
    assert type(info.value) is VendorAPIError
    assert info.value.status_code == 302
    assert [r.path for r in server.requests] == ["/v1/batches/b1"]


@pytest.mark.parametrize("face", FACES)
def test_error_headers_are_read_whatever_their_case(
    face: str, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    limited = {"error": {"code": "rate_limit_exceeded", "message": "slow down"}}
    server = vendor_server(lambda r: answer(limited, 429, "retry-after: 3", "X-REQUEST-ID: rid-9"))
    with pytest.raises(RateLimitError) as info:
        get_batch_on(face, hook_on(server), "b1")
    assert (info.value.retry_after, info.value.request_id) == (3.0, "rid-9")


# -- the query of the base URL ------------------------------------------------------------------------


def mini_vendor(request: Received) -> bytes:
    """Answer every call the hook makes, a list of batches in two pages."""
    path = request.path.removeprefix("/v1")
    if path == "/batches" and request.method == "GET":
        after = request.query.get("after")
        page = [batch_json("b2")] if after else [batch_json("b1")]
        return answer({"data": page, "has_more": not after, "last_id": page[0]["id"]})
    if path == "/batches":
        return answer(batch_json("b-new", input_file_id="f1", metadata=json.loads(request.body)["metadata"]))
    if path.startswith("/batches/"):
        return answer(batch_json(path.split("/")[2], "cancelling"))
    if path == "/files/f1/content":
        return response(200, b'{"custom_id": "r1"}\n')
    if path == "/files/f1" and request.method == "DELETE":
        return answer({"id": "f1", "deleted": True})
    return answer(file_json("f1", "in.jsonl", 3))


@pytest.mark.parametrize("face", FACES)
def test_base_url_query_goes_with_every_call(
    face: str, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook], tmp_path: Path
) -> None:
    server = vendor_server(mini_vendor)
    hook = hook_on(server, "/v1?api-version=1")
    if face == "sync":
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"{}\n")
        hook.get_batch("b1")
        assert [b.id for b in hook.list_batches(page_size=1)] == ["b1", "b2"]
        hook.cancel_batch("b1")
        hook.upload_file(source)
        hook.create_batch(input_file_id="f1")
        hook.download_file("f1", tmp_path / "out.jsonl")
        hook.delete_file("f1")
        expected = 8
    else:

        async def main() -> None:
            await hook.aget_batch("b1")
            await hook.acancel_batch("b1")
            await hook.aclose()

        asyncio.run(main())
        expected = 2
    assert len(server.requests) == expected
    assert all(r.query.get("api-version") == ["1"] for r in server.requests), [
        r.target for r in server.requests
    ]
    if face == "sync":
        assert server.requests[2].query == {"api-version": ["1"], "limit": ["1"], "after": ["b1"]}


# -- broken, stalled and refused ----------------------------------------------------------------------


BROKEN: list[tuple[str, bytes]] = [
    ("closed-without-answer", b""),
    ("short-body", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"),
    ("not-http", b"SMTP ready\r\n\r\n"),
    ("bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("wire", [b[1] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_answers_are_connection_errors_of_unknown_effect(
    face: str, wire: bytes, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    async def send(writer: Writer) -> None:
        writer.write(wire)
        await writer.drain()

    with pytest.raises(APIConnectionError) as info:
        get_batch_on(face, hook_on(vendor_server(lambda r: send)), "b1")
    assert type(info.value) is APIConnectionError
    assert info.value.effect == "unknown"
    assert info.value.operation == "get_batch"


def trickle(head: bytes, pause: float) -> Callable[[Received], Callable[[Writer], Any]]:
    """Answer with ``head``, then one body byte per ``pause`` seconds, for far longer than any test waits."""

    async def send(writer: Writer) -> None:
        writer.write(head)
        await writer.drain()
        for _ in range(100_000):
            await asyncio.sleep(pause)
            writer.write(b" ")
            await writer.drain()

    return lambda request: send


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("pause", [0.05, 60.0], ids=["trickling", "stalled"])
def test_timeout_is_a_deadline_for_the_whole_call(
    face: str, pause: float, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    # Trickling: every read returns within the timeout, and still the call must end at its deadline.
    server = vendor_server(trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{", pause))
    with pytest.raises(APITimeoutError) as info:
        get_batch_on(face, hook_on(server, extra={"timeout": 0.3}), "b1")
    assert info.value.effect == "unknown"


@pytest.mark.parametrize("face", FACES)
def test_connection_refused_was_not_sent(
    face: str, connect: Callable[..., str], hooks: Callable[[BatchHook], BatchHook]
) -> None:
    hook = hooks(BatchHook(connect(host=f"http://127.0.0.1:{free_port()}/v1", extra={"max_retries": 0})))
    with pytest.raises(APIConnectionError) as info:
        get_batch_on(face, hook, "b1")
    assert info.value.effect == "not_sent"
    assert MOCK_KEY not in str(info.value)


# -- TLS ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
def test_tls_trusts_ssl_cert_file_on_both_faces(
    face: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    vendor_server: Callable[..., Vendor],
    hook_on: Callable[..., BatchHook],
) -> None:
    cert_file, key_file = self_signed(tmp_path)
    server = vendor_server(batches, context=server_context(cert_file, key_file))
    assert server.origin.startswith("https://")
    with pytest.raises(APIConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        get_batch_on(face, hook_on(server), "b1")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    assert get_batch_on(face, hook_on(server), "b1").id == "b1"


# -- connections: reused, shared on a loop, released ------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
def test_keep_alive_reuses_one_connection(
    face: str, vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    server = vendor_server(batches)
    hook = hook_on(server)
    if face == "sync":
        ids = [hook.get_batch(f"b{n}").id for n in range(5)]
    else:

        async def main() -> list[str]:
            found = [(await hook.aget_batch(f"b{n}")).id for n in range(5)]
            await hook.aclose()
            return found

        ids = asyncio.run(main())
    assert ids == [f"b{n}" for n in range(5)]
    assert server.connections == 1
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {MOCK_KEY}"}


def test_one_shared_session_per_loop_and_origin(
    vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    server = vendor_server(batches)
    other_key = "sk-another-key-0000000000"
    hooks = [hook_on(server) for _ in range(50)] + [hook_on(server, password=other_key)]

    async def main() -> tuple[dict[str, int], set[int], dict[str, int]]:
        results = await asyncio.gather(*(h.aget_batch("b1") for h in hooks))
        assert all(b.id == "b1" for b in results)
        during = transport.shared_sessions()
        sessions = {id(h._lease[2]) for h in hooks if h._lease}
        for hook in hooks:
            await hook.aclose()
        return during, sessions, transport.shared_sessions()

    during, sessions, after = asyncio.run(main())
    assert during == {server.origin: 51}
    assert len(sessions) == 1
    assert after == {}
    assert {r.headers["authorization"] for r in server.requests} == {
        f"Bearer {MOCK_KEY}",
        f"Bearer {other_key}",
    }


def test_shared_session_holds_no_key_and_closes_after_its_last_user(
    vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    server = vendor_server(batches)
    first, second = hook_on(server), hook_on(server)

    async def main() -> None:
        await first.aget_batch("b1")
        await second.aget_batch("b1")
        assert first._lease is not None
        shared = first._lease[2]
        assert await first.aslots() is await second.aslots() is shared.slots
        assert shared.slots._value == MAX_CONNECTIONS
        assert "authorization" not in {k.lower() for k in shared.session.headers}
        await first.aclose()
        assert not shared.session.closed
        async with second:
            assert (await second.aget_batch("b2")).id == "b2"
        assert shared.session.closed
        assert transport.shared_sessions() == {}

    asyncio.run(main())


def test_a_hook_used_from_a_second_loop_gets_that_loops_session(
    vendor_server: Callable[..., Vendor], hook_on: Callable[..., BatchHook]
) -> None:
    server = vendor_server(batches)
    hook = hook_on(server)

    async def use(close: bool) -> dict[str, int]:
        await hook.aget_batch("b1")
        during = transport.shared_sessions()
        if close:
            await hook.aclose()
        return during

    assert asyncio.run(use(close=False)) == {server.origin: 1}
    assert asyncio.run(use(close=True)) == {server.origin: 1}
    assert hook._lease is None
