"""
One shared client per (event loop, origin, timeout), reference-counted.

The shared client is an ``httpx.AsyncClient`` for streamed uploads and downloads, plus a
:class:`~airflow_provider_llmbatch.hooks._http11.LeanPool` for the small JSON calls (polls, cancels,
listings), unless the environment routes the origin through a proxy.

The triggerer runs every trigger in one event loop; a thousand triggers polling one vendor share one
connection pool here instead of opening a thousand. Clients hold no credentials: the API key travels
per request, so hooks of different connections can share a pool safely. A client closes when its last
user releases it; the registry is keyed weakly by loop, so a loop that goes away takes its entries along.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from airflow_provider_llmbatch.hooks._http11 import LeanPool, proxied, ssl_context

PoolKey = tuple[str, float]
"""(origin, timeout seconds)."""

SHARDS = 8
"""Connection pools one shared client spreads its requests over."""

CONNECTIONS_PER_SHARD = 8
"""Connections of each shard; all of them may stay open while idle."""

MAX_CONNECTIONS = SHARDS * CONNECTIONS_PER_SHARD
"""Connections one shared client opens at most (per loop and origin): the polls it can have in flight."""


@dataclass
class SharedClient:
    """
    What the hooks on one loop share for one origin.

    :param http: the ``httpx`` client (streams, and everything when ``lean`` is None).
    :param lean: the lean keep-alive pool for small JSON calls, or None (proxied origin, test transport).
    """

    http: httpx.AsyncClient
    lean: LeanPool | None = None

    async def aclose(self) -> None:
        """Close both clients."""
        try:
            if self.lean is not None:
                await self.lean.aclose()
        finally:
            await self.http.aclose()


@dataclass
class _Entry:
    ready: asyncio.Future[SharedClient]
    refs: int = 0


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[PoolKey, _Entry]] = (
    weakref.WeakKeyDictionary()
)
# Loops of different threads may touch the registry at once; the lock guards only dict operations.
_LOCK = threading.Lock()


class _CountedStream(httpx.AsyncByteStream):
    """A response body that tells its shard when it is closed, so the shard's load is known."""

    def __init__(self, stream: httpx.AsyncByteStream, done: Callable[[], None]) -> None:
        self._stream = stream
        self._done: Callable[[], None] | None = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class _ShardedTransport(httpx.AsyncBaseTransport):
    """
    Several small connection pools behind one transport; each request goes to the least busy one.

    httpcore's pool does work proportional to (connections x connections) on every request it
    assigns, so one pool of many connections costs the event loop milliseconds per poll under load;
    a few pools of a few connections each carry the same concurrency for a small fraction of that.
    Every shard keeps all its connections alive while idle: httpcore counts busy connections against
    the keep-alive limit too, and a lower limit closes connections the next poll has to reopen.
    """

    def __init__(self, shards: int, connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._shards = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(shards)]
        self._busy = [0] * shards

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self._shards)), key=self._busy.__getitem__)
        self._busy[index] += 1

        def done() -> None:
            self._busy[index] -= 1

        try:
            response = await self._shards[index].handle_async_request(request)
        except BaseException:
            done()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _CountedStream(response.stream, done)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


def _new_client(timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        transport=_ShardedTransport(SHARDS, CONNECTIONS_PER_SHARD),
        follow_redirects=False,
    )


def _new_lean(origin: str, timeout: float) -> LeanPool | None:
    """Return the lean pool for ``origin``, or None where only httpx applies (a proxy, another scheme)."""
    if not origin.startswith(("http://", "https://")) or proxied(origin):
        return None
    context = ssl_context() if origin.startswith("https://") else None
    return LeanPool(origin, timeout, MAX_CONNECTIONS, context)


def _new_shared(key: PoolKey) -> SharedClient:
    origin, timeout = key
    lean = _new_lean(origin, timeout)
    return SharedClient(http=_new_client(timeout), lean=lean)


async def acquire(key: PoolKey) -> SharedClient:
    """
    Return the shared client for ``key`` on the running loop, creating it on first use.

    :param key: the pool key (origin, timeout).
    """
    loop = asyncio.get_running_loop()
    with _LOCK:
        entries = _POOLS.setdefault(loop, {})
        entry = entries.get(key)
        creator = entry is None
        if entry is None:
            entry = entries[key] = _Entry(ready=loop.create_future())
        entry.refs += 1
    if creator:
        try:
            # Building a client loads the CA bundle from disk: keep that file read off the loop.
            client = await asyncio.to_thread(_new_shared, key)
        except BaseException as exc:
            with _LOCK:
                if entries.get(key) is entry:
                    del entries[key]
            if not entry.ready.done():
                if isinstance(exc, Exception):
                    entry.ready.set_exception(exc)
                    entry.ready.exception()  # mark retrieved: the creator re-raises it below
                else:
                    entry.ready.cancel()
            raise
        entry.ready.set_result(client)
    return await asyncio.shield(entry.ready)


async def release(loop: asyncio.AbstractEventLoop, key: PoolKey) -> None:
    """
    Give back one reference to a shared client; close it when it was the last.

    :param loop: the loop the client was acquired on.
    :param key: the pool key.
    """
    with _LOCK:
        entries = _POOLS.get(loop)
        entry = entries.get(key) if entries is not None else None
        if entry is None or entries is None:
            return
        entry.refs -= 1
        last = entry.refs <= 0
        if last:
            del entries[key]
    if last and entry.ready.done() and not entry.ready.cancelled() and entry.ready.exception() is None:
        client = entry.ready.result()
        running = _running_loop()
        if running is loop:
            await client.aclose()
        # From another loop the client cannot be closed cleanly; its sockets go with the garbage.


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def shared_clients(loop: asyncio.AbstractEventLoop | None = None) -> dict[PoolKey, int]:
    """Return the shared clients on ``loop`` (default: the running one) and their reference counts."""
    loop = loop or asyncio.get_running_loop()
    with _LOCK:
        return {key: entry.refs for key, entry in _POOLS.get(loop, {}).items()}
