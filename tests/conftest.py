from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

# Tests that import Airflow in this process get a private, throw-away AIRFLOW_HOME, set before anything
# imports Airflow, so the suite neither reads nor writes the machine's ~/airflow.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="llmbatch-tests-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)

pytest_plugins = ["airflow_provider_llmbatch.emulator.pytest_plugin"]

# Imported after AIRFLOW_HOME is set: these modules import Airflow.
from airflow_provider_llmbatch.emulator import Emulator  # noqa: E402
from airflow_provider_llmbatch.hooks.batch import BatchHook  # noqa: E402
from airflow_provider_llmbatch.vendors import REGISTRY  # noqa: E402


@pytest.fixture
def connect(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Point ``AIRFLOW_CONN_<ID>`` at the emulator; hook retries off so the waiter sees each failure."""

    def _connect(vendor: str, conn_id: str | None = None, *, key: str | None = None, **extra: object) -> str:
        conn_id = conn_id or f"wait_{vendor}"
        value = {
            "conn_type": REGISTRY[vendor].conn_type,
            "host": emulator.base_url(vendor),
            "password": key or emulator.api_key,
            "extra": {"max_retries": 0, **extra},
        }
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
        return conn_id

    return _connect


@pytest.fixture
def make_batch(connect: Callable[..., str], tmp_path: Path) -> Callable[..., str]:
    """Upload a small request file and create a batch; return its id."""

    def _make(vendor: str, *, requests: int = 3, metadata: dict[str, str] | None = None) -> str:
        spec = REGISTRY[vendor]
        path = tmp_path / f"{vendor}-{len(list(tmp_path.iterdir()))}.jsonl"
        with path.open("w") as handle:
            for i in range(requests):
                line = {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": spec.default_endpoint,
                    "body": {"model": "test-model", "messages": [{"role": "user", "content": f"hello {i}"}]},
                }
                handle.write(json.dumps(line) + "\n")
        with BatchHook(connect(vendor, "setup_" + vendor)) as hook:
            uploaded = hook.upload_file(str(path))
            return hook.create_batch(input_file_id=uploaded.id, metadata=metadata).id

    return _make


# -- the loop guard: catch blocking calls on an event loop's thread ----------------------------------

BLOCKING_EVENTS = frozenset(
    {
        "open",
        "os.listdir",
        "os.scandir",
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
        "os.system",
    }
)
"""
The audit events that mean a blocking call, as CPython 3.11 raises them (checked one by one).

``open`` comes from ``open()``, ``io.open``, ``os.open`` and ``pathlib``; the socket events carry the
socket, so a connect or send counts only on a blocking one (``gettimeout() != 0.0``: asyncio's own sockets
are non-blocking); name look-ups count always (the loop's ``getaddrinfo`` runs in its executor). CPython
3.11 raises no event for ``send``/``sendall``/``recv``/``accept``, ``select`` or ``time.sleep``: a sync
HTTP client on the loop is caught at its ``socket.connect``, not at each read.
"""

_SOCKET_IO = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})
_FS_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})


class BlockingCallError(AssertionError):
    """Raise when a blocking call ran on a watched event loop's thread."""


class LoopGuard:
    """
    Record every blocking call made on a watched thread while an asyncio event loop runs on it.

    One audit hook per process (``sys.addaudithook`` cannot be undone), switched on by :meth:`watch`.
    Reads of the import system (a module imported for the first time) are left out: a triggerer has its
    modules loaded long before a trigger runs.
    """

    _installed: LoopGuard | None = None

    def __init__(self) -> None:
        self._threads: dict[int, list[str]] = {}
        self._busy = threading.local()

    @classmethod
    def installed(cls) -> LoopGuard:
        """Return the process's guard, installing its audit hook on first use."""
        if cls._installed is None:
            cls._installed = cls()
            sys.addaudithook(cls._installed._audit)
        return cls._installed

    @contextmanager
    def watch(self) -> Iterator[list[str]]:
        """Watch this thread; yield the calls caught and raise :class:`BlockingCallError` naming them."""
        ident = threading.get_ident()
        caught: list[str] = []
        self._threads[ident] = caught
        try:
            yield caught
        finally:
            del self._threads[ident]
        if caught:
            raise BlockingCallError(
                f"{len(caught)} blocking call(s) on the event loop's thread:\n" + "\n".join(caught)
            )

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in BLOCKING_EVENTS or not self._threads:
            return
        caught = self._threads.get(threading.get_ident())
        if caught is None or asyncio._get_running_loop() is None or getattr(self._busy, "on", False):
            return
        self._busy.on = True  # what follows raises audit events of its own (sys._getframe)
        try:
            if event in _SOCKET_IO and args[0].gettimeout() == 0.0:
                return
            frame = sys._getframe(1)
            if event in _FS_EVENTS and _importing(frame):
                return
            # No source lines: reading them would open files, here of all places.
            stack = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=8, lookup_lines=False)
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack)
            caught.append(f"{event}{_shown(event, args)} at {where}")
        finally:
            self._busy.on = False


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _shown(event: str, args: tuple[Any, ...]) -> str:
    return f"({args[1]!r})" if event in _SOCKET_IO else repr(tuple(args[:2]))


@pytest.fixture
def loop_guard() -> LoopGuard:
    """
    Catch blocking calls on the event loop: ``with loop_guard.watch(): ...`` around the code under test.

    Run in a coroutine, or around ``asyncio.run``: only calls made while a loop runs on the watching
    thread count, so set-up in worker threads (``asyncio.to_thread``) or before the loop starts is free.
    """
    return LoopGuard.installed()
