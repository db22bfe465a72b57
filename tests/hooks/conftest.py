"""Fixtures for hook tests: env-var connections and hooks wired to ``httpx.MockTransport`` handlers."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from airflow_provider_llmbatch.hooks import _pool
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.retry import RetryPolicy

MOCK_KEY = "sk-mock-key-9f8e7d6c5b4a3210"
MOCK_BASE = "http://vendor.test/api/v1"

_ids = itertools.count()


class Script:
    """
    A scripted vendor: (method, path) -> queue of answers; records every request with its full body.

    An answer is an ``httpx.Response``, an exception to raise, or a callable ``(request) -> answer``.
    The last answer of a queue repeats.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Any]] = {}
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def on(self, method: str, path: str, *answers: Any) -> Script:
        self.routes[(method, path)] = list(answers)
        return self

    def calls(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.url.path == "/api/v1" + path)

    def _answer(self, request: httpx.Request) -> Any:
        self.requests.append(request)
        key = (request.method, request.url.path.removeprefix("/api/v1"))
        queue = self.routes.get(key)
        if not queue:
            return httpx.Response(404, json={"error": {"message": f"no route {key}"}})
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(answer) and not isinstance(answer, httpx.Response):
            answer = answer(request)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        return self._answer(request)

    async def ahandler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(await request.aread())
        return self._answer(request)


def batch_json(batch_id: str = "batch_1", status: str = "validating", **fields: Any) -> dict[str, Any]:
    return {"id": batch_id, "object": "batch", "status": status, "created_at": 1_800_000_000, **fields}


def ok(data: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(data).encode(), headers={"content-type": "application/json"})


@pytest.fixture
def slept() -> list[float]:
    return []


@pytest.fixture
def policy(slept: list[float]) -> RetryPolicy:
    async def asleep(seconds: float) -> None:
        slept.append(seconds)

    return RetryPolicy(max_retries=3, base_delay=0.5, max_delay=4.0, rng=random.Random(7), sleep=slept.append, asleep=asleep)


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Set an env-var connection; return its id."""

    def _connect(
        vendor: str = "openai", *, host: str = MOCK_BASE, password: str = MOCK_KEY, extra: dict[str, Any] | None = None
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
        _pool, "_new_client", lambda timeout: httpx.AsyncClient(transport=httpx.MockTransport(script.ahandler))
    )
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
