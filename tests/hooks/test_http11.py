"""The lean HTTP/1.1 pool against a raw socket server that answers byte for byte what each test scripts."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ssl
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_llmbatch.hooks import _pool
from airflow_provider_llmbatch.hooks._http11 import (
    LeanPool,
    encode_request,
    proxied,
    request_target,
    ssl_context,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


class Server:
    """Loopback server: one handler per connection; counts connections and records requests."""

    def __init__(self, handler: Handler, context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.context = context
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def origin(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.context else 'http'}://127.0.0.1:{port}"


def keep_answering(*answers: bytes, server: list[Server]) -> Handler:
    """Answer each request on a connection with the next answer (the last one repeats)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = 0
        while True:
            request = await read_request(reader)
            server[0].requests.append(request)
            writer.write(answers[min(count, len(answers) - 1)])
            await writer.drain()
            count += 1

    return handler


def ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def with_server(answers: list[bytes], test: Callable[[Server, LeanPool], Awaitable[Any]]) -> Any:
    box: list[Server] = []
    async with Server(keep_answering(*answers, server=box)) as server:
        box.append(server)
        pool = LeanPool(server.origin, timeout=2.0, max_connections=4)
        try:
            return await test(server, pool)
        finally:
            await pool.aclose()


def test_content_length_and_keep_alive_reuse_one_connection() -> None:
    async def test(server: Server, pool: LeanPool) -> None:
        for n in range(5):
            response = await pool.request("GET", f"/v1/batches/b{n}", {"Authorization": "Bearer k"})
            assert (response.status_code, response.content) == (200, b'{"id":"b"}')
            assert response.is_success
        assert server.connections == 1
        first = server.requests[0].decode()
        assert first.startswith("GET /v1/batches/b0 HTTP/1.1\r\n")
        assert f"\r\nHost: {server.origin.split('://')[1]}\r\n" in first
        assert "\r\nAuthorization: Bearer k\r\n" in first

    asyncio.run(with_server([ok(b'{"id":"b"}')], test))


def test_chunked_body_with_extensions_and_trailers() -> None:
    body = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;ext=1\r\n{"a"\r\n5\r\n:12}\n\r\n0\r\nX-Trailer: t\r\n\r\n'
    )

    async def test(server: Server, pool: LeanPool) -> None:
        for _ in range(2):
            response = await pool.request("GET", "/x", {})
            assert response.content == b'{"a":12}\n'
        assert server.connections == 1  # a chunked body ends cleanly: the connection is reused

    asyncio.run(with_server([body], test))


def test_body_until_close_and_connection_close_are_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"to":"eof"}')
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = LeanPool(server.origin, timeout=2.0, max_connections=2)
            for _ in range(3):
                response = await pool.request("GET", "/x", {})
                assert response.content == b'{"to":"eof"}'
            assert server.connections == 3
            assert pool.connections == 0
            await pool.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-15)),
    ],
)
def test_compressed_bodies_are_decoded(encoding: str, encode: Callable[[bytes], bytes]) -> None:
    payload = b'{"status":"in_progress"}' * 10

    async def test(server: Server, pool: LeanPool) -> None:
        response = await pool.request("GET", "/x", {})
        assert response.content == payload
        assert "\r\nAccept-Encoding: gzip, deflate\r\n" in server.requests[0].decode()

    asyncio.run(with_server([ok(encode(payload), f"Content-Encoding: {encoding}")], test))


def test_informational_answers_before_the_final_one_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"{}")

    async def test(server: Server, pool: LeanPool) -> None:
        assert (await pool.request("POST", "/x", {})).status_code == 200
        assert b"\r\nContent-Length: 0\r\n" in server.requests[0]

    asyncio.run(with_server([answer], test))


def test_error_status_reason_and_headers_are_returned_case_insensitively() -> None:
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\nX-Request-Id: r1\r\nContent-Length: 2\r\n\r\n{}"
    )

    async def test(server: Server, pool: LeanPool) -> None:
        response = await pool.request("GET", "/x", {})
        assert (response.status_code, response.reason_phrase, response.is_success) == (
            429,
            "Too Many Requests",
            False,
        )
        assert response.headers["Retry-After"] == "3"
        assert response.headers["x-request-id"] == "r1"

    asyncio.run(with_server([answer], test))


