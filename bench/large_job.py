#!/usr/bin/env python3
"""
A large job end to end: 1,000,000 requests split, uploaded, completed by the emulator, fetched and merged.

The emulator runs in a process of its own (its CPU and memory are not the worker's). Each step the worker
does runs in a fresh interpreter, as a task would, and reports its wall time, its CPU time and the peak
RSS of the whole process (imports included: what a worker slot needs):

- ``create``: ``CreateBatchOperator.execute`` on the request file: the one pass that checks and splits it
  into parts within Zhipu's limits (50,000 requests a file), the uploads and the creates;
- ``fetch``: ``FetchBatchResultsOperator.execute`` on every part: downloads, joins by ``custom_id`` and
  lands one results file in input order;
- ``bare msgspec``: the yardstick: read the same bytes line by line and parse each line with msgspec,
  nothing else; once for the request file, once for the vendor's output and error files.

    .venv/bin/python bench/large_job.py                       # 1,000,000 requests
    .venv/bin/python bench/large_job.py --requests 200000     # a quicker look
"""

# ruff: noqa: E501

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENDOR = "zhipu"
CONN_ID = "llmbatch_large_bench"
API_KEY = "bench-key"


# -- the steps, each in a fresh interpreter ---------------------------------------------------------------


class _TI:
    """The task instance the operators push to: dag, task, run, map index, and XComs kept in memory."""

    dag_id, run_id, map_index, try_number = "large_bench", "manual__bench", -1, 1

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value

    def xcom_pull(self, *, task_ids: str, key: str, map_indexes: int | None = None) -> Any:
        return self.xcoms.get(key)


def _peak_rss_mb() -> float:
    """
    Return this process's peak resident set (VmHWM) in MB.

    Not ``ru_maxrss``: on Linux that survives fork and exec, so a child would report its parent's peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: an upper bound


def _measured(step: Any) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
    profile = os.environ.get("BENCH_PROFILE_DIR")
    if profile:  # where the time goes: one cProfile file per step
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(step)
        profiler.dump_stats(os.path.join(profile, f"{os.getpid()}.prof"))
    else:
        result = step()
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu0,
        "peak_rss_mb": _peak_rss_mb(),  # the whole process, imports included
        "result": result,
    }


def step_create(args: argparse.Namespace) -> dict[str, Any]:
    from airflow.sdk.bases.operator import ExecutorSafeguard

    from airflow_provider_llmbatch.operators.batch import CreateBatchOperator

    ExecutorSafeguard.test_mode = True
    op = CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=args.input, max_batches=100)
    out = _measured(lambda: op.execute({"ti": _TI("create"), "run_id": _TI.run_id}))
    out["result"] = {k: out["result"][k] for k in ("batch_ids", "request_counts", "request_count")}
    return out


def step_fetch(args: argparse.Namespace) -> dict[str, Any]:
    from airflow.sdk.bases.operator import ExecutorSafeguard
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator

    ExecutorSafeguard.test_mode = True
    op = FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=CONN_ID,
        batch_id=json.loads(args.batch_ids),
        input_file=args.input,
        destination=args.destination,
    )
    context = {"ti": _TI("fetch"), "run_id": _TI.run_id, "outlet_events": OutletEventAccessors()}
    out = _measured(lambda: op.execute(context))
    out["result"] = {"counts": out["result"]["counts"], "parts": len(out["result"]["parts"])}
    return out


def step_download(args: argparse.Namespace) -> dict[str, Any]:
    """Download the parts' output and error files for the yardstick (not measured)."""
    from airflow_provider_llmbatch.hooks.batch import BatchHook

    folder = Path(args.destination)
    paths = []
    with BatchHook(CONN_ID) as hook:
        for n, batch_id in enumerate(json.loads(args.batch_ids)):
            batch = hook.get_batch(batch_id)
            for kind, file_id in (("out", batch.output_file_id), ("err", batch.error_file_id)):
                if file_id:
                    path = folder / f"{n}.{kind}.jsonl"
                    hook.download_file(file_id, path)
                    paths.append(str(path))
    return {"result": paths}


def step_bare(args: argparse.Namespace) -> dict[str, Any]:
    import msgspec

    decode = msgspec.json.Decoder().decode

    def parse() -> dict[str, int]:
        lines = size = 0
        for name in json.loads(args.files):
            with open(name, "rb") as handle:
                for raw in handle:
                    decode(raw)
                    lines += 1
                    size += len(raw)
        return {"lines": lines, "bytes": size}

    return _measured(parse)


STEPS = {"create": step_create, "fetch": step_fetch, "download": step_download, "bare": step_bare}


