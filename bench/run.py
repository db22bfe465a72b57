#!/usr/bin/env python3
"""
Run every benchmark in one go and write ``bench/RESULTS.md``.

    python3 bench/run.py                      # everything (about 15 minutes on 2 cores)
    python3 bench/run.py --steps report       # rebuild RESULTS.md from the last recorded results

The first run creates ``bench/.venv`` with the project's ``[bench]`` extra (the peers' providers and
the openai SDK live only there, never in the runtime dependencies) and re-runs itself inside it.
Each benchmark runs its peers on this machine, in the same run, against the same emulator (a separate
process); the tables report medians of ``--repeat`` runs and ratios against each peer.
"""

# Report tables are long f-strings of markdown; wrapping them would not make them clearer.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from triggerer_load import BEFORE_REV

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
RESULTS_DIR = BENCH / "results"
STEPS = ("polls", "triggers", "request-files", "results-out", "large-job", "merge-floor", "typed", "report")

LINK_MBPS = 400
"""The upload link of the second request-file pass, in Mbit/s: a fast link from a data centre to a vendor."""
TARGET_RESULT_LINES = 50_000
"""The results-out targets are set at this many requests (the issue's 50,000-line output file)."""
TYPED_ROWS = 1_000_000
"""Rows landed as Parquet and as JSONL with an output schema (section 6)."""
TYPED_ROW_GROUPS = (16_384, 65_536)
"""Row-group sizes ``parquet+schema`` is run again with, besides the default (section 6)."""
TYPED_PEAK_RSS_MB = 200
"""The target for landing typed results as Parquet: peak RSS of the whole process, imports included."""
PACKAGES = (
    "airflow-provider-llmbatch",
    "apache-airflow",
    "apache-airflow-providers-openai",
    "apache-airflow-providers-common-ai",
    "openai",
    "httpx",
    "httpcore",
    "pydantic",
    "msgspec",
    "uvicorn",
    "psutil",
)


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> None:
    """Create bench/.venv with the [bench] extra if needed and re-run this script inside it."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = _venv_python()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"], check=True)
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


def _run(script: str, *args: str) -> None:
    print(f"\n== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(BENCH / script), *args], check=True, cwd=ROOT)


def machine() -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return [
        f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()} {platform.machine()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- Packages: {', '.join(versions)}",
        f"- Load average when the report was written: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def _load(name: str) -> Any:
    path = RESULTS_DIR / name
    return json.loads(path.read_text()) if path.exists() else None


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def trigger_section() -> list[str]:
    data = _load("triggerer_load.json")
    if data is None:
        return ["(not run)"]
    rows = {f"{r['impl']}:{r['round']}": r for r in data["rows"]}
    out = [
        "Rounds (seconds after all triggers start): polls/s, CPU and memory are read over a steady window",
        "while every batch is `in_progress`; then the batches complete one by one, shuffled, over a second",
        "window; a watchdog task sleeping 50 ms records loop lag throughout, start-up burst included. The",
        "emulator (another process) answers each request after 200 ms. Every implementation gets the same",
        "`poll_interval` (for ours also `max_poll_interval`, so its adaptive delays never exceed it).",
        "Logging at WARNING in the measured process. Medians of the runs; `worst` columns are the worst run.",
        f"`llmbatch-before` is this provider as it was before the core redesign (commit `{BEFORE_REV}`), run",
        "from that commit's package in the same run.",
        "",
        "Schedule fidelity: the polls each batch received at the emulator over the steady window, divided by",
        "the polls its implementation's own schedule called for there (for ours the adaptive schedule, for",
        "the peers their fixed `poll_interval`); mean over the batches, with the lowest and highest batch.",
        "1.00 is the schedule kept: above it spends the user's API quota, below it is latency. A peer's",
        "figure is capped at 1 per batch (polling more than its schedule is no credit). Each batch is timed",
        "from its first to its last poll in the window (so a count of a few polls is not rounded to +-1); a",
        "batch polled fewer than twice there is judged over the whole window. The last column judges every",
        "batch over the whole window, so a slow poller's batches are not picked by having been polled twice;",
        "the comparison with the peers uses it.",
        "",
        "| implementation | round | N | poll interval | polls/s | schedule fidelity (min-max) | fidelity, whole window "
        "| lag p50 / p99 / max (ms) | worst max lag (ms) "
        "| CPU ms per poll | RSS per trigger (KB) | fired / N | fired within one interval | fire delay p50 / max (s) "
        "| sockets before / peak / after | loop threads | emulator CPU (cores) | busiest poll bin / mean |",
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows.values():
        window = f"{r['fidelity_window_mean']:.3f}" if "fidelity_window_mean" in r else "n/a"
        out.append(
            f"| {r['impl']} | {r['round']} | {r['n']:,} | {r['poll_interval']:g} s | {_f(r['polls_per_s'])} "
            f"| {_fidelity_cell(r)} | {window} "
            f"| {_f(r['lag_p50_ms'])} / {_f(r['lag_p99_ms'])} / {_f(r['lag_max_ms'])} | {_f(r['lag_max_ms_worst'])} "
            f"| {r['cpu_per_poll_ms']:.2f} | {_f(r['rss_per_trigger_kb'])} | {r['fired']:.0f} / {r['n']} "
            f"| {r['fired_within_interval']:.0f} | {r['fire_p50_s']:.2f} / {r['fire_max_s']:.2f} "
            f"| {r['sockets_before']:.0f} / {r['sockets_peak']:.0f} / {r['sockets_after']:.0f} "
            f"| {r['threads_peak']:.0f} | {r['emulator_cpu_share']:.2f} | {_spread_cell(r)} |"
        )
    ours200 = rows.get("llmbatch:n200")
    out.append("")
    out.append(
        "- Busiest poll bin / mean: the steady window cut into bins of 1/20 of the poll interval, the poll "
        "arrivals at the emulator counted per bin; polls in lockstep would put every poll of an interval in "
        "one bin (about 20x the mean), polls spread evenly give about 1x (Poisson noise lifts it a little)."
    )
    for r in rows.values():
        if r.get("pools", -1) >= 0:
            out.append(
                f"- {r['impl']} {r['round']}: {r['pools']:.0f} connection pool(s) on the loop, held by "
                f"{r['pool_refs']:.0f} triggers; at most {r['sockets_peak']:.0f} sockets for {r['n']:,} triggers."
            )
    if ours200:
        for peer in ("openai", "common-ai"):
            p = rows.get(f"{peer}:n200")
            if p:
                key = "fidelity_window_mean" if "fidelity_window_mean" in p else "fidelity_mean"
                out.append(
                    f"- Ratio at N = 200: schedule fidelity (every batch over the window) "
                    f"{ours200[key] / max(p[key], 1e-9):.1f}x {peer}'s; "
                    f"polls/s {ours200['polls_per_s'] / p['polls_per_s']:.1f}x; "
                    f"CPU per poll {p['cpu_per_poll_ms'] / ours200['cpu_per_poll_ms']:.1f}x less; "
                    f"max loop lag {p['lag_max_ms'] / max(ours200['lag_max_ms'], 1e-9):.1f}x less; "
                    f"RSS per trigger {p['rss_per_trigger_kb'] / max(ours200['rss_per_trigger_kb'], 1e-9):.1f}x less."
                )
    gc_rows = [r for r in data["rows"] if r["impl"] == "llmbatch"]
    for r in gc_rows:
        out.append(
            f"- {r['impl']} {r['round']}: longest garbage-collector pause per generation (ms, first run) "
            f"{ {g: round(v) for g, v in r['gc_max_ms'].items()} }, collections {r['gc_count']}; "
            f"max lag after the start-up burst {_f(r['lag_max_ms_after_start'])} ms."
        )
    return out


def _fidelity_cell(r: dict[str, Any]) -> str:
    if "fidelity_mean" not in r:
        return ""
    return f"{r['fidelity_mean']:.3f} ({r['fidelity_min']:.2f}-{r['fidelity_max']:.2f})"


def _spread_cell(r: dict[str, Any]) -> str:
    ratio = r.get("spread_peak_to_mean")
    return "" if ratio is None or ratio != ratio else f"{ratio:.2f}x"


def targets_triggers() -> list[str]:
    data = _load("triggerer_load.json")
    if data is None:
        return []
    rows = {f"{r['impl']}:{r['round']}": r for r in data["rows"]}
    out = []
    for name in ("n200", "n1000"):
        r = rows.get(f"llmbatch:{name}")
        if r:
            ok = r["fidelity_min"] >= 0.95 and r["fidelity_max"] <= 1.05
            out.append(
                f"| N = {r['n']:,} ({r['poll_interval']:g} s): schedule fidelity within 0.95-1.05 for every batch "
                f"| mean {r['fidelity_mean']:.3f}, batches {r['fidelity_min']:.3f}-{r['fidelity_max']:.3f} "
                f"| {_verdict(ok)} |"
            )
    n1000 = rows.get("llmbatch:n1000")
    if n1000:
        out.append(
            f"| N = 1,000, 200 ms: p99 loop lag < 20 ms | {_f(n1000['lag_p99_ms'])} ms | "
            f"{_verdict(n1000['lag_p99_ms'] < 20)} |"
        )
        out.append(
            f"| N = 1,000, 200 ms: max loop lag < 100 ms | {_f(n1000['lag_max_ms'])} ms (worst run "
            f"{_f(n1000['lag_max_ms_worst'])}) | {_verdict(n1000['lag_max_ms_worst'] < 100)} |"
        )
        out.append(
            f"| N = 1,000, 200 ms: loop CPU per poll <= 1 ms | {n1000['cpu_per_poll_ms']:.2f} ms "
            f"| {_verdict(n1000['cpu_per_poll_ms'] <= 1.0)} |"
        )
    for name in ("n200", "n1000"):
        r = rows.get(f"llmbatch:{name}")
        if r:
            out.append(
                f"| N = {r['n']:,}: every trigger fires within one poll interval ({r['poll_interval']:g} s) of its "
                f"batch finishing | {r['fired_within_interval']:.0f} / {r['n']} (max {r['fire_max_s']:.2f} s, "
                f"worst run {r['fire_max_s_worst']:.2f} s) "
                f"| {_verdict(r['fire_max_s_worst'] <= r['poll_interval'] and r['fired_within_interval'] == r['n'])} |"
            )
    if n1000:
        out.append(
            f"| sockets after = sockets before | {n1000['sockets_before']:.0f} -> {n1000['sockets_after_worst']:.0f} "
            f"(peak {n1000['sockets_peak']:.0f}, one shared session) | "
            f"{_verdict(n1000['sockets_after_worst'] == n1000['sockets_before'])} |"
        )
        if "pools" in n1000:
            one_pool = n1000["pools"] == 1 and n1000["pool_refs"] == n1000["n"]
            spread = n1000["spread_peak_to_mean"]
            out.append(
                f"| one HTTP session per (origin, loop), shared by all triggers; polls spread, not in "
                f"lockstep | {n1000['pools']:.0f} session held by {n1000['pool_refs']:.0f} triggers, "
                f"{n1000['sockets_peak']:.0f} sockets; busiest {n1000['spread_bin_ms']:.0f} ms bin {spread:.2f}x the "
                f"mean (lockstep: about 20x) | {_verdict(one_pool and spread < 3)} |"
            )
    parts = rows.get("llmbatch:parts50")
    if parts:
        ok = parts["fidelity_min"] >= 0.95 and parts["fidelity_max"] <= 1.05 and parts["lag_p99_ms"] < 20
        out.append(
            f"| one trigger on 50 parts (200 ms answers): schedule fidelity within 0.95-1.05 for every part, "
            f"p99 loop lag < 20 ms | mean {parts['fidelity_mean']:.3f}, parts {parts['fidelity_min']:.3f}-"
            f"{parts['fidelity_max']:.3f}; p99 {_f(parts['lag_p99_ms'])} ms | {_verdict(ok)} |"
        )
    ours = rows.get("llmbatch:n200")
    for peer, need in (("openai", 30), ("common-ai", 5)):
        p = rows.get(f"{peer}:n200")
        if ours and p and "fidelity_window_mean" in p:
            # Every batch over the whole steady window: a slow poller's batches are not picked by having
            # been polled twice (see _fidelity in triggerer_load.py).
            mine, theirs = ours["fidelity_window_mean"], p["fidelity_window_mean"]
            ratio = mine / theirs if theirs else float("inf")
            out.append(
                f"| N = 200: schedule fidelity >= {need}x {peer}'s (every batch over the steady window) | "
                f"{mine:.3f} vs {theirs:.3f} = {ratio:.1f}x | {_verdict(ratio >= need)} |"
            )
    return out


def polls_section() -> tuple[list[str], list[str]]:
    data = _load("polls_per_batch.json")
    if data is None:
        return ["(not run)"], []
    out = [
        f"Defaults: `poll_interval` {data['poll_interval']:g} s, `max_poll_interval` {data['max_poll_interval']:g} s, "
        f"growth {data['growth']:.0%} of the time waited; OpenAI provider: a fixed 60 s. Simulated with the real "
        "`polling.delay_after_poll`, jitter included, 0.5 s per poll, median of 200 seeds. Resume latency: from the batch",
        "finishing to the poll that sees it (the task resumes right after; the triggerer adds its own",
        "scheduling time, the same for every provider).",
        "",
        "| batch | progress reported | polls (llmbatch) | polls (fixed 60 s) | fewer polls | resume latency median / max "
        "| max as share of duration | fixed 60 s latency median / max |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    targets = []
    for r in data["rows"]:
        out.append(
            f"| {r['batch']} | {'yes' if r['progress'] else 'no'} | {r['polls']:.0f} | {r['fixed_polls']} "
            f"| {r['ratio']:.1f}x | {r['late_median_s']:.0f} s / {r['late_max_s']:.0f} s | {r['late_max_share']:.2%} "
            f"| {r['fixed_late_median_s']:.0f} s / {r['fixed_late_max_s']:.0f} s |"
        )
        if r["batch"] == "20 h":
            targets.append(
                f"| 20 h batch ({'with' if r['progress'] else 'without'} progress): >= 5x fewer polls than 60 s, "
                f"resume latency < 5% | {r['ratio']:.1f}x, max {r['late_max_share']:.2%} | "
                f"{_verdict(r['ratio'] >= 5 and r['late_max_share'] < 0.05)} |"
            )
    v = data.get("validation")
    if v:
        out += [
            "",
            f"Check against the emulator: one real `BatchTrigger` waiting for a 20 h batch (no progress reported) "
            f"with time compressed {v['scale']:.0f}x (intervals and duration divided alike) made {v['polls']} polls "
            f"(simulation median {v['simulated_polls_median']:.0f}) and saw the end {v['late_share']:.2%} of the "
            "duration late.",
        ]
    out += [
        "",
        "How the interval adapts: a quarter of `poll_interval` at first (a rejected file shows up as `failed` in",
        "seconds), ramping to `poll_interval` over four intervals, then 5% of the time waited so far, capped at",
        "`max_poll_interval`; while progress counts are reported, never much past the ETA they imply; at most",
        "`poll_interval` during `finalizing`/`cancelling`; each delay shortened by up to 20% at random so",
        "waiters spread out. A 10-minute batch is polled more often than every 60 s on purpose: its end is seen",
        "within seconds, not up to a minute late.",
    ]
    return out, targets


def results_out_section() -> tuple[list[str], list[str]]:
    rows = _load("results_out.json")
    if rows is None:
        return ["(not run)"], []
    out = [
        "Download output + error files, join to the request file by custom_id, land one results JSONL.",
        "`llmbatch` = what `FetchBatchResultsOperator` runs (streamed downloads; each line parsed once into its",
        "row, spooled and indexed by custom_id in a temporary SQLite file; rows written in request order to a",
        "temporary name); `naive` = openai SDK `files.content(id).text`, `json.loads` per line, dict join,",
        "`json.dumps` per row. One request in ten fails (the request file holds N requests: 0.9 N output lines",
        "+ 0.1 N error lines). Fresh process per run; medians.",
        "",
        "| requests | output + error lines | implementation | seconds | lines/s | peak RSS growth (MB) | speed vs naive "
        "| memory vs naive |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    by = {(r["impl"], r["lines"]): r for r in rows}
    targets = []
    for r in rows:
        naive = by.get(("naive", r["lines"]))
        speed = f"{naive['seconds'] / r['seconds']:.2f}x" if naive and r["impl"] != "naive" else ""
        mem = (
            f"{naive['growth_mb'] / max(r['growth_mb'], 0.1):.1f}x less"
            if naive and r["impl"] != "naive"
            else ""
        )
        out.append(
            f"| {r['lines']:,} | {r['output_lines']:,} + {r['error_lines']:,} | {r['impl']} | {r['seconds']:.2f} "
            f"| {r['lines_per_s']:,.0f} | {r['growth_mb']:.1f} | {speed} | {mem} |"
        )
        if r["impl"] == "llmbatch" and naive and r["lines"] == TARGET_RESULT_LINES:
            targets.append(
                f"| results out at {r['lines']:,} requests: peak RSS growth < 50 MB | {r['growth_mb']:.1f} MB (max of runs "
                f"{r['growth_mb_max']:.1f}) | {_verdict(r['growth_mb_max'] < 50)} |"
            )
            targets.append(
                f"| results out: faster than the naive way | {naive['seconds'] / r['seconds']:.2f}x | "
                f"{_verdict(r['seconds'] < naive['seconds'])} |"
            )
    ours = sorted((r for r in rows if r["impl"] == "llmbatch"), key=lambda r: r["lines"])
    if len(ours) >= 2:
        # Flat: growing the line count does not grow the peak (within the target's margin).
        spread = max(r["growth_mb_max"] for r in ours) - min(r["growth_mb_max"] for r in ours)
        sizes = ", ".join(f"{r['growth_mb_max']:.1f}" for r in ours)
        targets.append(
            f"| results out: memory flat as lines grow ({ours[0]['lines']:,} to {ours[-1]['lines']:,}) "
            f"| {sizes} MB | {_verdict(ours[-1]['growth_mb_max'] < 50 and spread < 25)} |"
        )
    return out, targets


def request_files_section(name: str = "request_file_memory.md") -> tuple[list[str], list[str]]:
    path = RESULTS_DIR / name
    if not path.exists():
        return ["(not run)"], []
    text = path.read_text().splitlines()
    body = [line for line in text[2:] if line.strip() or True]
    targets = []
    import re

    for line in text:
        m = re.match(r"\| (\d+) MB \| \w+ \| [\d,]+ \| (validate|validate\+upload) \|.*", line)
        if not m:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        size, op, growth = cells[0], cells[3], float(cells[7])
        if op == "validate":
            share = cells[9] or cells[8]
            targets.append(
                f"| {size} validate: peak RSS growth < 50 MB; speed >= 50% of the bare parse limit (msgspec) "
                f"| {growth:.1f} MB, {share} | {_verdict(growth < 50 and int(share.rstrip('%') or 0) >= 50)} |"
            )
        else:
            vs = cells[10]
            over = " (loopback)" if name == "request_file_memory.md" else f" over a {LINK_MBPS} Mbit/s link"
            targets.append(
                f"| {size} validate + upload through the hook{over}: not slower than openai SDK `files.create`; "
                f"peak RSS growth < 50 MB | {vs} the SDK's speed, {growth:.1f} MB | "
                f"{_verdict(bool(vs) and float(vs.rstrip('x')) >= 1.0 and growth < 50)} |"
            )
    return body, targets


def large_job_section() -> tuple[list[str], list[str]]:
    """The large job's tables, and its targets: worker RSS, and time against the bare parse (CPU)."""
    rows = _load("large_job.json")
    if not rows:
        return [], []
    tables, targets = [], []
    for row in rows:
        create, fetch = row["create"], row["fetch"]
        bare_in, bare_out = row["bare_in"], row["bare_out"]
        kind = f"{row['line_bytes']:,} B requests" if row.get("line_bytes") else "short requests"
        peak = max(create["peak_rss_mb"], fetch["peak_rss_mb"])
        split = create["cpu_seconds"] / bare_in["cpu_seconds"]
        merge = fetch["cpu_seconds"] / bare_out["cpu_seconds"]
        tables += [
            f"### {row['requests']:,} {kind} ({row['request_bytes'] / 1e6:,.0f} MB, {row['parts']} parts)",
            "",
            f"{row['landed_rows']:,} rows landed; load average {row['load_average'][0]:.2f}. The ratios are of CPU "
            "seconds: the wall time of a step also holds the emulator's own work on the same 2 cores (storing "
            "and scanning each upload, writing the results), which a vendor does on its machines.",
            "",
            "| step | seconds | CPU seconds | peak RSS of the process (MB) | CPU vs bare msgspec of the same bytes |",
            "|---|---:|---:|---:|---:|",
            f"| bare msgspec parse of the request file ({bare_in['result']['bytes'] / 1e6:,.0f} MB) | {bare_in['seconds']:.2f} | {bare_in['cpu_seconds']:.2f} | {bare_in['peak_rss_mb']:.0f} | 1x |",
            f"| split + validate + upload + create (`CreateBatchOperator.execute`) | {create['seconds']:.2f} | {create['cpu_seconds']:.2f} | {create['peak_rss_mb']:.0f} | {split:.2f}x |",
            f"| bare msgspec parse of the output and error files ({bare_out['result']['bytes'] / 1e6:,.0f} MB) | {bare_out['seconds']:.2f} | {bare_out['cpu_seconds']:.2f} | {bare_out['peak_rss_mb']:.0f} | 1x |",
            f"| download + merge (`FetchBatchResultsOperator.execute`) | {fetch['seconds']:.2f} | {fetch['cpu_seconds']:.2f} | {fetch['peak_rss_mb']:.0f} | {merge:.2f}x |",
            "",
        ]
        targets += [
            f"| {row['requests']:,} {kind}: worker peak RSS < 150 MB (whole process, imports included) | "
            f"create {create['peak_rss_mb']:.0f} MB, fetch {fetch['peak_rss_mb']:.0f} MB | {_verdict(peak < 150)} |",
            f"| {row['requests']:,} {kind}: split+validate+upload at most 3x the bare msgspec parse | "
            f"{split:.2f}x (CPU; wall {create['seconds'] / bare_in['seconds']:.1f}x) | {_verdict(split <= 3)} |",
            f"| {row['requests']:,} {kind}: download+merge at most 3x the bare msgspec parse | "
            f"{merge:.2f}x (CPU; wall {fetch['seconds'] / bare_out['seconds']:.1f}x) | {_verdict(merge <= 3)} |",
        ]
    return tables, targets


