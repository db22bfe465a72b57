#!/usr/bin/env python3
"""
The emulator as a separate process for the benchmarks, driven by JSON lines on stdin.

Its CPU must not count against the event loop under test, so it never runs in the measured process.
Commands (one JSON object a line; each answers one JSON line on stdout):

- ``{"op": "prepare", "vendor": v, "n": N}``: create N batches held ``in_progress``; answers their ids;
- ``{"op": "finish", "vendor": v, "at": {batch_id: epoch_seconds}}``: complete each batch at its time;
- ``{"op": "latency", "seconds": s}``, ``{"op": "fault", "rule": {...}}``, ``{"op": "clear"}``;
- ``{"op": "finished"}``: when each batch was really completed (and forget them);
- ``{"op": "stats", "vendor": v}``: the vendor's counters plus this process's CPU seconds;
- ``{"op": "polls", "since": t0, "until": t1}``: batch polls that arrived in the window (all times, and
  the times per batch id), then forget them all;
- ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig, FaultRule, server  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _prepare(emu: Emulator, vendor: str, n: int) -> list[str]:
    line = {
        "custom_id": "r-0",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]},
    }
    spec = emu.config.vendors[vendor]
    line["url"] = spec.endpoints[0].path
    headers = {"Authorization": f"Bearer {emu.api_key}"}
    with httpx.Client(base_url=emu.base_url(vendor), headers=headers, timeout=60) as client:
        up = client.post(
            "/files",
            data={"purpose": "batch"},
            files={"file": ("bench.jsonl", json.dumps(line).encode() + b"\n", "application/jsonl")},
        )
        up.raise_for_status()
        file_id = up.json()["id"]
        ids = []
        for _ in range(n):
            made = client.post(
                "/batches",
                json={
                    "input_file_id": file_id,
                    "endpoint": spec.endpoints[0].path,
                    "completion_window": "24h",
                },
            )
            made.raise_for_status()
            ids.append(made.json()["id"])
    for batch_id in ids:
        emu.force_status(vendor, batch_id, "in_progress", hold=True)
    return ids


FINISHED: dict[str, float] = {}
POLLS: list[tuple[float, str]] = []
"""Arrival time and batch id of every batch poll (``GET .../batches/{id}``), answered or refused."""


class _PollRecorder:
    """ASGI middleware: record each batch poll as it arrives, before faults or latency apply."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            head, _, batch_id = scope["path"].rpartition("/")
            if head.endswith("/batches") and batch_id:
                POLLS.append((time.time(), batch_id))
        await self.app(scope, receive, send)


def _record_polls() -> None:
    build = server.build_app
    server.build_app = lambda runtime: _PollRecorder(build(runtime))  # type: ignore[assignment]


def _finisher(emu: Emulator, vendor: str, at: dict[str, float]) -> None:
    for batch_id, when in sorted(at.items(), key=lambda kv: kv[1]):
        delay = when - time.time()
        if delay > 0:
            time.sleep(delay)
        emu.force_status(vendor, batch_id, "completed")
        FINISHED[batch_id] = time.time()


def main() -> None:
    _record_polls()
    emu = Emulator(EmulatorConfig(time_scale=1000.0)).start()
    print(json.dumps({"url": emu.url, "api_key": emu.api_key}), flush=True)
    for raw in sys.stdin:
        cmd = json.loads(raw)
        op = cmd["op"]
        reply: dict[str, object] = {"ok": True}
        if op == "prepare":
            reply["ids"] = _prepare(emu, cmd["vendor"], cmd["n"])
        elif op == "finish":
            threading.Thread(target=_finisher, args=(emu, cmd["vendor"], cmd["at"]), daemon=True).start()
        elif op == "latency":
            emu.set_latency(cmd["seconds"])
        elif op == "fault":
            emu.add_fault(FaultRule.from_dict(cmd["rule"]))
        elif op == "clear":
            emu.clear_faults()
        elif op == "stats":
            reply["stats"] = emu.stats(cmd["vendor"])
            reply["cpu"] = _cpu()
        elif op == "polls":
            window = [(t, b) for t, b in POLLS if cmd["since"] <= t < cmd["until"]]
            reply["times"] = [t for t, _ in window]
            per_batch: dict[str, list[float]] = {}
            for t, batch_id in window:
                per_batch.setdefault(batch_id, []).append(t)
            reply["per_batch"] = per_batch
            POLLS.clear()
        elif op == "finished":
            reply["finished"] = dict(FINISHED)
            FINISHED.clear()
        elif op == "quit":
            print(json.dumps(reply), flush=True)
            break
        print(json.dumps(reply), flush=True)
    emu.stop()


if __name__ == "__main__":
    main()
