"""
One shared ``httpx.AsyncClient`` per (event loop, origin, timeout), reference-counted.

The triggerer runs every trigger in one event loop; a thousand triggers polling one vendor share one
connection pool here instead of opening a thousand. Clients hold no credentials: the API key travels
per request, so hooks of different connections can share a pool safely. A client closes when its last
user releases it; the registry is keyed weakly by loop, so a loop that goes away takes its entries along.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass

import httpx

PoolKey = tuple[str, float]
"""(origin, timeout seconds)."""

MAX_CONNECTIONS = 100
"""Connections one shared client opens at most (per loop and origin); more requests queue for one."""

MAX_KEEPALIVE = MAX_CONNECTIONS
"""
Idle connections kept open; equal to ``MAX_CONNECTIONS`` on purpose.

httpcore counts every pooled connection, busy or idle, against the keep-alive limit: with fewer
keep-alive slots than connections, each response past the limit closes a connection the next poll
has to reopen, and a burst of polls turns into a storm of reconnects that stalls the loop.
"""


@dataclass
class _Entry:
    ready: asyncio.Future[httpx.AsyncClient]
    refs: int = 0


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[PoolKey, _Entry]] = (
    weakref.WeakKeyDictionary()
)
# Loops of different threads may touch the registry at once; the lock guards only dict operations.
_LOCK = threading.Lock()


def _new_client(timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE),
        follow_redirects=False,
    )


async def acquire(key: PoolKey) -> httpx.AsyncClient:
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
            client = await asyncio.to_thread(_new_client, key[1])
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
