#!/usr/bin/env python3
"""
One event loop running N batch triggers, as a triggerer does; the process under test of ``triggerer_load``.

Reads its plan as JSON (argv[1]) and prints what it measured as one JSON line. The emulator runs in
another process; the parent schedules when batches finish and reads the emulator's poll counts at the
same epoch times this process samples its own CPU and memory.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil


def _sockets(proc: psutil.Process, port: int) -> int:
    return sum(1 for c in proc.net_connections(kind="tcp") if c.raddr and c.raddr[1] == port)


def _pools(impl: str, loop: asyncio.AbstractEventLoop) -> dict[str, int]:
    """Return the connection pools on this loop and the triggers holding them (ours only)."""
    if not impl.startswith("llmbatch"):
        return {}
    try:
        from airflow_provider_llmbatch.hooks.transport import shared_sessions as shared
    except ImportError:  # the release before the redesign
        from airflow_provider_llmbatch.hooks._pool import shared_clients as shared

    pools = shared(loop)
    return {"pools": len(pools), "pool_refs": sum(pools.values())}


def _schedule(impl: str, plan: dict[str, Any]) -> Callable[[float], float]:
    """Return the implementation's own scheduled delay between poll starts, by seconds waited so far."""
    interval, most = plan["poll_interval"], plan.get("max_poll_interval", plan["poll_interval"])
    if not impl.startswith("llmbatch"):
        return lambda _elapsed: interval
    from airflow_provider_llmbatch import polling

    if hasattr(polling, "scheduled_delay"):
        return lambda e: polling.scheduled_delay(e, None, poll_interval=interval, max_poll_interval=most)

    class _NoJitter:  # the release before the redesign: its nominal delay, jitter off
        def random(self) -> float:
            return 0.0

    return lambda e: polling.next_poll_delay(
        e, None, poll_interval=interval, max_poll_interval=most, rng=_NoJitter()
    )


SCHEDULE_STEP = 0.05
"""Seconds between the samples of the schedule a round reports (delay by time waited)."""


def _make(impl: str, batch_id: str | list[str], plan: dict[str, Any]) -> Any:
    interval = plan["poll_interval"]
    if impl.startswith("llmbatch"):
        from airflow_provider_llmbatch.triggers.batch import BatchTrigger

        # The parts of one job as ``batch_ids``; one batch as before, which the release before parts takes.
        one, parts = (None, {"batch_ids": batch_id}) if isinstance(batch_id, list) else (batch_id, {})
        return BatchTrigger(
            "llmbatch_bench",
            one,
            **parts,
            poll_interval=interval,
            max_poll_interval=plan.get("max_poll_interval", interval),
            cancel_on_kill=False,
            cancel_on_timeout=False,
            max_consecutive_errors=1000,
        )
    if impl == "openai":
        from airflow.providers.openai.triggers.openai import OpenAIBatchTrigger

        return OpenAIBatchTrigger("openai_bench", batch_id, poll_interval=interval, timeout=3600)
    if impl == "common-ai":
        from airflow.providers.common.ai.triggers.llm_batch import LLMBatchTrigger

        return LLMBatchTrigger(
            llm_conn_id="openai_bench",
            adapter="openai",
            batch_id=batch_id,
            poll_interval=interval,
            end_time=time.time() + 3600,
            cancel_on_kill=False,
            cancel_on_timeout=False,
        )
    raise SystemExit(f"unknown implementation {impl!r}")


