"""common-ai's own trigger polling and cancelling through our adapters, with nothing blocking its loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from airflow.providers.common.ai.batch.output_schema import build_output_spec
from airflow.providers.common.ai.triggers.llm_batch import LLMBatchTrigger

from airflow_provider_llmbatch.common_ai import ADAPTERS, VendorBatchAdapter
from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

VENDORS = sorted(REGISTRY)
CONN_ID = "ai_trigger_conn"


def _trigger(vendor: str, batch_id: str) -> LLMBatchTrigger:
    return LLMBatchTrigger(
        llm_conn_id=CONN_ID,
        adapter=ADAPTERS[vendor].name,
        batch_id=batch_id,
        poll_interval=30,
        end_time=time.time() + 3600,
        timeout=3600,
        cancel_on_kill=True,
        cancel_on_timeout=True,
    )


def _submit(adapter: VendorBatchAdapter, key16: str) -> str:
    result = adapter.submit(
        [{"prompt": "hello"}, {"prompt": "again"}],
        model="test-model",
        idempotency_key=key16,
        input_fingerprint="a" * 64,
        output_spec=build_output_spec(str),
    )
    return result.batch_id


async def _events(trigger: LLMBatchTrigger) -> list[dict[str, Any]]:
    return [event.payload async for event in trigger.run()]


@pytest.mark.parametrize("vendor", VENDORS)
def test_the_trigger_polls_through_the_adapter_off_the_loop(
    vendor: str,
    instant: Emulator,
    adapter_on: Callable[[str], VendorBatchAdapter],
    loop_guard: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in instant.airflow_conn_env(vendor, CONN_ID).items():
        monkeypatch.setenv(key, value)
    batch_id = _submit(adapter_on(vendor), "00000000000000aa")

    with loop_guard.watch():
        events = asyncio.run(_events(_trigger(vendor, batch_id)))

    assert len(events) == 1
    [event] = events
    assert (event["status"], event["batch_id"]) == ("success", batch_id)
    assert event["counts"] == {"succeeded": 1, "errored": 1, "expired": 0, "cancelled": 0}


@pytest.mark.parametrize("vendor", VENDORS)
def test_killing_the_deferred_task_cancels_the_batch_off_the_loop(
    vendor: str,
    instant: Emulator,
    adapter_on: Callable[[str], VendorBatchAdapter],
    loop_guard: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in instant.airflow_conn_env(vendor, CONN_ID).items():
        monkeypatch.setenv(key, value)
    batch_id = _submit(adapter_on(vendor), "00000000000000bb")
    instant.force_status(vendor, batch_id, "in_progress")

    with loop_guard.watch():
        asyncio.run(_trigger(vendor, batch_id).on_kill())

    assert instant.batch(vendor, batch_id)["status"] in ("cancelling", "cancelled")
