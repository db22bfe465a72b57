#!/usr/bin/env python3
"""
Triggerer load: N batch triggers in one event loop against the emulator, next to the peers' triggers.

Each round runs one implementation in a fresh process (``_trigger_loop.py``) with the emulator in
another (``_emulator_proc.py``), both on this machine. A round: all N triggers start at t0 and poll
batches held ``in_progress`` (the emulator answers each request after the injected latency); polls/s,
CPU per poll and memory are read over a steady window; then the batches complete one by one at
staggered times and the round records when each trigger fired; the watchdog samples loop lag every
50 ms throughout.

    bench/.venv/bin/python bench/triggerer_load.py --repeat 3
"""

# Report tables are long f-strings of markdown; wrapping them would not make them clearer.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OPENAI_CONN = "AIRFLOW_CONN_OPENAI_BENCH"
OURS_CONN = "AIRFLOW_CONN_LLMBATCH_BENCH"
START_MARGIN = 6.0  # seconds for the child to import Airflow before t0
BEFORE_REV = "cf3f557"
"""The last commit before the core redesign; ``llmbatch-before`` rounds run its package, side by side."""
BEFORE = BENCH / "_work" / "before"


def checkout_before() -> None:
    """Put the package as it was at :data:`BEFORE_REV` in ``bench/_work/before`` (once)."""
    if (BEFORE / "airflow_provider_llmbatch").is_dir():
        return
    BEFORE.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BEFORE_REV, "airflow_provider_llmbatch"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(BEFORE)], input=archive, check=True)


# name -> round settings; times are seconds after t0.
_RATE_LIMITED = {
    "kind": "429_retry_after",
    "operation": "get_batch",
    "times": None,
    "probability": 0.3,
    "retry_after": 1.0,
}

# name -> round settings; times are seconds after t0.
ROUNDS: dict[str, dict[str, Any]] = {
    "n200": {"n": 200, "poll_interval": 1.0, "steady": (4, 12), "finish": (12, 20), "end": 28},
    "n1000": {"n": 1000, "poll_interval": 5.0, "steady": (6, 16), "finish": (16, 30), "end": 40},
    "n1000-429": {
        "n": 1000,
        "poll_interval": 5.0,
        "steady": (6, 16),
        "finish": (16, 24),
        "end": 34,
        "fault": _RATE_LIMITED,
    },
    # One trigger waiting on the 50 parts of a split job: each part on its own schedule, one event.
    "parts50": {
        "n": 50,
        "poll_interval": 1.0,
        "steady": (4, 12),
        "finish": (12, 20),
        "end": 28,
        "parts": True,
    },
    "n200-429": {
        "n": 200,
        "poll_interval": 1.0,
        "steady": (4, 12),
        "finish": (12, 16),
        "end": 24,
        "fault": _RATE_LIMITED,
    },
}


