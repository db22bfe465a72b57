"""
Small real servers on loopback for the transport tests: a scripted HTTP/1.1 server and a forward proxy.

Each runs its own event loop in a thread, so the sync face (blocking in the test's thread) and the async
face (``asyncio.run`` in the test's thread) talk to it alike. Both record what arrived.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, urlsplit

Writer = asyncio.StreamWriter
Respond = Callable[[Writer], Awaitable[None]]
"""A custom answer: writes what it likes; the connection closes after it."""
Answer = bytes | Respond
Handler = Callable[["Received"], Answer]

_WAIT = 10.0  # seconds any start or stop may take: a bound, never a measurement


@dataclass
class Received:
    """One request as it arrived: request line, headers (lower-case names), body."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """Read a request head; return method, target and headers."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    line, *fields = head[:-4].split("\r\n")
    method, target, _ = line.split(" ", 2)
    headers = {}
    for item in fields:
        name, _, value = item.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def read_request(reader: asyncio.StreamReader) -> Received:
    """Read one whole request (bodies by Content-Length)."""
    method, target, headers = await read_head(reader)
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return Received(method, target, headers, body)


def response(status: int, body: bytes = b"", *headers: str, reason: str = "Whatever") -> bytes:
    """Return a whole HTTP/1.1 answer with a Content-Length."""
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


class ThreadedServer:
    """Serve ``serve(reader, writer)`` per connection on 127.0.0.1 from a loop in a background thread."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="loopback", daemon=True)

    async def serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        raise NotImplementedError

    async def _connection(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    def start(self) -> Self:
        self._thread.start()
        start = asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=self.context)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(_WAIT)
        return self

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(_WAIT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_WAIT)
        self._loop.close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def origin(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"


class Vendor(ThreadedServer):
    """
    A scripted vendor: ``handler(request)`` gives the answer, bytes (the connection stays open) or a
    coroutine function that writes its own (the connection closes after it). Records every request.
    """

    def __init__(self, handler: Handler, context: ssl.SSLContext | None = None) -> None:
        super().__init__(context)
        self.handler = handler
        self.requests: list[Received] = []

    async def serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        while True:
            request = await read_request(reader)
            self.requests.append(request)
            answer = self.handler(request)
            if not isinstance(answer, bytes):
                await answer(writer)
                return
            writer.write(answer)
            await writer.drain()


@contextlib.contextmanager
def serving(handler: Handler, context: ssl.SSLContext | None = None) -> Iterator[Vendor]:
    """Serve ``handler`` as a :class:`Vendor` on loopback for the block; stop it after."""
    server = Vendor(handler, context).start()
    try:
        yield server
    finally:
        server.stop()


class ForwardProxy(ThreadedServer):
    """
    A forward proxy: absolute-form requests are relayed (one per connection), ``CONNECT`` is tunnelled.

    :param credentials: ``user:password`` it demands in ``Proxy-Authorization`` (407 without).
    """

    def __init__(self, credentials: str | None = None) -> None:
        super().__init__()
        self.credentials = credentials
        self.seen: list[Received] = []

    async def serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        method, target, headers = await read_head(reader)
        self.seen.append(Received(method, target, headers))
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if headers.get("proxy-authorization") != expected:
                writer.write(response(407, b"", "Proxy-Authenticate: Basic", "Connection: close"))
                await writer.drain()
                return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await self._pipe_both(reader, writer, up_reader, up_writer)
            return
        url = urlsplit(target)
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
        kept = {k: v for k, v in headers.items() if not k.startswith("proxy-") and k != "connection"}
        head = "".join(f"{k}: {v}\r\n" for k, v in kept.items())
        origin_form = url.path + (f"?{url.query}" if url.query else "")
        up_writer.write(f"{method} {origin_form} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode() + body)
        # One request per client connection: the answer is relayed with Connection: close.
        status = await up_reader.readuntil(b"\r\n")
        answer_head = (await up_reader.readuntil(b"\r\n\r\n"))[:-2]
        lines = [h for h in answer_head.split(b"\r\n") if h and not h.lower().startswith(b"connection:")]
        writer.write(status + b"".join(h + b"\r\n" for h in lines) + b"Connection: close\r\n\r\n")
        await self._pipe(up_reader, writer)
        up_writer.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: Writer) -> None:
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()

    async def _pipe_both(
        self, reader: asyncio.StreamReader, writer: Writer, up_reader: asyncio.StreamReader, up_writer: Writer
    ) -> None:
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            up_writer.close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and localhost; return (cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Return a TLS server context for the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context
