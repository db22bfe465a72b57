"""
BatchTrigger around its run: a triggerer restart, a user's kill, cleanup of the shared session, secrets.

The triggerer cancels ``run()`` on a restart (the batch runs on; the rebuilt trigger picks it up), and on a
user's kill awaits ``on_kill()`` (the batch is cancelled). ``cleanup()`` runs on every exit and gives back
the hook's share of the loop's HTTP session.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import suppress
from typing import Any

import pytest

from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.pollkit import Parking, count_sessions, rebuild, run_to_end

pytestmark = pytest.mark.integration

VENDORS = list(REGISTRY)


@pytest.mark.asyncio
async def test_a_triggerer_restart_resumes_from_the_serialized_kwargs(
    emulator, connect, make_batch, fake_time, monkeypatch
):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    deadline = fake_time.now + 7200
    trigger = BatchTrigger(connect("zhipu"), batch_id, poll_interval=30, deadline=deadline)
    parking = Parking(fake_time, polls=2)
    monkeypatch.setattr(trigger_module, "sleep", parking.sleep)
    task = asyncio.create_task(run_to_end(trigger))
    await parking.parked.wait()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    # A restart is not a kill: the batch runs on, and the cancelled run gave its session back.
    assert emulator.batch("zhipu", batch_id)["status"] == "in_progress"
    assert emulator.stats("zhipu")["cancels"] == 0
    assert transport.shared_sessions() == {}

    monkeypatch.setattr(trigger_module, "sleep", fake_time.asleep)
    rebuilt = rebuild(trigger)
    assert rebuilt.deadline == deadline
    emulator.force_status("zhipu", batch_id, "completed")
    events = await run_to_end(rebuilt)
    assert [e["event"] for e in events] == ["terminal"]
    assert events[0]["batch"]["batch_id"] == batch_id
    assert events[0]["batch"]["status"] == "completed"


@pytest.mark.asyncio
@pytest.mark.parametrize("vendor", VENDORS)
async def test_on_kill_cancels(emulator, connect, make_batch, vendor):
    batch_id = make_batch(vendor)
    emulator.force_status(vendor, batch_id, "in_progress")
    trigger = BatchTrigger(connect(vendor), batch_id)
    await trigger.on_kill()
    await trigger.cleanup()
    assert emulator.batch(vendor, batch_id)["status"] in {"cancelling", "cancelled"}
    assert transport.shared_sessions() == {}


@pytest.mark.asyncio
async def test_on_kill_respects_cancel_on_kill(emulator, connect, make_batch):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "in_progress")
    trigger = BatchTrigger(connect("openai"), batch_id, cancel_on_kill=False)
    await trigger.on_kill()
    await trigger.cleanup()
    assert emulator.batch("openai", batch_id)["status"] == "in_progress"
    assert emulator.stats("openai")["cancels"] == 0


@pytest.mark.asyncio
async def test_on_kill_of_a_finished_batch_does_not_raise(emulator, connect, make_batch):
    batch_id = make_batch("moonshot")
    emulator.force_status("moonshot", batch_id, "completed")
    trigger = BatchTrigger(connect("moonshot"), batch_id)
    await trigger.on_kill()
    await trigger.cleanup()
    assert emulator.batch("moonshot", batch_id)["status"] == "completed"


@pytest.mark.asyncio
async def test_on_kill_of_an_unreachable_vendor_does_not_raise(emulator, connect, make_batch, trigger_logs):
    trigger = BatchTrigger("no_such_connection_anywhere", "b1")
    await trigger.on_kill()
    await trigger.cleanup()
    assert any("Could not cancel batch b1" in e["event"] for e in trigger_logs)


@pytest.mark.asyncio
async def test_a_kill_during_the_run_then_on_kill(emulator, connect, make_batch, fake_time, monkeypatch):
    """The triggerer's order on a user's kill: cancel run(), await on_kill(), then cleanup()."""
    batch_id = make_batch("dashscope")
    emulator.force_status("dashscope", batch_id, "in_progress")
    trigger = BatchTrigger(connect("dashscope"), batch_id, poll_interval=0.05)
    events: list[Any] = []
    parking = Parking(fake_time, polls=2)
    monkeypatch.setattr(trigger_module, "sleep", parking.sleep)

    async def consume() -> None:
        async for event in trigger.run():
            events.append(event)

    task = asyncio.create_task(consume())
    await parking.parked.wait()
    task.cancel("user action")
    with suppress(asyncio.CancelledError):
        await task
    await trigger.on_kill()
    await trigger.cleanup()
    assert events == []
    assert emulator.stats("dashscope")["operations"]["get_batch"] == 2
    assert emulator.batch("dashscope", batch_id)["status"] in {"cancelling", "cancelled"}
    assert transport.shared_sessions() == {}


@pytest.mark.asyncio
async def test_cleanup_releases_the_shared_session(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    trigger = BatchTrigger(connect("openai"), batch_id)
    async for _ in trigger.run():
        # While the trigger runs, its hook holds one share of the loop's session for the origin.
        assert transport.shared_sessions() == {emulator.url: 1}
    await trigger.cleanup()
    assert transport.shared_sessions() == {}
    await trigger.cleanup()  # idempotent


@pytest.mark.asyncio
async def test_triggers_of_one_origin_share_one_session(
    emulator, connect, make_batch, fake_time, monkeypatch
):
    created = count_sessions(monkeypatch)
    # Every vendor of the emulator is one origin (the vendors differ in the path only).
    ids = {vendor: make_batch(vendor) for vendor in VENDORS}
    for vendor, batch_id in ids.items():
        emulator.force_status(vendor, batch_id, "completed")
    triggers = [BatchTrigger(connect(vendor), batch_id) for vendor, batch_id in ids.items()]
    gens = [t.run() for t in triggers]
    events = [await gen.__anext__() for gen in gens]
    assert transport.shared_sessions() == {emulator.url: len(triggers)}
    for trigger in triggers:
        await trigger.cleanup()
    assert {e.payload["event"] for e in events} == {"terminal"}
    assert created == [emulator.url]
    assert transport.shared_sessions() == {}


# -- secrets ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_secret_in_kwargs_events_or_logs(
    emulator, connect, make_batch, fake_time, caplog, trigger_logs
):
    caplog.set_level(logging.DEBUG)
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "in_progress")
    trigger = BatchTrigger(connect("openai"), batch_id, deadline=fake_time.now + 300)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "timeout"
    key = emulator.api_key
    assert key not in json.dumps(trigger.serialize())
    assert key not in json.dumps(events)
    logged = caplog.text + json.dumps(trigger_logs, default=str)
    assert "did not finish before the deadline" in logged
    assert key not in logged
    assert "Bearer" not in logged