MERGE_OPERATIONS = {
    "bare": "msgspec parse of every output line, nothing else",
    "floor": "the least a Python join does (see `merge_floor.py`): not shippable",
    "join": "`results.join_results`, what the fetch runs",
}


def merge_floor_section() -> list[str]:
    """Where the merge's time could go: the bare parse, a Python join's floor, and the join, on one set of files."""
    rows = _load("merge_floor.json")
    if not rows:
        return []
    out = [
        "The join alone (no download), on local files: N requests in parts of 50,000 and one output file per "
        "part, every request answered, shuffled within its part. CPU seconds, each operation in a fresh "
        "interpreter; peak RSS of the whole process (`join` with Airflow imported, as in a task).",
        "",
    ]
    for row in rows:
        bare = row["measured"]["bare"]["cpu_seconds"]
        kind = f"{row['line_bytes']:,} B requests" if row.get("line_bytes") else "short requests"
        out += [
            f"#### {row['requests']:,} {kind} (output files {row['output_bytes'] / 1e6:,.0f} MB)",
            "",
            "| operation | what it does | CPU seconds | vs bare msgspec | peak RSS (MB) |",
            "|---|---|---:|---:|---:|",
        ]
        for name, what in MERGE_OPERATIONS.items():
            m = row["measured"][name]
            out.append(
                f"| {name} | {what} | {m['cpu_seconds']:.2f} | {m['cpu_seconds'] / bare:.2f}x | {m['peak_rss_mb']:.0f} |"
            )
        out.append("")
    return out


