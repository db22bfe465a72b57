"""Fixtures of the reliability suite: emulator connections, recorded retry waits, hooks on either face."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from relkit import Face, Waits

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.vendors import REGISTRY


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "load: the many-triggers load test (select with -m load)")


@pytest.fixture(scope="session", autouse=True)
def _one_ssl_context() -> Iterator[None]:
    """
    Build the default TLS context once: every httpx client loads the CA bundle (~50 ms) although these
    tests speak plain HTTP over loopback, and the fault matrix makes two clients per case.
    """
    from httpx._transports import default

    original = default.create_ssl_context
    cache: dict[tuple[Any, ...], ssl.SSLContext] = {}

    def cached(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
        if verify is not True or cert is not None:
            return original(verify=verify, cert=cert, trust_env=trust_env)
        key = (trust_env,)
        if key not in cache:
            cache[key] = original(verify=verify, cert=cert, trust_env=trust_env)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(default, "create_ssl_context", cached)
        yield


@pytest.fixture
def rel_conn(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Point an env-var connection at the emulator; return its id."""

    def _conn(vendor: str, conn_id: str | None = None, **extra: Any) -> str:
        conn_id = conn_id or f"rel_{vendor}"
        value: dict[str, Any] = {
            "conn_type": REGISTRY[vendor].conn_type,
            "host": emulator.base_url(vendor),
            "password": emulator.api_key,
        }
        if extra:
            value["extra"] = extra
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
        return conn_id

    return _conn


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def faces() -> Iterator[Callable[..., Face]]:
    made: list[Face] = []

    def _make(conn_id: str, face: str, **kwargs: Any) -> Face:
        item = Face(BatchHook(conn_id, **kwargs), face)
        made.append(item)
        return item

    yield _make
    for item in made:
        item.close()