async def _main(plan: dict[str, Any]) -> dict[str, Any]:
    proc = psutil.Process()
    port = plan["port"]
    impl = plan["impl"]
    ids: list[str] = plan["ids"]
    loop = asyncio.get_running_loop()
    # Import everything before the baseline, so RSS per trigger is the triggers' own.
    for batch_id in ids[:1]:
        _make(impl, batch_id, plan)
    gc.collect()
    rss_before = proc.memory_info().rss
    sockets_before = _sockets(proc, port)
    t0 = plan["t0"]
    await asyncio.sleep(max(t0 - time.time(), 0))

    lags: list[float] = []
    lag_times: list[float] = []
    stop = asyncio.Event()

    async def watchdog() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.05)
            lags.append(time.perf_counter() - started - 0.05)
            lag_times.append(time.time() - t0)

    samples: dict[str, dict[str, float]] = {}

    async def sample(name: str, at: float) -> None:
        await asyncio.sleep(max(at - time.time(), 0))
        cpu = proc.cpu_times()
        samples[name] = {
            "t": time.time(),
            "cpu": cpu.user + cpu.system,
            "rss": proc.memory_info().rss,
            # Listing sockets reads /proc at length: off the loop, so the probe does not make lag.
            "sockets": await asyncio.to_thread(_sockets, proc, port),
            "threads": proc.num_threads(),
            **_pools(impl, asyncio.get_running_loop()),
        }

    fired: dict[str, float] = {}
    started: dict[str, float] = {}
    events: dict[str, Any] = {}

    async def run_one(trigger: Any, batch_ids: list[str]) -> None:
        try:
            async for event in trigger.run():
                for batch_id in batch_ids:  # the parts of one trigger fire together
                    fired[batch_id] = time.time()
                    events[batch_id] = event.payload
                break
        finally:
            await trigger.cleanup()

    gc_pauses: list[tuple[int, float]] = []
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_started[0]))

    gc.callbacks.append(on_gc)
    dog = asyncio.create_task(watchdog())
    samplers = [asyncio.create_task(sample(k, t0 + v)) for k, v in plan["samples"].items()]
    tasks = []
    # One trigger per batch, or (``parts``) one trigger waiting on every batch, as a split job's sensor.
    groups = [ids] if plan.get("parts") else [[batch_id] for batch_id in ids]
    for group in groups:
        started.update(dict.fromkeys(group, time.time()))
        trigger = _make(impl, group if plan.get("parts") else group[0], plan)
        tasks.append(asyncio.create_task(run_one(trigger, group)))
        await asyncio.sleep(0)  # as the triggerer starts them, one at a time
    _done, pending = await asyncio.wait(tasks, timeout=max(t0 + plan["end"] - time.time(), 0))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.gather(*samplers, return_exceptions=True)
    stop.set()
    await dog
    gc.callbacks.remove(on_gc)
    # What a triggerer would hold once these triggers are gone.
    gc.collect()
    await asyncio.sleep(0.5)
    sockets_after = _sockets(proc, port)
    kinds: dict[str, int] = {}
    for payload in events.values():
        kind = str(payload.get("event") or payload.get("status"))
        kinds[kind] = kinds.get(kind, 0) + 1
    del loop
    schedule = _schedule(impl, plan)
    return {
        # The implementation's own scheduled delay, sampled by seconds waited: the parent judges each
        # batch's polls against it.
        "schedule": [schedule(i * SCHEDULE_STEP) for i in range(int((plan["end"] + 10) / SCHEDULE_STEP))],
        "schedule_step": SCHEDULE_STEP,
        "started": started,
        "impl": impl,
        "n": len(ids),
        "lags": lags,
        "lag_times": lag_times,
        "gc_max_ms": {
            str(g): 1000 * max((d for gen, d in gc_pauses if gen == g), default=0.0) for g in (0, 1, 2)
        },
        "gc_count": {str(g): sum(1 for gen, _ in gc_pauses if gen == g) for g in (0, 1, 2)},
        "samples": samples,
        "fired": fired,
        "event_kinds": kinds,
        "not_fired": len(pending),
        "rss_before": rss_before,
        "sockets_before": sockets_before,
        "sockets_after": sockets_after,
    }


def main() -> None:
    plan = json.loads(sys.argv[1])
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("airflow", "airflow.task", "httpx", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if os.environ.get("BENCH_PROFILE"):
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, _main(plan))
        profiler.dump_stats(os.environ["BENCH_PROFILE"])
    else:
        result = asyncio.run(_main(plan))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # peers' clients are never closed; do not let their teardown hang the run


if __name__ == "__main__":
    main()
