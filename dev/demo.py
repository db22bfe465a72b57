"""
Run the example pipeline end to end against the bundled emulator, in a private Airflow.

    python3 tasks.py demo [--vendor all|zhipu|moonshot|dashscope|openai]
    python -m dev.demo ...      # the same, from the repository root, in an installed environment

Starts the emulator on a free loopback port, prepares a private ``AIRFLOW_HOME`` (``./airflow-home``:
a SQLite metadata database, migrated once and reused), points the connections ``llmbatch_<vendor>``
at the emulator through ``AIRFLOW_CONN_*`` variables and runs ``example_llmbatch_pipeline`` with
``dag.test()`` once per vendor, in one Airflow child process. The batch sensor defers for real: its
trigger runs in line, then the task resumes. Prints per vendor the run state, whether the sensor
deferred, where the results landed, the counts, the tokens and the wall time; exits non-zero if a
run failed.

Repository tooling, not part of the wheel: :mod:`dev.local_airflow` (the private Airflow) is also
what the test suite runs Airflow with.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from airflow_provider_llmbatch.emulator.config import DEFAULT_TIME_SCALE
from airflow_provider_llmbatch.vendors import REGISTRY
from dev.local_airflow import PIPELINE_DAG_ID, DagTestRun, LocalAirflow

DEMO_REPLIES: tuple[tuple[str, str], ...] = (
    (r"(?i)\b(but|though|although|however)\b|但|不过", '{"sentiment": "mixed", "issue": "trade-off"}'),
    (
        r"(?i)disconnect|broke|stopped|refund|return|worst|cheap|late|差|坏|退",
        '{"sentiment": "negative", "issue": "quality"}',
    ),
    (r"(?i)great|love|excellent|perfect|best|lasts|好|棒|喜欢", '{"sentiment": "positive", "issue": null}'),
    (r"", '{"sentiment": "neutral", "issue": null}'),
)
"""Keyword rules that let the emulator answer the pipeline's prompts the way a model would."""


def _default_home() -> Path:
    return Path.cwd() / "airflow-home"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dev.demo",
        description="Run the example LLM batch pipeline in a private Airflow against the bundled emulator.",
    )
    parser.add_argument(
        "--vendor",
        choices=["all", *REGISTRY],
        default="all",
        help="which vendor's pipeline to run (default: all, one after the other)",
    )
    parser.add_argument(
        "--home", type=Path, default=None, help="AIRFLOW_HOME to use (default: ./airflow-home)"
    )
    parser.add_argument("--dags-folder", type=Path, default=None, help="DAGs folder (default: example_dags/)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=DEFAULT_TIME_SCALE,
        help=(
            f"emulator time scale: a batch takes about 1.4 s times this (default: the emulator's,"
            f" {DEFAULT_TIME_SCALE:g}: the sensor defers and its trigger polls for real)"
        ),
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="the batch sensor's poll interval, seconds (default: 1)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed for all runs (default: 600)"
    )
    return parser.parse_args(argv)


def _print_run(vendor: str, run: DagTestRun) -> None:
    fetched = run.xcoms.get("fetch_results") or {}
    summary = run.xcoms.get("summarize") or {}
    counts = ", ".join(f"{k} {v}" for k, v in (fetched.get("counts") or {}).items() if v) or "-"
    tokens = (fetched.get("usage") or {}).get("total_tokens", "-")
    print(
        f"{vendor:<10} {run.state or 'not run':<8} deferred: {'yes' if run.deferrals else 'no':<4}"
        f"requests: {counts}; tokens: {tokens}; {run.seconds:.1f} s",
        flush=True,
    )
    print(f"{'':<10} results:   {fetched.get('result_uri', '-')}", flush=True)
    if summary:
        print(f"{'':<10} summary:   {summary.get('summary')}", flush=True)
        print(f"{'':<10} sentiment: {summary.get('sentiment')}", flush=True)
    if not run.succeeded:
        failed = sorted(task for task, state in run.tasks.items() if state != "success")
        print(f"{'':<10} failed:    {run.error or ', '.join(failed)}; log: {run.log_path}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 when every run succeeded."""
    args = _parse_args(argv)
    home = (args.home or _default_home()).resolve()
    # Set before anything can import Airflow, so this process never touches ~/airflow either.
    os.environ["AIRFLOW_HOME"] = str(home)
    from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig

    wall = time.monotonic()
    airflow = LocalAirflow(home, args.dags_folder)
    vendors = list(REGISTRY) if args.vendor == "all" else [args.vendor]
    print(f"AIRFLOW_HOME {airflow.home}\nDAGs folder  {airflow.dags_folder}", flush=True)
    clock = time.monotonic()
    if airflow.migrate():
        print(f"metadata database created in {time.monotonic() - clock:.1f} s", flush=True)
    config = EmulatorConfig(time_scale=args.time_scale, replies=DEMO_REPLIES)
    with Emulator(config) as emulator:
        print(f"emulator     {emulator.url} (time scale {args.time_scale})", flush=True)
        print(
            f"\nRunning {PIPELINE_DAG_ID} for {', '.join(vendors)}. The emulator plays the model with"
            " canned keyword rules,\nso the sentiment labels are a stand-in for a real model's.\n",
            flush=True,
        )
        connections: dict[str, str] = {}
        for vendor in REGISTRY:
            connections.update(emulator.airflow_conn_env(vendor, f"llmbatch_{vendor}"))
        plan = [
            (
                PIPELINE_DAG_ID,
                {
                    "LLMBATCH_PIPELINE_VENDOR": vendor,
                    "LLMBATCH_OUTPUT_DIR": str(airflow.home / "llmbatch-pipeline" / vendor),
                },
            )
            for vendor in vendors
        ]
        pending = iter(vendors)
        runs = airflow.run_dag_tests(
            plan,
            env={**connections, "LLMBATCH_EXAMPLE_POLL_INTERVAL": str(args.poll_interval)},
            timeout=args.timeout,
            log_path=airflow.home / "logs" / "demo.log",
            on_run=lambda run: _print_run(next(pending), run),
        )
    ok = sum(run.succeeded for run in runs)
    log = airflow.home / "logs" / "demo.log"
    print(
        f"\n{ok}/{len(runs)} runs succeeded in {time.monotonic() - wall:.1f} s (full log: {log})", flush=True
    )
    return 0 if ok == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
