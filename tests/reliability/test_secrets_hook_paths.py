"""
Every hook operation, both faces, every vendor: a vendor that echoes the key gets it back redacted.

``tests/hooks/test_hook_secrets.py`` covers the error kinds on ``get_batch``; this module covers the
other operations (upload, create, list, download, cancel, delete; the async face's poll and cancel)
against an emulator whose 401 quotes the ``Authorization`` header, plus the trigger's events and
serialized kwargs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.emulator.testing import request_lines
from airflow_provider_llmbatch.exceptions import AuthenticationError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

GOOD = f"sk-canary-{uuid.uuid4().hex}"
WRONG = f"sk-canary-wrong-{uuid.uuid4().hex}"
VENDORS = sorted(REGISTRY)


@pytest.fixture(scope="module")
def echoing() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(time_scale=0.1, echo_credentials=True), api_key=GOOD) as emulator:
        yield emulator


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "llmbatch.tests"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def _hook(echoing: Emulator, monkeypatch: pytest.MonkeyPatch, vendor: str) -> BatchHook:
    conn_id = f"echo_{vendor}"
    value = {"conn_type": REGISTRY[vendor].conn_type, "host": echoing.base_url(vendor), "password": WRONG}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
    hook = BatchHook(conn_id, retry_policy=RetryPolicy(max_retries=0, sleep=lambda s: None))
    # The hook logs through structlog; a stdlib logger lets caplog see its debug lines.
    hook._log = logging.getLogger("llmbatch.tests.secrets")  # type: ignore[assignment]
    return hook


def _sync_calls(tmp: Path, vendor: str) -> dict[str, Callable[[BatchHook], Any]]:
    source = tmp / "requests.jsonl"
    source.write_bytes(request_lines(REGISTRY[vendor], ["a", "b"]))
    return {
        "upload_file": lambda h: h.upload_file(source),
        "create_batch": lambda h: h.create_batch(input_file_id="file-1"),
        "get_batch": lambda h: h.get_batch("batch-1"),
        "cancel_batch": lambda h: h.cancel_batch("batch-1"),
        "list_batches": lambda h: list(h.list_batches()),
        "find_batch": lambda h: h.find_batch(metadata={"k": "v"}),
        "get_file": lambda h: h.get_file("file-1"),
        "list_files": lambda h: list(h.list_files()),
        "download_file": lambda h: h.download_file("file-1", tmp / "out.jsonl"),
        "delete_file": lambda h: h.delete_file("file-1"),
    }


async def _async_call(hook: BatchHook, name: str) -> Any:
    """Call the async face, which has what a trigger needs: a poll and a cancel."""
    try:
        return await getattr(hook, f"a{name}")("batch-1")
    finally:
        await hook.aclose()


OPERATIONS = [
    "cancel_batch",
    "create_batch",
    "delete_file",
    "download_file",
    "find_batch",
    "get_batch",
    "get_file",
    "list_batches",
    "list_files",
    "upload_file",
]
CASES = [(op, "sync") for op in OPERATIONS] + [("get_batch", "async"), ("cancel_batch", "async")]


@pytest.mark.parametrize(("operation", "face"), CASES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_an_echoed_key_is_redacted_on_every_operation(
    vendor: str,
    operation: str,
    face: str,
    echoing: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    hook = _hook(echoing, monkeypatch, vendor)
    calls = _sync_calls(tmp_path, vendor)
    assert sorted(calls) == OPERATIONS

    def call() -> None:
        if face == "sync":
            calls[operation](hook)
        else:
            asyncio.run(_async_call(hook, operation))

    with capture_logs() as structured, pytest.raises(AuthenticationError) as info:
        call()
    hook.close()
    out = capfd.readouterr()
    exc = info.value
    texts = {
        "str": str(exc),
        "repr": repr(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "pickled": repr(exc.__reduce__()),
        "logs": debug_logs.text + "".join(str(r.args) for r in debug_logs.records),
        "structlog": json.dumps(structured, default=str),
        "output": out.out + out.err,
    }
    for where, text in texts.items():
        assert WRONG not in text, f"the key leaked into the {where}"
    assert "***" in exc.vendor_message, "the vendor did echo the header, and it was redacted"
    assert exc.vendor == vendor


@pytest.mark.asyncio
@pytest.mark.parametrize("vendor", VENDORS)
async def test_trigger_events_and_kwargs_hold_no_key(
    vendor: str, echoing: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn_id = f"echo_trigger_{vendor}"
    value = {"conn_type": REGISTRY[vendor].conn_type, "host": echoing.base_url(vendor), "password": WRONG}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
    trigger = BatchTrigger(conn_id=conn_id, batch_id="batch-1", poll_interval=0.01, max_consecutive_errors=1)
    with capture_logs() as structured:
        try:
            events = [event.payload async for event in trigger.run()]
        finally:
            await trigger.cleanup()
    assert [e["event"] for e in events] == ["error"]
    assert "AuthenticationError" in events[0]["message"]
    assert "***" in events[0]["message"]
    for text in (json.dumps(events), json.dumps(trigger.serialize()), json.dumps(structured, default=str)):
        assert WRONG not in text
