#!/usr/bin/env python3
"""
API calls per batch: polls the sensor makes with its default settings vs. a fixed 60 s interval.

The schedule is simulated with the real poll state machine (``polling.Poller``) and the defaults of
``BatchSensor`` / ``BatchTrigger`` (jitter included, 200 seeds per case; each poll takes a
``ROUND_TRIP`` and the vendor reads the state as the poll starts, the worst case), for batches that
report progress (request counts grow steadily) and batches that report none until they end. Resume
latency is the time between the batch finishing and the answer of the poll that sees it. A short
real run against the emulator checks the simulation (``--validate``).

    bench/.venv/bin/python bench/polls_per_batch.py
"""

# Report tables are long f-strings of markdown; wrapping them would not make them clearer.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from airflow_provider_llmbatch import polling  # noqa: E402
from airflow_provider_llmbatch.models import Batch  # noqa: E402

DURATIONS = {"10 min": 600.0, "2 h": 7200.0, "20 h": 72000.0}
FIXED = 60.0
SEEDS = 200
ROUND_TRIP = 0.5  # seconds per poll, request and answer


_QUIET = logging.getLogger("bench.polls_per_batch")
_QUIET.setLevel(logging.CRITICAL)


def simulate(
    duration: float, *, progress: bool, rng: random.Random, poll_interval: float, max_poll_interval: float
) -> tuple[int, float]:
    """Return (polls, resume latency in seconds) for one batch, driving the real poll state machine."""
    poller = polling.Poller(
        "sim",
        started=0.0,
        poll_interval=poll_interval,
        max_poll_interval=max_poll_interval,
        deadline=None,
        cancel_on_timeout=False,
        max_consecutive_errors=10,
        log=_QUIET,
        rng=rng,
    )
    now = 0.0  # when a poll starts, and (the worst case) when the vendor reads the state
    while True:
        sent = now
        done = int(1000 * min(sent / duration, 1.0)) if progress or sent >= duration else 0
        batch = Batch.model_validate(
            {
                "id": "sim",
                "status": "completed" if sent >= duration else "in_progress",
                "request_counts": {"total": 1000, "completed": done, "failed": 0},
            }
        )
        now = sent + ROUND_TRIP
        step = poller.after(batch, sent_at=sent, now=now)
        if not isinstance(step, polling.Wait):
            return poller.polls, now - duration
        now += step.seconds


def table(poll_interval: float, max_poll_interval: float) -> list[dict[str, Any]]:
    rows = []
    for label, duration in DURATIONS.items():
        fixed_polls = math.floor(duration / FIXED) + 1
        for progress in (True, False):
            runs = [
                simulate(
                    duration,
                    progress=progress,
                    rng=random.Random(seed),
                    poll_interval=poll_interval,
                    max_poll_interval=max_poll_interval,
                )
                for seed in range(SEEDS)
            ]
            polls = statistics.median(r[0] for r in runs)
            late = [r[1] for r in runs]
            rows.append(
                {
                    "batch": label,
                    "duration": duration,
                    "progress": progress,
                    "polls": polls,
                    "fixed_polls": fixed_polls,
                    "ratio": fixed_polls / polls,
                    "late_median_s": statistics.median(late),
                    "late_max_s": max(late),
                    "late_max_share": max(late) / duration,
                    # A fixed interval sees the end on average half an interval late, at worst a full one.
                    "fixed_late_median_s": FIXED / 2,
                    "fixed_late_max_s": FIXED,
                }
            )
    return rows


async def _real_run(url: str, api_key: str, scale: float) -> dict[str, Any]:
    """Run one BatchTrigger against the emulator with time compressed by ``scale``; count its polls."""
    import httpx

    from airflow_provider_llmbatch.triggers.batch import BatchTrigger

    duration = 72000.0 / scale
    base = url + "/openai/v1"
    headers = {"Authorization": f"Bearer {api_key}"}
    line = {
        "custom_id": "r-0",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    async with httpx.AsyncClient(base_url=base, headers=headers) as client:
        up = await client.post(
            "/files",
            data={"purpose": "batch"},
            files={"file": ("v.jsonl", json.dumps(line).encode() + b"\n")},
        )
        made = await client.post(
            "/batches",
            json={
                "input_file_id": up.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        batch_id = made.json()["id"]
        await httpx.AsyncClient().post(
            f"{url}/_emulator/batches/openai/{batch_id}/status", json={"status": "in_progress"}
        )
    trigger = BatchTrigger(
        "llmbatch_bench",
        batch_id,
        poll_interval=polling.DEFAULT_POLL_INTERVAL / scale,
        max_poll_interval=polling.DEFAULT_MAX_POLL_INTERVAL / scale,
    )
    started = time.time()

    async def finish() -> float:
        await asyncio.sleep(duration)
        async with httpx.AsyncClient() as admin:
            await admin.post(
                f"{url}/_emulator/batches/openai/{batch_id}/status", json={"status": "completed"}
            )
        return time.time()

    finisher = asyncio.create_task(finish())
    event = await anext(aiter(trigger.run()))
    fired = time.time()
    await trigger.cleanup()
    finished = await finisher
    return {
        "polls": event.payload["polls"],
        "late_share": (fired - finished) / (finished - started),
        "scale": scale,
    }


def validate(scale: float) -> dict[str, Any]:
    import subprocess

    emulator = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_llmbatch.emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert emulator.stdout is not None
        url = emulator.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
        os.environ["AIRFLOW_CONN_LLMBATCH_BENCH"] = json.dumps(
            {"conn_type": "llmbatch_openai", "host": url + "/openai/v1", "password": "emulator-key"}
        )
        return asyncio.run(_real_run(url, "emulator-key", scale))
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--validate-scale",
        type=float,
        default=2400.0,
        help="run a 20 h batch compressed this many times against the emulator (0: skip)",
    )
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "polls_per_batch.json")
    args = parser.parse_args(argv)
    rows = table(polling.DEFAULT_POLL_INTERVAL, polling.DEFAULT_MAX_POLL_INTERVAL)
    for row in rows:
        print(
            f"{row['batch']:>6} progress={row['progress']!s:<5} polls {row['polls']:>5} vs {row['fixed_polls']:>5} "
            f"({row['ratio']:.1f}x fewer) late median {row['late_median_s']:.0f}s max {row['late_max_s']:.0f}s "
            f"({row['late_max_share']:.2%})"
        )
    result: dict[str, Any] = {
        "rows": rows,
        "poll_interval": polling.DEFAULT_POLL_INTERVAL,
        "max_poll_interval": polling.DEFAULT_MAX_POLL_INTERVAL,
        "growth": polling.GROWTH,
    }
    if args.validate_scale:
        os.environ.setdefault(
            "AIRFLOW_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "llmbatch-bench-home")
        )
        real = validate(args.validate_scale)
        sim = [
            simulate(
                72000.0,
                progress=False,
                rng=random.Random(s),
                poll_interval=polling.DEFAULT_POLL_INTERVAL,
                max_poll_interval=polling.DEFAULT_MAX_POLL_INTERVAL,
            )[0]
            for s in range(SEEDS)
        ]
        real["simulated_polls_median"] = statistics.median(sim)
        result["validation"] = real
        print(
            f"real 20 h run at 1/{args.validate_scale:.0f} time: {real['polls']} polls "
            f"(simulated median {real['simulated_polls_median']}), seen {real['late_share']:.2%} late"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
