"""Fixtures for hook tests: env-var connections, sync hooks on scripted transports, loopback servers."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hookmock import MOCK_BASE, MOCK_KEY, Script
from loopback import Handler, Vendor

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY

_ids = itertools.count()

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the machine's proxies out of the picture: both faces read them (tests set their own)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def slept() -> list[float]:
    return []


@pytest.fixture
def policy(slept: list[float]) -> RetryPolicy:
    async def asleep(seconds: float) -> None:
        slept.append(seconds)

    return RetryPolicy(
        max_retries=3, base_delay=0.5, max_delay=4.0, rng=random.Random(7), sleep=slept.append, asleep=asleep
    )


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Set an env-var connection; return its id."""

    def _connect(
        vendor: str = "openai",
        *,
        host: str = MOCK_BASE,
        password: str = MOCK_KEY,
        extra: dict[str, Any] | None = None,
    ) -> str:
        conn_id = f"hooktest_{next(_ids)}"
        value: dict[str, Any] = {"conn_type": REGISTRY[vendor].conn_type, "host": host, "password": password}
        if extra:
            value["extra"] = extra
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
        return conn_id

    return _connect


@pytest.fixture
def hooks() -> Iterator[Callable[[BatchHook], BatchHook]]:
    """Register a hook to be closed after the test; returns it."""
    made: list[BatchHook] = []

    def keep(hook: BatchHook) -> BatchHook:
        made.append(hook)
        return hook

    yield keep
    for hook in made:
        hook.close()


@pytest.fixture
def transport_hook(
    connect: Callable[..., str], policy: RetryPolicy, hooks: Callable[[BatchHook], BatchHook]
) -> Callable[..., BatchHook]:
    """Build sync hooks whose client sends through ``transport`` (retries on the no-sleep policy)."""

    def make(transport: httpx.BaseTransport, vendor: str = "openai", **kw: Any) -> BatchHook:
        hook = hooks(BatchHook(connect(vendor, **kw), retry_policy=policy))
        hook._core()
        hook._client = httpx.Client(transport=transport)
        return hook

    return make


@pytest.fixture
def mock_hook(script: Script, transport_hook: Callable[..., BatchHook]) -> Callable[..., BatchHook]:
    """Build sync hooks whose client answers from ``script``."""

    def make(vendor: str = "openai", **kw: Any) -> BatchHook:
        return transport_hook(httpx.MockTransport(script.handler), vendor, **kw)

    return make


@pytest.fixture
def emulator_hook(
    emulator: Emulator, connect: Callable[..., str], hooks: Callable[[BatchHook], BatchHook]
) -> Callable[..., BatchHook]:
    """Build hooks on a connection to the emulator's ``vendor``; keyword arguments go to the hook."""

    def make(
        vendor: str, *, password: str | None = None, extra: dict[str, Any] | None = None, **kw: Any
    ) -> BatchHook:
        conn_id = connect(
            vendor, host=emulator.base_url(vendor), password=password or emulator.api_key, extra=extra
        )
        return hooks(BatchHook(conn_id, **kw))

    return make


@pytest.fixture
def vendor_server() -> Iterator[Callable[..., Vendor]]:
    """Start scripted loopback vendors (see :class:`loopback.Vendor`); stopped after the test."""
    started: list[Vendor] = []

    def start(handler: Handler, **kw: Any) -> Vendor:
        server = Vendor(handler, **kw)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
