"""The API key never reaches an exception's text or repr, a traceback, or any log line, on any error path."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from hookmock import FACES, get_batch_on
from loopback import Received, Vendor, response

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


def _stdlib_logging(hook: BatchHook) -> BatchHook:
    # The hook logs through structlog, which filters debug lines out before any handler; route it to a
    # stdlib logger so caplog sees every line at DEBUG.
    hook._log = logging.getLogger("llmbatch.tests.hook")  # type: ignore[assignment]
    return hook


async def _no_sleep(seconds: float) -> None:
    return None


NO_SLEEP = RetryPolicy(max_retries=1, sleep=lambda s: None, asleep=_no_sleep)


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


PATHS: list[tuple[str, FaultRule | None, type[VendorAPIError]]] = [
    ("401", None, AuthenticationError),
    ("404", None, NotFoundError),
    ("429", FaultRule("429", times=None), RateLimitError),
    ("500", FaultRule("500", times=None), ServerError),
    ("reset", FaultRule("reset", times=None), APIConnectionError),
    ("malformed", FaultRule("malformed", times=None), MalformedResponseError),
    ("html", FaultRule("html", times=None), ServerError),
]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("vendor", list(REGISTRY))
@pytest.mark.parametrize(("path", "fault", "expected"), PATHS, ids=[p[0] for p in PATHS])
def test_error_paths_never_show_the_key(
    path: str,
    fault: FaultRule | None,
    expected: type[VendorAPIError],
    vendor: str,
    face: str,
    emulator: Emulator,
    emulator_hook: Callable[..., BatchHook],
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    key = SECRET if path == "401" else emulator.api_key
    if fault is not None:
        emulator.add_fault(FaultRule(fault.kind, vendor=vendor, operation="get_batch", times=None))
    hook = _stdlib_logging(emulator_hook(vendor, password=key, retry_policy=NO_SLEEP))
    with pytest.raises(expected) as info:
        get_batch_on(face, hook, "batch_unknown")
    captured = capfd.readouterr()
    _assert_clean(info.value, key, debug_logs, captured.out + captured.err)
    assert (info.value.vendor, info.value.operation) == (vendor, "get_batch")
    # The capture works: the lines that were due are there (without the key).
    if face == "sync":
        assert "send_request_headers.started" in debug_logs.text  # httpcore traces every request
    if expected in (RateLimitError, ServerError, APIConnectionError):
        assert "get_batch failed (" in debug_logs.text


def _echoing(kind: str) -> Callable[[Received], bytes]:
    def answer(request: Received) -> bytes:
        sent = request.headers["authorization"]
        if kind == "html":
            page = f"<html><body><h1>400</h1><pre>{'x' * 130}Authorization: {sent}</pre></body></html>"
            return response(400, page.encode(), "Content-Type: text/html", reason="Bad Request")
        body = {"error": {"message": f"Incorrect API key provided: {sent}", "code": "invalid_api_key"}}
        return response(401, json.dumps(body).encode(), reason="Unauthorized")

    return answer


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(("kind", "expected"), [("html", BadRequestError), ("json", AuthenticationError)])
def test_pages_echoing_the_key_are_redacted(
    kind: str,
    expected: type[VendorAPIError],
    face: str,
    connect: Callable[..., str],
    hooks: Callable[[BatchHook], BatchHook],
    vendor_server: Callable[..., Vendor],
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    server = vendor_server(_echoing(kind))
    hook = _stdlib_logging(hooks(BatchHook(connect(host=server.origin + "/v1", password=SECRET))))
    with pytest.raises(expected) as info:
        get_batch_on(face, hook, "b1")
    captured = capfd.readouterr()
    _assert_clean(info.value, SECRET, debug_logs, captured.out + captured.err)
    assert "***" in info.value.vendor_message
    assert not any(part in str(info.value) for part in (SECRET[:10], SECRET[-10:]))
    assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {SECRET}"]  # it was sent


def test_hook_repr_and_settings_hold_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = {"conn_type": "llmbatch_zhipu", "host": "http://vendor.test/v4", "password": SECRET}
    monkeypatch.setenv("AIRFLOW_CONN_REPR", json.dumps(conn))
    hook = BatchHook("repr")
    core: Any = hook._core()
    assert SECRET not in repr(hook)
    assert SECRET not in repr(core.settings)
    assert SECRET not in repr(hook.retry_policy)
