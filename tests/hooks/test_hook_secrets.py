"""The API key never reaches an exception's text or repr, a traceback, or any log line, on any error path."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    MalformedResponseError,
    NotFoundError,
    RateLimitError,
    ServerError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks import _pool
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

SECRET = "sk-live-SECRET-4f3e2d1c0b9a8776"


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "airflow.task.hooks"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def _emulated_hook(emulator: Emulator, monkeypatch: pytest.MonkeyPatch, vendor: str, key: str) -> BatchHook:
    conn_id = f"secret_{vendor}"
    value = {"conn_type": REGISTRY[vendor].conn_type, "host": emulator.base_url(vendor), "password": key}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
    hook = BatchHook(conn_id, retry_policy=RetryPolicy(max_retries=1, sleep=lambda s: None, asleep=_no_sleep))
    return _stdlib_logging(hook)


def _stdlib_logging(hook: BatchHook) -> BatchHook:
    # The hook logs through structlog, which filters debug lines out before any handler; route it to a
    # stdlib logger so caplog sees every line at DEBUG.
    hook._log = logging.getLogger("llmbatch.tests.hook")  # type: ignore[assignment]
    return hook


async def _no_sleep(seconds: float) -> None:
    return None


def _call(hook: BatchHook, face: str, batch_id: str) -> None:
    if face == "sync":
        hook.get_batch(batch_id)
        return

    async def main() -> None:
        try:
            await hook.aget_batch(batch_id)
        finally:
            await hook.aclose()

    asyncio.run(main())


def _assert_clean(exc: BaseException, key: str, logs: pytest.LogCaptureFixture, out: str) -> None:
    texts = {
        "str": str(exc),
        "repr": repr(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "logs": logs.text + "".join(str(r.args) for r in logs.records),
        "output": out,
    }
    for where, text in texts.items():
        assert key not in text, f"the API key leaked into the {where}"
    # The capture works: the per-call debug line is there (method, path, status), without the key.
    assert "get_batch GET /batches/" in logs.text


PATHS: list[tuple[str, FaultRule | None, type[VendorAPIError]]] = [
    ("401", None, AuthenticationError),
    ("404", None, NotFoundError),
    ("429", FaultRule("429", times=None), RateLimitError),
    ("500", FaultRule("500", times=None), ServerError),
    ("reset", FaultRule("reset", times=None), APIConnectionError),
    ("malformed", FaultRule("malformed", times=None), MalformedResponseError),
    ("html", FaultRule("html", times=None), ServerError),
]


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("vendor", list(REGISTRY))
@pytest.mark.parametrize(("path", "fault", "expected"), PATHS, ids=[p[0] for p in PATHS])
def test_error_paths_never_show_the_key(
    path: str,
    fault: FaultRule | None,
    expected: type[VendorAPIError],
    vendor: str,
    face: str,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    key = SECRET if path == "401" else emulator.api_key
    if fault is not None:
        emulator.add_fault(FaultRule(fault.kind, vendor=vendor, operation="get_batch", times=None))
    hook = _emulated_hook(emulator, monkeypatch, vendor, key)
    with pytest.raises(expected) as info:
        _call(hook, face, "batch_unknown")
    hook.close()
    captured = capfd.readouterr()
    _assert_clean(info.value, key, debug_logs, captured.out + captured.err)
    assert info.value.vendor == vendor
    assert info.value.operation == "get_batch"


def _echoing(kind: str) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        sent = request.headers["authorization"]
        if kind == "html":
            page = f"<html><body><h1>400</h1><pre>{'x' * 130}Authorization: {sent}</pre></body></html>"
            return httpx.Response(400, text=page, headers={"content-type": "text/html"})
        body = {"error": {"message": f"Incorrect API key provided: {sent}", "code": "invalid_api_key"}}
        return httpx.Response(401, json=body)

    return handler


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize(("kind", "expected"), [("html", BadRequestError), ("json", AuthenticationError)])
def test_pages_echoing_the_key_are_redacted(
    kind: str,
    expected: type[VendorAPIError],
    face: str,
    monkeypatch: pytest.MonkeyPatch,
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    handler = _echoing(kind)
    monkeypatch.setattr(
        _pool, "_new_client", lambda timeout: httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    monkeypatch.setattr(_pool, "_new_lean", lambda origin, timeout: None)
    conn = {"conn_type": "llmbatch_openai", "host": "http://vendor.test/v1", "password": SECRET}
    monkeypatch.setenv("AIRFLOW_CONN_ECHO", json.dumps(conn))
    hook = _stdlib_logging(BatchHook("echo"))
    hook._sync_core()
    hook._client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(expected) as info:
        _call(hook, face, "b1")
    hook.close()
    captured = capfd.readouterr()
    _assert_clean(info.value, SECRET, debug_logs, captured.out + captured.err)
    assert "***" in info.value.vendor_message
    assert not any(part in str(info.value) for part in (SECRET[:10], SECRET[-10:]))


def test_hook_repr_and_settings_hold_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = {"conn_type": "llmbatch_zhipu", "host": "http://vendor.test/v4", "password": SECRET}
    monkeypatch.setenv("AIRFLOW_CONN_REPR", json.dumps(conn))
    hook = BatchHook("repr")
    core: Any = hook._sync_core()
    assert SECRET not in repr(hook)
    assert SECRET not in repr(core.settings)
    assert SECRET not in repr(hook.retry_policy)
