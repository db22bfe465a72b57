"""
Many BatchTriggers on one event loop, as a triggerer runs them, with the loop guard watching.

Nothing here is timed: "never blocks the loop" is proved by the guard of ``tests/conftest.py``, which
fails on any blocking call (a file opened, a blocking socket connected, a name resolved) made on the
loop's thread while the triggers run, fault and get killed. The emulator answers over loopback from its
own thread, which the guard does not watch.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import pytest

from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.settings import MAX_CONNECTIONS
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.pollkit import Clock, count_sessions, run_to_end

pytestmark = pytest.mark.integration

VENDORS = list(REGISTRY)
BATCHES_PER_VENDOR = 5
WAITERS = 160
"""Triggers that wait for a batch they share with others, to its end."""
KILLED = ("kill", "deadline")
OWN_BATCHES = 5
"""Per vendor and way of ending: triggers killed by a user, and triggers whose deadline passes."""


class Watch:
    """Count the polls, sample the loop's shared sessions and the polls in flight while the triggers run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, enough: int) -> None:
        self.sessions_seen: list[dict[str, int]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.created = count_sessions(monkeypatch)
        self.polls: dict[str, int] = {}
        self.enough = enough
        self.events: dict[str, asyncio.Event] = {}
        real_poll = BatchHook.aget_batch

        async def counting_poll(hook: BatchHook, batch_id: str, *, retry: bool = True) -> Any:
            if retry:  # not a trigger's poll (a cancel's look-up after a conflict): no slot
                return await real_poll(hook, batch_id, retry=retry)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.sessions_seen.append(transport.shared_sessions())
            try:
                return await real_poll(hook, batch_id, retry=retry)
            finally:
                self.in_flight -= 1
                self.polls[batch_id] = self.polls.get(batch_id, 0) + 1
                self.polled(batch_id).set()
                if sum(self.polls.values()) >= self.enough:
                    self.polled("*").set()

        monkeypatch.setattr(BatchHook, "aget_batch", counting_poll)

    def polled(self, batch_id: str) -> asyncio.Event:
        """Return the event set once ``batch_id`` was polled (``*``: once there were enough polls)."""
        return self.events.setdefault(batch_id, asyncio.Event())


@pytest.mark.asyncio
async def test_many_triggers_share_one_session_and_never_block_the_loop(
    emulator: Emulator,
    connect: Callable[..., str],
    make_batch: Callable[..., str],
    fake_time: Clock,
    loop_guard: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shared = [(v, make_batch(v)) for v in VENDORS for _ in range(BATCHES_PER_VENDOR)]
    # Killed and timed-out triggers cancel their batch: each has one of its own.
    own = {kind: [(v, make_batch(v)) for v in VENDORS for _ in range(OWN_BATCHES)] for kind in KILLED}
    for vendor, batch_id in shared + [b for batches in own.values() for b in batches]:
        emulator.force_status(vendor, batch_id, "in_progress")
    conns = {vendor: connect(vendor) for vendor in VENDORS}
    emulator.set_latency(0.01)  # real, on the emulator's side: polls overlap and queue for slots
    emulator.add_fault(FaultRule("503", operation="get_batch", times=None, probability=0.05))
    emulator.add_fault(FaultRule("reset", operation="get_batch", times=None, probability=0.02))
    watch = Watch(monkeypatch, enough=2 * WAITERS)

    plans: list[tuple[BatchTrigger, str]] = []
    for kind, batches in [("wait", shared * (WAITERS // len(shared))), *own.items()]:
        for vendor, batch_id in batches:
            deadline = fake_time.now + 0.3 if kind == "deadline" else None
            trigger = BatchTrigger(
                conns[vendor], batch_id, poll_interval=0.05, max_poll_interval=0.1, deadline=deadline
            )
            plans.append((trigger, kind))
    random.Random(7).shuffle(plans)

    async def kill(trigger: BatchTrigger) -> list[dict[str, Any]]:
        # As the triggerer does on a user's kill: cancel run(), then on_kill(), then cleanup().
        task = asyncio.create_task(trigger.run().__anext__())
        await watch.polled(trigger.batch_id).wait()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await trigger.on_kill()
        await trigger.cleanup()
        return []

    async def finish_the_rest() -> None:
        await watch.polled("*").wait()
        for vendor, batch_id in shared:
            # The emulator's admin runs in a worker thread, as a vendor runs elsewhere.
            await asyncio.to_thread(emulator.force_status, vendor, batch_id, "completed")

    with loop_guard.watch():
        tasks = []
        for trigger, kind in plans:
            await asyncio.sleep(0)  # the triggerer yields to the loop between two new triggers
            tasks.append(asyncio.create_task(kill(trigger) if kind == "kill" else run_to_end(trigger)))
        finisher = asyncio.create_task(finish_the_rest())
        results = await asyncio.gather(*tasks)
        await finisher

    expected = {"wait": ["terminal"], "deadline": ["timeout"], "kill": []}
    for (trigger, kind), events in zip(plans, results, strict=True):
        assert [e["event"] for e in events] == expected[kind], (kind, events)
        assert all(e["batch_id"] == trigger.batch_id for e in events)
        if kind == "wait":
            assert events[0]["batch"]["status"] == "completed"
    for vendor, batch_id in [b for batches in own.values() for b in batches]:
        assert emulator.batch(vendor, batch_id)["status"] in {"cancelling", "cancelled"}
    # One session for the emulator's origin (every vendor), held by many triggers at once...
    assert watch.created == [emulator.url]
    assert {origin for seen in watch.sessions_seen for origin in seen} == {emulator.url}
    assert max(seen[emulator.url] for seen in watch.sessions_seen) > MAX_CONNECTIONS
    # ...whose slots bound the polls in flight; and given back by every trigger's cleanup.
    assert 1 < watch.peak_in_flight <= MAX_CONNECTIONS
    assert transport.shared_sessions() == {}


@pytest.mark.asyncio
async def test_a_trigger_run_from_a_cold_start_does_no_blocking_io(
    emulator: Emulator,
    connect: Callable[..., str],
    make_batch: Callable[..., str],
    emulator_time: Clock,
    loop_guard: Any,
) -> None:
    # The first poll of a fresh hook: connection look-up, TLS context, session, request, parse.
    batch_id = make_batch("openai")
    trigger = BatchTrigger(connect("openai"), batch_id, poll_interval=0.05, max_poll_interval=0.1)
    with loop_guard.watch():
        events = await run_to_end(trigger)
    assert events[0]["event"] == "terminal"
