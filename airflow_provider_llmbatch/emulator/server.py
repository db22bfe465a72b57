"""The in-process emulator: a real HTTP server on loopback, run by uvicorn in a background thread."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from airflow_provider_llmbatch.emulator import dialects
from airflow_provider_llmbatch.emulator.admin import admin_mount
from airflow_provider_llmbatch.emulator.app import TRANSPORT_SCOPE_KEY, Runtime, VendorAPI
from airflow_provider_llmbatch.emulator.config import DEFAULT_API_KEY, Clock, EmulatorConfig, OffsetClock
from airflow_provider_llmbatch.emulator.faults import (
    MAX_CLOCK_STEP,
    MAX_SECONDS,
    FaultRule,
    FaultSet,
    RateLimiter,
    check_number,
)
from airflow_provider_llmbatch.emulator.state import Store
from airflow_provider_llmbatch.emulator.vendor_dialects import emulator_prefix
from airflow_provider_llmbatch.vendors import VendorSpec

_START_TIMEOUT = 15.0


class _TransportScope:
    """Put the connection's transport in the scope, so a handler can drop the connection (reset fault)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # uvicorn's ``send`` is a bound method of the request cycle that owns the transport.
            scope[TRANSPORT_SCOPE_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await self.app(scope, receive, send)


def build_app(runtime: Runtime) -> ASGIApp:
    """Return the ASGI app serving every vendor of the runtime's config plus the control routes."""
    routes = [admin_mount(runtime), *(VendorAPI(runtime, s).mount() for s in runtime.config.vendors.values())]
    return _TransportScope(Starlette(routes=routes))


class Emulator:
    """
    The vendors' Batch APIs on loopback, for tests, demos and benchmarks.

    :param config: behaviour settings (default: :class:`EmulatorConfig`).
    :param api_key: the only key accepted (``Authorization: Bearer <key>``).
    :param host: the interface to bind (loopback by default).
    :param port: the port to bind; 0 picks a free one.
    :param clock: the base time source (default :func:`time.time`); :meth:`advance_clock` moves it on.
    :param data_dir: where files are kept (default: a fresh temporary directory, removed on stop).
    :param access_log: whether uvicorn logs each request line (never headers).
    :param log_level: uvicorn's log level.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        api_key: str = DEFAULT_API_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        data_dir: str | Path | None = None,
        access_log: bool = False,
        log_level: str = "warning",
    ) -> None:
        self.config = config or EmulatorConfig()
        self.api_key = api_key
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._access_log = access_log
        self._log_level = log_level
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="llmbatch-emulator-"))
        if self._owns_dir:
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.data_dir), True)
        self.clock = OffsetClock(clock)
        self.runtime = Runtime(
            config=self.config,
            store=Store(self.config, self.clock, self.data_dir),
            faults=FaultSet(self.config.seed),
            limiter=RateLimiter(self.config.rate_limits),
            api_key=api_key,
            clock=self.clock,
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._socket: socket.socket | None = None

    # lifecycle

    def start(self) -> Emulator:
        """Bind, serve in a background thread and return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the emulator is already running")
        if self._stopped:
            raise RuntimeError("a stopped emulator cannot be restarted; create a new one")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket = sock
        sock.bind((self.host, self._requested_port))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.runtime),
            log_config=None,
            log_level=self._log_level,
            access_log=self._access_log,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="llmbatch-emulator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the emulator did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Shut the server down and remove the data directory it owns."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            # The server may listen on this very socket object (plain asyncio does not duplicate it).
            self._socket.close()
        self._server = None
        self._thread = None
        self._socket = None
        self._stopped = True
        if self._owns_dir:
            self._cleanup()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Return True while the server thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        """Return the bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("the emulator has not been started")
        return self._port

    @property
    def url(self) -> str:
        """Return ``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def base_url(self, vendor: str) -> str:
        """Return the base URL a client of ``vendor`` uses, e.g. ``http://127.0.0.1:8765/moonshot/v1``."""
        return self.url + emulator_prefix(self._spec(vendor))

    def vendors(self) -> dict[str, str]:
        """Return every served vendor's base URL."""
        return {name: self.base_url(name) for name in self.config.vendors}

    def _spec(self, vendor: str) -> VendorSpec:
        try:
            return self.config.vendors[vendor]
        except KeyError:
            raise KeyError(f"unknown vendor {vendor!r}; served: {', '.join(self.config.vendors)}") from None

    # controls

    def reset(self) -> None:
        """Drop all files, batches, counters, faults and latency; rewind the clock offset."""
        self.runtime.reset()

    def add_fault(self, rule: FaultRule) -> None:
        """Activate a fault rule."""
        self.runtime.faults.add(rule)

    def clear_faults(self) -> None:
        """Drop every fault rule and the latency."""
        self.runtime.faults.clear()

    def set_latency(self, seconds: float) -> None:
        """Delay every vendor response by ``seconds``."""
        self.runtime.faults.latency = check_number("latency", seconds, high=MAX_SECONDS)

    def set_rate_limits(self, enabled: bool) -> None:
        """Enforce (or stop enforcing) the vendors' documented per-minute limits."""
        self.runtime.limiter.reset(enabled)

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock forward: batches jump ahead on their next read."""
        self.clock.advance(check_number("seconds", seconds, high=MAX_CLOCK_STEP))

    def force_status(self, vendor: str, batch_id: str, status: str, *, hold: bool = True) -> dict[str, Any]:
        """
        Put a batch in ``status`` now and return it as the vendor renders it.

        A terminal status writes the result files of the requests done so far. A non-terminal status
        holds the batch there (``hold=False`` lets it move on from there with the clock).
        """
        batch = self.runtime.store.force_status(vendor, batch_id, status, hold=hold)
        return dialects.render_batch(self._spec(vendor), batch)

    # inspection

    def stats(self, vendor: str | None = None) -> dict[str, Any]:
        """Return a vendor's counters, or every vendor's by name."""
        if vendor is not None:
            self._spec(vendor)
            return self.runtime.store.stats(vendor)
        return {name: self.runtime.store.stats(name) for name in self.config.vendors}

    def batches(self, vendor: str) -> list[dict[str, Any]]:
        """Return a vendor's batches, newest first, as the vendor renders them."""
        spec = self._spec(vendor)
        return [dialects.render_batch(spec, b) for b in self.runtime.store.list_batches(vendor)]

    def batch(self, vendor: str, batch_id: str) -> dict[str, Any]:
        """Return one batch as the vendor renders it; raise KeyError if unknown."""
        record = self.runtime.store.get_batch(vendor, batch_id)
        if record is None:
            raise KeyError(f"no batch {batch_id!r} at {vendor}")
        return dialects.render_batch(self._spec(vendor), record)

    def files(self, vendor: str) -> list[dict[str, Any]]:
        """Return a vendor's files, newest first, as the vendor renders them."""
        spec = self._spec(vendor)
        return [dialects.render_file(spec, f) for f in self.runtime.store.list_files(vendor)]

    def file_path(self, vendor: str, file_id: str) -> Path:
        """Return where a stored file's content is; raise KeyError if unknown."""
        record = self.runtime.store.get_file(vendor, file_id)
        if record is None:
            raise KeyError(f"no file {file_id!r} at {vendor}")
        return record.path

    # Airflow connections

    def airflow_conn_env(self, vendor: str, conn_id: str | None = None) -> dict[str, str]:
        """Return ``{"AIRFLOW_CONN_<ID>": <JSON>}`` for a connection to ``vendor`` on this emulator."""
        spec = self._spec(vendor)
        conn_id = conn_id or f"llmbatch_{vendor}"
        value = {"conn_type": spec.conn_type, "host": self.base_url(vendor), "password": self.api_key}
        return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(value)}

    def connection_uri(self, vendor: str) -> str:
        """Return an Airflow connection URI for ``vendor`` on this emulator (host percent-encoded)."""
        spec = self._spec(vendor)
        scheme = spec.conn_type.replace("_", "-")
        return f"{scheme}://:{quote(self.api_key, safe='')}@{quote(self.base_url(vendor), safe='')}"
