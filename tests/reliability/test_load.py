"""
Load: 1,000 BatchTriggers on one event loop against a vendor emulator in its own process.

Every answer comes 0.2 s late and about 1% of polls fail (500, 503 or 429, seeded); batches end at
staggered times in all four terminal statuses. Each trigger must yield the one event of its own batch,
all of them through one shared HTTP session, with nothing blocking ever run on the loop's thread (the loop
guard of ``tests/conftest.py`` catches the call itself; nothing here is timed: loop-lag figures are the
benchmark's, ``bench/triggerer_load.py``), and when every trigger has cleaned up the process must hold
no more sockets or file descriptors than before.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from relkit import VENDORS, write_request_file

from airflow_provider_llmbatch.emulator.vendor_dialects import emulator_prefix
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.pollkit import count_sessions, run_to_end

pytestmark = [pytest.mark.integration, pytest.mark.load]

TRIGGERS = 1000
LATENCY = 0.2
ERROR_RATE = 0.01
FAULT_KINDS = ("500", "503", "429")
FINISH_WINDOW = (1.0, 8.0)
"""Seconds after the triggers start within which the batches end, spread evenly."""
OUTCOME_WEIGHTS = {"completed": 0.85, "failed": 0.05, "expired": 0.05, "cancelled": 0.05}
SEED = 20261122
FIGURES_ENV = "LLMBATCH_LOAD_FIGURES"
"""Set to a path to keep the figures of a run (counts only: timings are the benchmark's)."""
EMULATOR_ARGS = ("--port", "0", "--time-scale", "100", "--seed", str(SEED))
"""Batches stay where the driver puts them (a time scale of 100 holds every phase for minutes)."""

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import httpx

    plan = json.load(sys.stdin)
    started = time.monotonic()
    with httpx.Client(timeout=30) as client:
        for at, vendor, batch_id, status in plan["steps"]:
            wait = at - (time.monotonic() - started)
            if wait > 0:
                time.sleep(wait)
            url = plan["admin"] + "/batches/" + vendor + "/" + batch_id + "/status"
            client.post(url, json={"status": status}).raise_for_status()
    print("done", flush=True)
    """
)


@pytest.fixture(scope="module")
def remote_emulator() -> Iterator[str]:
    """Serve the emulator from its own process, as a vendor is: the loop under test is the triggers' alone."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_llmbatch.emulator", *EMULATOR_ARGS],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", first)
        assert url, f"emulator did not start: {first!r}"
        yield url.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _open_sockets() -> int:
    return len(psutil.Process().net_connections(kind="inet"))


def _open_fds() -> int:
    return psutil.Process().num_fds()


def _create_batches(conn_ids: dict[str, str], tmp_path: Path) -> list[tuple[str, str, str]]:
    """Create one batch per trigger, spread over the vendors; return (vendor, conn_id, batch_id)."""
    made: list[tuple[str, str, str]] = []
    for index, (vendor, conn_id) in enumerate(conn_ids.items()):
        source = write_request_file(tmp_path / f"{vendor}.jsonl", REGISTRY[vendor], 4)
        count = TRIGGERS // len(conn_ids) + (1 if index < TRIGGERS % len(conn_ids) else 0)
        with BatchHook(conn_id) as hook, ThreadPoolExecutor(16) as pool:
            uploaded = hook.upload_file(source)
            for batch in pool.map(
                lambda _, h=hook, f=uploaded.id: h.create_batch(input_file_id=f), range(count)
            ):
                made.append((vendor, conn_id, batch.id))
    return made


def test_thousand_triggers_on_one_loop(
    remote_emulator: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loop_guard: Any
) -> None:
    admin = f"{remote_emulator}/_emulator"
    conn_ids: dict[str, str] = {}
    for vendor in VENDORS:
        spec = REGISTRY[vendor]
        conn_id = f"load_{vendor}"
        value = {"conn_type": spec.conn_type, "host": remote_emulator + emulator_prefix(spec)}
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({**value, "password": "emulator-key"})
        )
        conn_ids[vendor] = conn_id
    httpx.post(f"{admin}/reset").raise_for_status()

    rng = random.Random(SEED)
    batches = _create_batches(conn_ids, tmp_path)
    assert len(batches) == TRIGGERS
    expected: dict[str, str] = {}
    steps: list[tuple[float, str, str, str]] = []
    outcomes, weights = zip(*OUTCOME_WEIGHTS.items(), strict=True)
    low, high = FINISH_WINDOW
    for index, (vendor, _conn_id, batch_id) in enumerate(batches):
        httpx.post(f"{admin}/batches/{vendor}/{batch_id}/status", json={"status": "in_progress"})
        outcome = rng.choices(outcomes, weights)[0]
        expected[batch_id] = outcome
        steps.append((low + (high - low) * index / TRIGGERS, vendor, batch_id, outcome))
    rng.shuffle(steps)
    steps.sort()
    per_kind = ERROR_RATE / len(FAULT_KINDS)
    rules = [
        {"kind": kind, "operation": "get_batch", "times": None, "probability": per_kind}
        for kind in FAULT_KINDS
    ]
    httpx.post(f"{admin}/faults", json=rules).raise_for_status()
    httpx.post(f"{admin}/latency", json={"seconds": LATENCY}).raise_for_status()
    before_stats = httpx.get(f"{admin}/stats").json()
    sessions = count_sessions(monkeypatch)

    # Watched from the moment the loop runs: every blocking call on its thread fails the test.
    with loop_guard.watch():
        figures = asyncio.run(_run_triggers(batches, expected, admin, steps))

    after_stats = httpx.get(f"{admin}/stats").json()
    httpx.post(f"{admin}/latency", json={"seconds": 0}).raise_for_status()
    httpx.delete(f"{admin}/faults").raise_for_status()
    served = sum(
        after_stats[v]["operations"].get("get_batch", 0) - before_stats[v]["operations"].get("get_batch", 0)
        for v in VENDORS
    )
    figures["get_batch_requests_served"] = served
    figures["faults_injected"] = after_stats["_faults_hit"] - before_stats["_faults_hit"]
    figures["batches_created_extra"] = sum(
        after_stats[v]["batches_created"] - before_stats[v]["batches_created"] for v in VENDORS
    )
    print("\nload figures: " + json.dumps(figures, sort_keys=True))
    if os.environ.get(FIGURES_ENV):
        Path(os.environ[FIGURES_ENV]).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")

    assert figures["wrong_outcomes"] == 0
    assert figures["events"] == TRIGGERS
    # They really waited together, through one session for the emulator's one origin.
    assert figures["polls"] > TRIGGERS
    assert sessions == [remote_emulator]
    assert figures["sockets_after"] <= figures["sockets_before"], figures
    assert figures["fds_after"] <= figures["fds_before"], figures
    # The faults really happened, about as often as asked, and the waits absorbed them.
    assert figures["faults_injected"] > 0.3 * ERROR_RATE * served
    assert figures["batches_created_extra"] == 0


