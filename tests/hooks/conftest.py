"""Fixtures for hook tests: env-var connections and hooks wired to ``httpx.MockTransport`` handlers."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hookmock import MOCK_BASE, MOCK_KEY, Script

from airflow_provider_llmbatch.hooks import _pool
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.retry import RetryPolicy

_ids = itertools.count()


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
        value: dict[str, Any] = {"conn_type": f"llmbatch_{vendor}", "host": host, "password": password}
        if extra:
            value["extra"] = extra
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
        return conn_id

    return _connect


@pytest.fixture
def mock_hook(
    connect: Callable[..., str], script: Script, policy: RetryPolicy, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., BatchHook]]:
    """Build hooks whose sync client and shared async clients answer from ``script``."""
    monkeypatch.setattr(
        _pool,
        "_new_client",
        lambda timeout: httpx.AsyncClient(transport=httpx.MockTransport(script.ahandler)),
    )
    # The scripted transport answers every call, the small JSON ones included.
    monkeypatch.setattr(_pool, "_new_lean", lambda origin, timeout: None)
    hooks: list[BatchHook] = []

    def _make(vendor: str = "openai", **kw: Any) -> BatchHook:
        hook = BatchHook(connect(vendor, **kw), retry_policy=policy)
        hook._sync_core()
        hook._client = httpx.Client(transport=httpx.MockTransport(script.handler))
        hooks.append(hook)
        return hook

    yield _make
    for hook in hooks:
        hook.close()