@pytest.mark.parametrize(
    ("answer", "error", "text"),
    [
        (b"", httpx.RemoteProtocolError, "without sending a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", httpx.RemoteProtocolError, "complete message"),
        (b"SMTP ready\r\n\r\n", httpx.RemoteProtocolError, "status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", httpx.RemoteProtocolError, "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", httpx.RemoteProtocolError, "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", httpx.RemoteProtocolError, "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", httpx.RemoteProtocolError, "chunk"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
            httpx.DecodingError,
            "br",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}",
            httpx.DecodingError,
            "gzip",
        ),
    ],
)
def test_broken_answers_raise_httpx_transport_errors(
    answer: bytes, error: type[Exception], text: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = LeanPool(server.origin, timeout=2.0, max_connections=2)
            with pytest.raises(error, match=text):
                await pool.request("GET", "/x", {})
            assert pool.connections == 0  # a broken exchange never goes back to the pool
            await pool.aclose()

    asyncio.run(main())


def test_a_stalled_answer_times_out_and_the_connection_is_dropped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        async with Server(handler) as server:
            pool = LeanPool(server.origin, timeout=0.2, max_connections=2)
            with pytest.raises(httpx.ReadTimeout):
                await pool.request("GET", "/x", {})
            assert pool.connections == 0
            await pool.aclose()

    asyncio.run(main())


def test_connect_failures_are_connect_errors() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        pool = LeanPool(f"http://127.0.0.1:{port}", timeout=1.0, max_connections=1)
        with pytest.raises(httpx.ConnectError):
            await pool.request("GET", "/x", {})
        await pool.aclose()

    asyncio.run(main())


def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"{}"))
        await writer.drain()  # then the connection closes: an idle timeout on the server's side

    async def main() -> None:
        async with Server(handler) as server:
            pool = LeanPool(server.origin, timeout=1.0, max_connections=1)
            await pool.request("GET", "/x", {})
            await asyncio.sleep(0.1)  # the loop sees the close
            assert (await pool.request("GET", "/x", {})).status_code == 200
            assert server.connections == 2
            await pool.aclose()

    asyncio.run(main())


def test_max_connections_bounds_sockets_and_later_requests_wait() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(ok(b"{}"))
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = LeanPool(server.origin, timeout=5.0, max_connections=3)
            peak = 0

            async def one() -> None:
                nonlocal peak
                await pool.request("GET", "/x", {})
                peak = max(peak, pool.connections)

            await asyncio.gather(*(one() for _ in range(30)))
            assert server.connections == 3
            assert peak == 3
            await pool.aclose()
            assert pool.connections == 0

    asyncio.run(main())


def test_cancelling_a_request_drops_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def main() -> None:
        async with Server(handler) as server:
            pool = LeanPool(server.origin, timeout=10.0, max_connections=1)
            task = asyncio.create_task(pool.request("GET", "/x", {}))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.connections == 0
            await pool.aclose()

    asyncio.run(main())


def test_header_values_with_line_breaks_are_refused_without_echoing_them() -> None:
    secret = "sk-secret\r\nX-Injected: 1"
    with pytest.raises(httpx.LocalProtocolError) as caught:
        encode_request("GET", "/x", "h", {"Authorization": f"Bearer {secret}"}, None)
    assert "sk-secret" not in str(caught.value)
    assert "Authorization" in str(caught.value)
    with pytest.raises(httpx.LocalProtocolError):
        encode_request("GET", "/x y", "h", {}, None)


def test_request_target_keeps_the_base_path_and_encodes_the_query() -> None:
    assert request_target("https://h/api/paas/v4", "/batches/b%2F1") == "/api/paas/v4/batches/b%2F1"
    assert request_target("http://h:8080", "/files", {"purpose": "batch", "after": "a b"}) == (
        "/files?purpose=batch&after=a%20b"
    )
    assert request_target("http://h", "") == "/"


def test_proxy_environment_routes_the_origin_to_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not proxied("https://api.vendor.test")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert proxied("https://api.vendor.test")
    assert not proxied("http://api.vendor.test")
    assert _pool._new_lean("https://api.vendor.test", 5.0) is None
    monkeypatch.setenv("NO_PROXY", "api.vendor.test")
    assert not proxied("https://api.vendor.test")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def test_tls_trusts_ssl_cert_file_as_httpx_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)
    box: list[Server] = []

    async def main(context: ssl.SSLContext) -> tuple[int, int]:
        async with Server(keep_answering(ok(b"{}"), server=box), server_context) as server:
            box.append(server)
            pool = LeanPool(server.origin, timeout=5.0, max_connections=1, context=context)
            try:
                statuses = [(await pool.request("GET", "/x", {})).status_code for _ in range(3)]
                return statuses[-1], server.connections
            finally:
                await pool.aclose()

    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    assert asyncio.run(main(ssl_context())) == (200, 1)
    monkeypatch.delenv("SSL_CERT_FILE")
    box.clear()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(main(ssl_context()))