def _child(step: str, env: dict[str, str], **kwargs: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--step", step]
    for key, value in kwargs.items():
        argv += [f"--{key.replace('_', '-')}", value]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the driver --------------------------------------------------------------------------------------------


def write_requests(path: Path, count: int, line_bytes: int | None) -> None:
    """
    Write ``count`` chat requests for Zhipu: about ``line_bytes`` each, the mixed Chinese and English
    review prompts of ``request_file_memory.py``; or (None) one short English line each, about 220 bytes.
    """
    from airflow_provider_llmbatch.jsonl import build_request_file
    from airflow_provider_llmbatch.vendors import REGISTRY

    if line_bytes is not None:
        sys.path.insert(0, str(BENCH))
        from request_file_memory import prompt_records

        build_request_file(
            prompt_records(count, line_bytes), path, VENDOR, model="glm-4-flash", whole_input=True
        )
        return
    url = REGISTRY[VENDOR].default_endpoint
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            body = {
                "model": "glm-4-flash",
                "messages": [{"role": "user", "content": f"Classify review {i}: the delivery was late."}],
                "max_tokens": 64,
            }
            out.write(
                json.dumps({"custom_id": f"r-{i:07d}", "method": "POST", "url": url, "body": body}) + "\n"
            )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_done(env: dict[str, str], batch_ids: list[str]) -> None:
    os.environ.update(env)
    from airflow_provider_llmbatch.hooks.batch import BatchHook

    with BatchHook(CONN_ID) as hook:
        for batch_id in batch_ids:
            while not hook.get_batch(batch_id).is_terminal:
                time.sleep(0.5)


def run(requests: int, line_bytes: int | None, work: Path) -> dict[str, Any]:
    source = work / "requests.jsonl"
    write_requests(source, requests, line_bytes)
    port = _free_port()
    emulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_llmbatch.emulator",
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--time-scale",
            "0.0001",
            "--data-dir",
            str(work / "emulator"),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        from airflow_provider_llmbatch.emulator.vendor_dialects import emulator_prefix
        from airflow_provider_llmbatch.vendors import REGISTRY

        vendor_url = base + emulator_prefix(REGISTRY[VENDOR])
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "AIRFLOW_HOME": str(work / "airflow-home"),
            f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(
                {"conn_type": f"llmbatch_{VENDOR}", "host": vendor_url, "password": API_KEY}
            ),
        }
        bare_in = _child("bare", env, files=json.dumps([str(source)]))
        create = _child("create", env, input=str(source))
        batch_ids = create["result"]["batch_ids"]
        _wait_until_done(env, batch_ids)
        fetch = _child(
            "fetch",
            env,
            input=str(source),
            batch_ids=json.dumps(batch_ids),
            destination=str(work / "results.jsonl"),
        )
        (work / "downloaded").mkdir()
        files = _child(
            "download", env, batch_ids=json.dumps(batch_ids), destination=str(work / "downloaded")
        )["result"]
        bare_out = _child("bare", env, files=json.dumps(files))
    finally:
        emulator.terminate()
        emulator.wait(timeout=30)
    landed = sum(1 for _ in (work / "results.jsonl").open("rb"))
    return {
        "requests": requests,
        "line_bytes": line_bytes,
        "request_bytes": source.stat().st_size,
        "parts": len(batch_ids),
        "landed_rows": landed,
        "bare_in": bare_in,
        "create": create,
        "fetch": fetch,
        "bare_out": bare_out,
        "load_average": os.getloadavg(),
    }


def report(row: dict[str, Any]) -> str:
    create, fetch, bare_in, bare_out = row["create"], row["fetch"], row["bare_in"], row["bare_out"]
    lines = [
        f"{row['requests']:,} requests, {row['request_bytes'] / 1e6:.0f} MB, {row['parts']} parts; "
        f"{row['landed_rows']:,} rows landed; load average {row['load_average'][0]:.2f}",
        "",
        "| step | bytes read | seconds | CPU seconds | peak RSS of the process (MB) | vs bare msgspec of the same bytes |",
        "|---|---:|---:|---:|---:|---:|",
        f"| bare msgspec, request file | {bare_in['result']['bytes'] / 1e6:.0f} MB | {bare_in['seconds']:.2f} | {bare_in['cpu_seconds']:.2f} | {bare_in['peak_rss_mb']:.0f} | 1x |",
        f"| split + validate + upload + create (`CreateBatchOperator`) | {row['request_bytes'] / 1e6:.0f} MB | {create['seconds']:.2f} | {create['cpu_seconds']:.2f} | {create['peak_rss_mb']:.0f} | {create['seconds'] / bare_in['seconds']:.2f}x |",
        f"| bare msgspec, output + error files | {bare_out['result']['bytes'] / 1e6:.0f} MB | {bare_out['seconds']:.2f} | {bare_out['cpu_seconds']:.2f} | {bare_out['peak_rss_mb']:.0f} | 1x |",
        f"| download + merge (`FetchBatchResultsOperator`) | {bare_out['result']['bytes'] / 1e6:.0f} MB (+ the request file) | {fetch['seconds']:.2f} | {fetch['cpu_seconds']:.2f} | {fetch['peak_rss_mb']:.0f} | {fetch['seconds'] / bare_out['seconds']:.2f}x |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--line-bytes", type=int, nargs="*", default=[1000, 0], help="0: short lines")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "large_job.json")
    parser.add_argument("--step", choices=sorted(STEPS))
    parser.add_argument("--input")
    parser.add_argument("--batch-ids")
    parser.add_argument("--destination")
    parser.add_argument("--files")
    args = parser.parse_args(argv)
    if args.step:
        sys.stdout.write(json.dumps(STEPS[args.step](args)) + "\n")
        return None
    rows = []
    for line_bytes in args.line_bytes:
        with tempfile.TemporaryDirectory(prefix="llmbatch-large-bench-") as tmp:
            rows.append(run(args.requests, line_bytes or None, Path(tmp)))
        print(report(rows[-1]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    args.output.with_suffix(".md").write_text("\n\n".join(report(row) for row in rows) + "\n")
    return rows


if __name__ == "__main__":
    main()