TYPED_OPERATIONS = {
    "jsonl": "no schema, the landing as before",
    "jsonl+schema": "each answer validated, `output` in the row",
    "parquet+schema": "validated, typed columns",
}


def typed_section() -> tuple[list[str], list[str]]:
    """Section 6: typed results landed as Parquet and as JSONL; and its target, the Parquet landing's peak RSS."""
    data = _load("parquet_landing.json")
    if data is None:
        return ["(not run)"], []
    default_group = data["default_row_group_rows"]
    results = data["results"]
    by = {
        r["operation"]: r
        for r in results
        if r["operation"] != "parquet+schema" or r["row_group_rows"] == default_group
    }
    others = sorted(
        (r for r in results if r["operation"] == "parquet+schema" and r["row_group_rows"] != default_group),
        key=lambda r: r["row_group_rows"],
    )
    plain, typed, parquet = by.get("jsonl"), by.get("jsonl+schema"), by.get("parquet+schema")
    machine, rows = data["machine"], data["rows"]
    pyarrow = machine["packages"].get("pyarrow") or "not installed"
    load = data["load_average_before"][0], data["load_average_after"][0]
    out = [
        f"Produced {data['started']} by `{data['command']}`, on {machine['cores']} cores ({machine['python']}, "
        f"pyarrow {pyarrow}; load average {load[0]:.2f} when it started, {load[1]:.2f} when it ended), one run. "
        f"The input: a request file of {rows:,} chat requests ({data['requests_bytes'] / 1e6:,.0f} MB) and an output "
        f"file of their answers in OpenAI's line shape ({data['output_bytes'] / 1e6:,.0f} MB), already on local disk; "
        "each answer a JSON object of a pydantic model (`label` a `Literal` of three, `score` float, `summary` str, "
        f"`aspects` list of str), {data['invalid_answers']:,} of the {rows:,} not valid (prose, or a label outside "
        "the `Literal`). What runs is `results.join_results`, the join the fetch runs after its downloads, each "
        "operation in a fresh interpreter. Peak RSS is the whole process (`VmHWM`), imports included. Rows/s is "
        "rows over wall time.",
    ]
    if plain and parquet:
        out[-1] += (
            f" Airflow and the package take {plain['imports_rss_mb']:.0f} MB, pyarrow another "
            f"{parquet['imports_rss_mb'] - plain['imports_rss_mb']:.0f} MB ({parquet['imports_rss_mb']:.0f} MB "
            "before the first row)."
        )
    out += [
        "",
        "| operation | rows | rows/s | wall (s) | CPU (s) | peak RSS, whole process (MB) | after imports (MB) "
        "| file (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [*by.values(), *others]:
        what = TYPED_OPERATIONS.get(r["operation"], "")
        if r["row_group_rows"]:
            what += f", row groups of at most {r['row_group_rows']:,} rows"
            if r.get("row_groups"):
                what += f": {r['row_groups']:,} written"
        out.append(
            f"| `{r['operation']}` ({what}) | {r['rows']:,} | {r['rows_per_s']:,.0f} | {r['wall_s']:.1f} "
            f"| {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['imports_rss_mb']:.0f} | {r['bytes_out'] / 1e6:,.0f} |"
        )
    out.append("")
    targets = []
    if parquet:
        peak = parquet["peak_rss_mb"]
        ok = peak < TYPED_PEAK_RSS_MB
        room = ", with little room" if ok and peak > 0.9 * TYPED_PEAK_RSS_MB else ""
        sweep = ""
        if parquet.get("row_groups"):
            sweep = f": {parquet['row_groups']:,} row groups written, about {rows / parquet['row_groups']:,.0f} rows each"
        if others:
            sweep += "".join(
                f"; with a limit of {r['row_group_rows']:,} rows a group it wrote {r.get('row_groups') or 0:,} "
                f"groups and peaked at {r['peak_rss_mb']:.0f} MB"
                for r in others
            )
            groups = parquet.get("row_groups") or 0
            if groups and all((r.get("row_groups") or 0) >= 0.9 * groups for r in others):
                cap = data["default_row_group_bytes"] / 2**20
                sweep += f" (the {cap:.0f} MB cap on a group's JSON binds first)"
        out.append(
            f"- Target: landing {rows:,} rows as Parquet with validation against a pydantic schema, peak RSS "
            f"< {TYPED_PEAK_RSS_MB} MB: {_verdict(ok)} ({peak:.0f} MB){room}: {parquet['imports_rss_mb']:.0f} MB "
            "of it is imports. The Parquet buffer holds one row group (at most "
            f"{default_group:,} rows or about {data['default_row_group_bytes'] / 2**20:.0f} MB of their JSON) as "
            f"Python values and then as Arrow arrays{sweep}. Memory does not grow with the row count: the join's "
            "state is on disk (section 3), the Parquet writer holds one row group."
        )
        versus = ""
        if typed:
            versus = f" (JSONL with the same validation {typed['rows_per_s']:,.0f}"
            versus += f", JSONL without {plain['rows_per_s']:,.0f})" if plain else ")"
        targets.append(
            f"| landing {rows:,} rows as Parquet with validation against a pydantic schema: peak RSS "
            f"< {TYPED_PEAK_RSS_MB} MB (whole process, imports included; section 6) | {peak:.0f} MB; "
            f"{parquet['rows_per_s']:,.0f} rows/s{versus} | {_verdict(ok)} |"
        )
    counted = [r for r in (typed, parquet, *others) if r]
    if counted:
        kinds = [
            ", ".join(f"{n:,} `{status}`" for status, n in r["counts"].items() if status != "total" and n)
            + f" of {r['counts']['total']:,}"
            for r in counted
        ]
        if len(set(kinds)) == 1:
            out.append(f"- Every landing with the schema counted {kinds[0]}.")
        else:
            out.append(
                "- Counts: "
                + "; ".join(f"`{r['operation']}` {k}" for r, k in zip(counted, kinds, strict=True))
                + "."
            )
    if plain and typed and parquet:
        per_million = 1_000_000 / rows
        out.append(
            "- Validation (`OutputSchema.parse`: `json.loads` and pydantic's `model_validate`, once per answer) "
            f"costs about {(typed['cpu_s'] - plain['cpu_s']) * per_million:.1f} s of CPU per million rows; writing "
            f"Parquet instead of JSONL {_more_or_less(parquet['cpu_s'] - typed['cpu_s'], per_million)}, and its file is "
            f"{parquet['bytes_out'] / 1e6:,.0f} MB instead of {typed['bytes_out'] / 1e6:,.0f} MB (no `response` "
            "column with a schema: the typed columns are the answer)."
        )
    out.append(
        "- The wall time of each operation also holds whatever else the machine's cores were doing (see the load "
        "average above), and moves between runs on a shared machine; compare the CPU seconds."
    )
    return out, targets


def _more_or_less(seconds: float, scale: float) -> str:
    return f"about {abs(seconds) * scale:.1f} s {'more' if seconds >= 0 else 'less'}"


def report(command: str) -> None:
    polls, polls_targets = polls_section()
    out_rows, out_targets = results_out_section()
    req_rows, req_targets = request_files_section()
    link_rows, link_targets = request_files_section("request_file_link.md")
    large_rows, large_targets = large_job_section()
    floor_rows = merge_floor_section()
    typed_rows, typed_targets = typed_section()
    lines = [
        "# Benchmark results",
        "",
        f"Produced {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}` (all peers on this machine, in the same",
        "run, against the same emulator running in its own process). Absolute times on shared machines are",
        "noise; compare the ratios.",
        "",
        *machine(),
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *targets_triggers(),
        *req_targets,
        *link_targets,
        *out_targets,
        *polls_targets,
        *large_targets,
        *typed_targets,
        "",
        "## 1. Triggerer load",
        "",
        *trigger_section(),
        "",
        "## 2. Request file in",
        "",
        *req_rows,
        "",
        f"### Over a {LINK_MBPS} Mbit/s link",
        "",
        *link_rows,
        "",
        "## 3. Results out",
        "",
        *out_rows,
        "",
        "## 4. API calls per batch",
        "",
        *polls,
        "",
        "## 5. A large job end to end",
        "",
        *large_rows,
        "### Where the merge's time goes",
        "",
        *floor_rows,
        f"## 6. Typed results: {(_load('parquet_landing.json') or {}).get('rows', TYPED_ROWS):,} rows as Parquet and as JSONL",
        "",
        *typed_rows,
        "",
    ]
    notes = RESULTS_DIR / "notes.md"
    if notes.exists():
        lines += ["## Notes on this run", "", notes.read_text().strip(), ""]
    (BENCH / "RESULTS.md").write_text("\n".join(lines))
    print(f"written {BENCH / 'RESULTS.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ensure_venv()
    repeat = str(args.repeat)
    if "polls" in args.steps:
        _run("polls_per_batch.py")
    if "triggers" in args.steps:
        _run("triggerer_load.py", "--repeat", repeat)
    if "request-files" in args.steps:
        _run(
            "request_file_memory.py",
            "--sizes",
            "10",
            "100",
            "500",
            "--repeat",
            repeat,
            "--operations",
            "bare json",
            "bare msgspec",
            "validate",
            "upload",
            "validate+upload",
            "openai upload",
        )
        # The same uploads over a link slower than loopback, as to a vendor: the emulator's receiving no
        # longer takes the CPU the client's check needs.
        _run(
            "request_file_memory.py",
            "--sizes",
            "100",
            "--repeat",
            repeat,
            "--link-mbps",
            str(LINK_MBPS),
            "--output",
            str(RESULTS_DIR / "request_file_link.md"),
            "--operations",
            "upload",
            "validate+upload",
            "openai upload",
        )
    if "results-out" in args.steps:
        _run("results_out.py", "--lines", "10000", "25000", "50000", "--repeat", repeat)
    if "large-job" in args.steps:
        _run("large_job.py", "--requests", "1000000")
    if "merge-floor" in args.steps:
        _run("merge_floor.py", "--requests", "1000000")
    if "typed" in args.steps:
        _run(
            "parquet_landing.py",
            "--rows",
            str(TYPED_ROWS),
            "--row-group-rows",
            *(str(size) for size in TYPED_ROW_GROUPS),
            "--json",
            str(RESULTS_DIR / "parquet_landing.json"),
        )
    if "report" in args.steps:
        steps = "" if args.steps == list(STEPS) else " --steps " + " ".join(args.steps)
        report("python3 bench/run.py" + steps + (f" --repeat {args.repeat}" if args.repeat != 3 else ""))


if __name__ == "__main__":
    main()