class EmulatorProcess:
    def __init__(self, python: str) -> None:
        self.proc = subprocess.Popen(
            [python, str(BENCH / "_emulator_proc.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        hello = json.loads(self._read())
        self.url: str = hello["url"]
        self.api_key: str = hello["api_key"]
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the emulator process died")
        return line

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self._read())
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(op="quit")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def run_round(emu: EmulatorProcess, python: str, impl: str, name: str, latency: float) -> dict[str, Any]:
    cfg = ROUNDS[name]
    n = cfg["n"]
    emu.call(op="clear")  # faults and latency off while the batches are made
    ids: list[str] = emu.call(op="prepare", vendor="openai", n=n)["ids"]
    emu.call(op="latency", seconds=latency)
    t0 = time.time() + START_MARGIN
    f0, f1 = cfg["finish"]
    finish_at = {bid: t0 + f0 + (f1 - f0) * i / max(n - 1, 1) for i, bid in enumerate(ids)}
    # Spread in a shuffled order, so finishing order is not starting order.
    order = sorted(ids, key=lambda b: hash((b, 7)))
    finish_at = {bid: finish_at[ids[i]] for i, bid in enumerate(order)}
    s0, s1 = cfg["steady"]
    plan = {
        "impl": impl,
        "ids": ids,
        "t0": t0,
        "port": emu.port,
        "poll_interval": cfg["poll_interval"],
        "max_poll_interval": cfg["poll_interval"],
        "samples": {"s0": s0, "s1": s1},
        "end": cfg["end"],
        "parts": bool(cfg.get("parts")),
    }
    home = tempfile.mkdtemp(prefix="llmbatch-bench-home-")
    base = emu.url + "/openai/v1"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*([str(BEFORE)] if impl == "llmbatch-before" else []), str(ROOT)]),
        "AIRFLOW_HOME": home,
        OURS_CONN: json.dumps({"conn_type": "llmbatch_openai", "host": base, "password": emu.api_key}),
        OPENAI_CONN: json.dumps({"conn_type": "openai", "host": base, "password": emu.api_key}),
    }
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(
            [python, str(BENCH / "_trigger_loop.py"), json.dumps(plan)], stdout=out, env=env
        )
        emu.call(op="finish", vendor="openai", at=finish_at)
        if "fault" in cfg:
            time.sleep(max(t0 - time.time(), 0))
            emu.call(op="fault", rule=cfg["fault"])
        stats = {}
        for key, at in (("s0", s0), ("s1", s1)):
            time.sleep(max(t0 + at - time.time(), 0))
            stats[key] = emu.call(op="stats", vendor="openai")
        child.wait(timeout=cfg["end"] + START_MARGIN + 120)
        out.seek(0)
        lines = out.read().strip().splitlines()
    if child.returncode != 0 or not lines:
        raise SystemExit(f"{impl} round {name} failed (exit {child.returncode})")
    res = json.loads(lines[-1])
    finished: dict[str, float] = emu.call(op="finished")["finished"]
    polled = emu.call(op="polls", since=t0 + s0, until=t0 + s1)
    poll_times: list[float] = polled["times"]
    fidelity = _fidelity(impl, polled["per_batch"], res, (t0 + s0, t0 + s1))
    emu.call(op="clear")
    polls = stats["s1"]["stats"]["operations"].get("get_batch", 0) - stats["s0"]["stats"]["operations"].get(
        "get_batch", 0
    )
    window = s1 - s0
    smp = res["samples"]
    cpu = smp["s1"]["cpu"] - smp["s0"]["cpu"]
    late = [res["fired"][b] - finished[b] for b in finished if b in res["fired"]]
    interval = cfg["poll_interval"]
    return {
        "impl": impl,
        "round": name,
        "n": n,
        "latency": latency,
        "poll_interval": interval,
        "polls_per_s": polls / window,
        "cpu_per_poll_ms": 1000 * cpu / polls if polls else float("nan"),
        "loop_cpu_share": cpu / window,
        "emulator_cpu_share": (stats["s1"]["cpu"] - stats["s0"]["cpu"]) / window,
        "lag_p50_ms": 1000 * _pct(res["lags"], 0.5),
        "lag_p99_ms": 1000 * _pct(res["lags"], 0.99),
        "lag_max_ms": 1000 * max(res["lags"]),
        "lag_max_at_s": res["lag_times"][res["lags"].index(max(res["lags"]))],
        "lag_top": sorted(
            (
                (round(1000 * lag, 1), round(at, 2))
                for lag, at in zip(res["lags"], res["lag_times"], strict=True)
            ),
            reverse=True,
        )[:5],
        "lag_max_ms_after_start": 1000
        * max(
            (
                lag
                for lag, at in zip(res["lags"], res["lag_times"], strict=True)
                if at > 3 * cfg["poll_interval"]
            ),
            default=0.0,
        ),
        "rss_per_trigger_kb": (smp["s1"]["rss"] - res["rss_before"]) / 1024 / n,
        "fired": len(late),
        "fired_within_interval": sum(1 for x in late if x <= interval),
        "fire_p50_s": _pct(late, 0.5),
        "fire_max_s": max(late) if late else float("nan"),
        "not_fired": n - len(late),
        "sockets_before": res["sockets_before"],
        "sockets_peak": max(smp["s0"]["sockets"], smp["s1"]["sockets"]),
        "sockets_after": res["sockets_after"],
        "threads_peak": max(smp["s0"]["threads"], smp["s1"]["threads"]),
        "events": res["event_kinds"],
        "gc_max_ms": res["gc_max_ms"],
        "gc_count": res["gc_count"],
        "pools": smp["s1"].get("pools", -1),
        "pool_refs": smp["s1"].get("pool_refs", -1),
        **_spread(poll_times, t0 + s0, t0 + s1, interval),
        **fidelity,
    }


def _fidelity(
    impl: str, polls: dict[str, list[float]], res: dict[str, Any], window: tuple[float, float]
) -> dict[str, float]:
    """
    Schedule fidelity of each batch: the polls it received between its first and last poll in the steady
    window, divided by the polls its implementation's own schedule called for over that same span (the
    schedule walked from the first poll: each poll starts its scheduled delay after the previous one).
    Spanning exactly the polls seen keeps a count of a few polls from being quantised to +-1. A batch
    polled fewer than twice in the window (a slow peer's) is judged over the whole window instead: its
    polls there against the polls its schedule called for there. Ours should be 1 (above spends the
    user's quota, below is latency); a peer's figure is capped at 1 per batch: polling more than its
    schedule says is no credit.
    """
    table, step = res["schedule"], res["schedule_step"]
    cap = float("inf") if impl.startswith("llmbatch") else 1.0

    def delay(elapsed: float) -> float:
        return float(table[min(max(int(elapsed / step), 0), len(table) - 1)])

    def scheduled(first: float, last: float, started: float) -> float:
        """The polls the schedule calls for from ``first`` to ``last`` (each its delay after the last)."""
        wanted, at = 0.0, first
        while at + delay(at - started) <= last:
            at += delay(at - started)
            wanted += 1
        return wanted + (last - at) / delay(at - started)

    ratios, whole = [], []
    for batch_id, started in res["started"].items():
        times = polls.get(batch_id, [])
        in_window = min(len(times) / scheduled(window[0], window[1], started), cap)
        whole.append(in_window)
        if len(times) >= 2:
            ratios.append(min((len(times) - 1) / scheduled(min(times), max(times), started), cap))
        else:
            ratios.append(in_window)
    return {
        "fidelity_mean": statistics.fmean(ratios),
        "fidelity_min": min(ratios),
        "fidelity_max": max(ratios),
        # Every batch over the whole window: no batch chosen by how it was polled, so the fair figure
        # for comparing means (per batch it is quantised to +-1 poll, so the bounds use the one above).
        "fidelity_window_mean": statistics.fmean(whole),
    }


