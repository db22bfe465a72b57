"""Fixtures of the reliability suite: emulator connections, recorded retry waits, hooks on either face."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from relkit import Face, Waits

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.vendors import REGISTRY


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "load: the many-triggers load test (select with -m load)")


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