async def _run_triggers(
    batches: list[tuple[str, str, str]], expected: dict[str, str], admin: str, steps: list[Any]
) -> dict[str, Any]:
    # Counted off the loop (psutil reads /proc); the executor's threads are warmed into the baseline.
    await asyncio.gather(*(asyncio.to_thread(int) for _ in range(8)))
    sockets_before, fds_before = await asyncio.to_thread(lambda: (_open_sockets(), _open_fds()))

    triggers = [
        BatchTrigger(conn_id, batch_id, poll_interval=1.0, max_poll_interval=2.0)
        for _vendor, conn_id, batch_id in batches
    ]
    # The vendor's side: a process that ends the batches on schedule, started and fed off the loop.
    plan = json.dumps({"admin": admin, "steps": steps})
    driver = asyncio.create_task(
        asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", DRIVER], input=plan, capture_output=True, text=True
        )
    )
    tasks = []
    for trigger in triggers:
        # As the triggerer creates them: it yields to the loop between two.
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(run_to_end(trigger)))
    results = await asyncio.gather(*tasks)
    driven = await driver
    assert driven.stdout.strip() == "done", driven.stderr[-2000:]
    assert transport.shared_sessions() == {}

    wrong = 0
    polls = 0
    for trigger, events in zip(triggers, results, strict=True):
        ok = (
            len(events) == 1
            and events[0]["event"] == "terminal"
            and events[0]["batch"]["batch_id"] == trigger.batch_id
            and events[0]["batch"]["status"] == expected[trigger.batch_id]
        )
        wrong += not ok
        polls += sum(event["polls"] for event in events)
    sockets_after, fds_after = await asyncio.to_thread(lambda: (_open_sockets(), _open_fds()))
    return {
        "triggers": len(triggers),
        "events": sum(len(events) for events in results),
        "wrong_outcomes": wrong,
        "outcomes": {k: sum(1 for v in expected.values() if v == k) for k in OUTCOME_WEIGHTS},
        "polls": polls,
        "sockets_before": sockets_before,
        "sockets_after": sockets_after,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "latency_s": LATENCY,
        "error_rate": ERROR_RATE,
    }