SPREAD_BINS = 20
"""Bins per poll interval when showing how polls spread: in lockstep one bin would take them all."""


def _spread(times: list[float], start: float, end: float, interval: float) -> dict[str, float]:
    """
    How evenly the polls arrive over the steady window: the busiest bin against the mean bin.

    The window is cut into bins of ``interval / SPREAD_BINS``; polls in lockstep (every trigger at the same
    moment of each interval) put everything in one bin of every ``SPREAD_BINS``, a ratio near
    ``SPREAD_BINS``; polls spread evenly give a ratio near 1 (Poisson noise lifts it a little).
    """
    width = interval / SPREAD_BINS
    bins = [0] * max(int((end - start) / width), 1)
    for t in times:
        index = int((t - start) / width)
        if 0 <= index < len(bins):
            bins[index] += 1
    mean = sum(bins) / len(bins)
    return {
        "spread_bin_ms": 1000 * width,
        "spread_peak_to_mean": max(bins) / mean if mean else float("nan"),
        "spread_cv": statistics.pstdev(bins) / mean if mean else float("nan"),
    }


PLAN: list[tuple[str, str]] = [
    ("llmbatch", "n200"),
    ("llmbatch-before", "n200"),
    ("openai", "n200"),
    ("common-ai", "n200"),
    ("llmbatch", "n1000"),
    ("llmbatch-before", "n1000"),
    ("llmbatch", "parts50"),
    ("llmbatch", "n1000-429"),
    ("openai", "n200-429"),
]


def median_rows(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            measured = [r[key] for r in runs if not math.isnan(r[key])]  # a run that measured nothing
            out[key] = statistics.median(measured) if measured else float("nan")
    out["runs"] = len(runs)
    # The worst of the runs for the pass/fail limits, next to the median.
    out["lag_max_ms_worst"] = max(r["lag_max_ms"] for r in runs)
    out["fire_max_s_worst"] = max(r["fire_max_s"] for r in runs)
    out["sockets_after_worst"] = max(r["sockets_after"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--only", nargs="*", help="impl:round pairs")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "triggerer_load.json")
    args = parser.parse_args(argv)
    python = sys.executable
    plan = PLAN
    if args.only:
        plan = [tuple(x.split(":", 1)) for x in args.only]  # type: ignore[misc]
    raw: dict[str, list[dict[str, Any]]] = {}
    if any(impl == "llmbatch-before" for impl, _ in plan):
        checkout_before()
    emu = EmulatorProcess(python)
    try:
        for rep in range(args.repeat):
            for impl, name in plan:
                row = run_round(emu, python, impl, name, args.latency)
                raw.setdefault(f"{impl}:{name}", []).append(row)
                print(
                    f"[{rep + 1}/{args.repeat}] {impl:<15} {name:<10} polls/s {row['polls_per_s']:7.1f} "
                    f"fidelity {row['fidelity_mean']:.3f} ({row['fidelity_min']:.2f}-{row['fidelity_max']:.2f}) "
                    f"lag p50/p99/max {row['lag_p50_ms']:.1f}/{row['lag_p99_ms']:.1f}/{row['lag_max_ms']:.1f} ms "
                    f"cpu/poll {row['cpu_per_poll_ms']:.2f} ms fired {row['fired']}/{row['n']} "
                    f"(max at {row['lag_max_at_s']:.1f}s, after start {row['lag_max_ms_after_start']:.0f} ms) "
                    f"top {row['lag_top']} fire max {row['fire_max_s']:.2f}s sockets {row['sockets_before']}/{row['sockets_peak']}/"
                    f"{row['sockets_after']} emu cpu {row['emulator_cpu_share']:.2f} gc {row['gc_count']} {row['gc_max_ms']}",
                    flush=True,
                )
    finally:
        emu.close()
    rows = [median_rows(runs) for runs in raw.values()]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows, "raw": raw}, indent=1))
    return rows


if __name__ == "__main__":
    main()
