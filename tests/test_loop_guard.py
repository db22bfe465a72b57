"""
The loop guard of ``tests/conftest.py`` catches the blocking call itself, wherever it hides.

Every "never blocks the loop" assertion of the suite rests on it, so it is shown to fail on each kind of
blocking call it claims to see, and to stay quiet on what does not block the loop.

The guard raises an ``AssertionError`` (``BlockingCallError``) naming each call and where it was made.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    """A loopback socket that accepts connections (the kernel completes the handshake)."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        yield server.getsockname()
    finally:
        server.close()


def read_file_on_the_loop(path: Path, address: tuple[str, int]) -> None:
    path.read_text()


def connect_on_the_loop(path: Path, address: tuple[str, int]) -> None:
    socket.create_connection(address, timeout=5).close()


def resolve_on_the_loop(path: Path, address: tuple[str, int]) -> None:
    socket.getaddrinfo("localhost", 80)


def list_dir_on_the_loop(path: Path, address: tuple[str, int]) -> None:
    list(path.parent.iterdir())


# the blocking call -> how the guard names it (the call, its arguments, and the caller)
BLOCKING = {
    "open": (read_file_on_the_loop, r"open\('.*probe\.txt', 'r'\) at .*read_file_on_the_loop"),
    "connect": (connect_on_the_loop, r"socket\.connect\(\('127\.0\.0\.1', \d+\)\) at .*connect_on_the_loop"),
    "getaddrinfo": (resolve_on_the_loop, r"socket\.getaddrinfo\('localhost', 80\) at .*resolve_on_the_loop"),
    "listdir": (list_dir_on_the_loop, r"os\.(listdir|scandir)\(.*list_dir_on_the_loop"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", BLOCKING)
async def test_a_blocking_call_in_a_coroutine_is_caught_and_named(
    loop_guard: Any, tmp_path: Path, listener: tuple[str, int], kind: str
) -> None:
    blocking, named = BLOCKING[kind]
    path = tmp_path / "probe.txt"
    path.write_text("x")

    async def careless() -> None:
        await asyncio.sleep(0)
        blocking(path, listener)

    with pytest.raises(AssertionError, match=named), loop_guard.watch():
        await asyncio.gather(careless(), asyncio.sleep(0))


@pytest.mark.asyncio
async def test_a_sync_http_client_on_the_loop_is_caught(loop_guard: Any, emulator) -> None:
    with pytest.raises(AssertionError, match=r"socket\.connect.*_client\.py"), loop_guard.watch():
        httpx.get(emulator.base_url("openai") + "/batches")


def test_the_guard_watches_a_loop_started_with_asyncio_run(loop_guard: Any, tmp_path: Path) -> None:
    path = tmp_path / "probe.txt"
    path.write_text("x")

    async def careless() -> str:
        return path.read_text()

    def before_and_in_the_loop() -> None:
        path.read_text()  # before the loop runs: the thread is no loop's yet, so this one is free
        asyncio.run(careless())

    with pytest.raises(AssertionError, match=r"^1 blocking call\(s\)[^$]* careless"), loop_guard.watch():
        before_and_in_the_loop()


@pytest.mark.asyncio
async def test_what_does_not_block_the_loop_passes(
    loop_guard: Any, tmp_path: Path, listener: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "probe.txt"
    path.write_text("x")
    (tmp_path / "fresh_module_for_the_guard.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with loop_guard.watch() as caught:
        # Off the loop's thread: the executor's workers may block.
        assert await asyncio.to_thread(path.read_text) == "x"
        await asyncio.to_thread(connect_on_the_loop, path, listener)
        # asyncio's own sockets are non-blocking, and its name look-ups run in the executor.
        _, writer = await asyncio.open_connection("localhost", listener[1])
        writer.close()
        await writer.wait_closed()
        # A module's first import reads its file: the import system is left out.
        import fresh_module_for_the_guard  # noqa: F401

    assert caught == []
    sys.modules.pop("fresh_module_for_the_guard", None)
    path.read_text()  # no longer watched


@pytest.mark.asyncio
async def test_other_threads_running_loops_are_not_watched(loop_guard: Any, tmp_path: Path) -> None:
    path = tmp_path / "probe.txt"
    path.write_text("x")

    async def careless_elsewhere() -> str:
        return path.read_text()

    with loop_guard.watch() as caught:
        # Another thread's loop (as the in-process emulator's server runs) is not the loop under test.
        assert await asyncio.to_thread(asyncio.run, careless_elsewhere()) == "x"
    assert caught == []
