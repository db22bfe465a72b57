#!/usr/bin/env python3
"""
Results out: download a finished batch's output and error files, join them to the requests by
custom_id and land one results JSONL; the provider's way vs. the way users write it today.

- ``llmbatch``: what ``FetchBatchResultsOperator`` runs: ``BatchHook.download_file`` of the output and
  error files (streamed to disk), then ``results.join_results``: each output and error line parsed
  once and turned into its finished row, spooled to a temporary file and indexed by custom_id in a
  temporary SQLite database; the request file then read in batches of ids looked up in the index, and
  the rows written in request order to a temporary name and moved into place;
- ``naive``: ``openai`` SDK ``files.content(id).text``, ``json.loads`` per line, a dict keyed by
  custom_id, then the request file read line by line and the joined rows written with ``json.dumps``.

The emulator (OpenAI dialect) runs in its own process and writes the output and error files in request
order. Each measurement runs in a fresh interpreter; peak RSS growth is the peak resident set during the
operation minus the resident set before it. Every vendor caps a request file at 50,000 requests, so
the line counts stop there; 10,000 to 50,000 shows whether memory stays flat.

    bench/.venv/bin/python bench/results_out.py --lines 10000 25000 50000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from request_file_memory import _reset_peak, _status_kb, prompt_records  # noqa: E402

VENDOR = "openai"
FAIL_SHARE = 10  # one request in ten fails: 50,000 requests -> 45,000 output lines + 5,000 error lines


def _records(lines: int) -> Any:
    for n, record in enumerate(prompt_records(lines, 600)):
        if n % FAIL_SHARE == 0:
            record["custom_id"] = "fail-" + record["custom_id"]
        yield record


def prepare(url: str, api_key: str, lines: int, workdir: Path) -> dict[str, Any]:
    """Build a request file, run it as a batch on the emulator, and return its ids."""
    from airflow_provider_llmbatch.jsonl import build_request_file

    path = workdir / f"requests-{lines}.jsonl"
    build_request_file(_records(lines), path, VENDOR, model="bench-model")
    base = url + "/openai/v1"
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=300) as client, open(path, "rb") as handle:
        file_id = client.post(
            "/files", data={"purpose": "batch"}, files={"file": (path.name, handle, "application/jsonl")}
        ).json()["id"]
        batch = client.post(
            "/batches",
            json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ).json()
        done = httpx.post(
            f"{url}/_emulator/batches/{VENDOR}/{batch['id']}/status",
            json={"status": "completed"},
            timeout=300,
        )
        done.raise_for_status()
        batch = client.get(f"/batches/{batch['id']}").json()
    return {
        "requests": str(path),
        "batch_id": batch["id"],
        "output_file_id": batch["output_file_id"],
        "error_file_id": batch["error_file_id"],
        "bytes": path.stat().st_size,
    }


def _llmbatch(job: dict[str, Any], out: Path) -> Any:
    from airflow_provider_llmbatch.hooks.batch import BatchHook
    from airflow_provider_llmbatch.results import join_results

    hook = BatchHook("llmbatch_bench")
    hook.get_batch(job["batch_id"])  # warm: connection lookup and HTTP client

    def run() -> Any:
        batch = hook.get_batch(job["batch_id"])
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            output = Path(tmp) / "output.jsonl"
            errors = Path(tmp) / "errors.jsonl"
            hook.download_file(batch.output_file_id, output)
            hook.download_file(batch.error_file_id, errors)
            return join_results(
                job["requests"], out, output_file=output, error_file=errors, batch_status=batch.status
            )

    return run


def _naive(job: dict[str, Any], out: Path) -> Any:
    from openai import OpenAI

    conn = json.loads(os.environ["AIRFLOW_CONN_LLMBATCH_BENCH"])
    client = OpenAI(api_key=conn["password"], base_url=conn["host"])
    client.batches.retrieve(job["batch_id"])  # warm

    def run() -> Any:
        batch = client.batches.retrieve(job["batch_id"])
        results: dict[str, Any] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            text = client.files.content(file_id).text
            for line in text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    results[row["custom_id"]] = row
        with open(job["requests"], "rb") as requests, open(out, "w") as sink:
            for line in requests:
                request = json.loads(line)
                row = results.get(request["custom_id"])
                sink.write(json.dumps({"custom_id": request["custom_id"], "result": row}) + "\n")
        return len(results)

    return run


def measure_here(impl: str, job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import gc

    out = workdir / f"results-{impl}.jsonl"
    run = (_llmbatch if impl == "llmbatch" else _naive)(job, out)
    gc.collect()
    _reset_peak()
    before = _status_kb("VmRSS") or 0
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    peak = _status_kb("VmHWM") or 0
    with open(out, "rb") as landed:
        rows = sum(1 for _ in landed)
    return {"seconds": seconds, "growth_kb": max(peak - before, 0), "rows": rows}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 25_000, 50_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "results_out.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_here(args.measure, json.loads(args.job), args.workdir)))
        return []

    emulator = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_llmbatch.emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    rows: list[dict[str, Any]] = []
    try:
        assert emulator.stdout is not None
        first = emulator.stdout.readline()
        url = first.split(" on ", 1)[1].split(" ", 1)[0]
        api_key = "emulator-key"
        with tempfile.TemporaryDirectory(prefix="llmbatch-results-bench-") as tmp:
            workdir = Path(tmp)
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "AIRFLOW_HOME": str(workdir / "airflow-home"),
                "AIRFLOW_CONN_LLMBATCH_BENCH": json.dumps(
                    {"conn_type": "llmbatch_openai", "host": url + "/openai/v1", "password": api_key}
                ),
            }
            for lines in args.lines:
                job = prepare(url, api_key, lines, workdir)
                for impl in ("llmbatch", "naive"):
                    runs = []
                    for _ in range(args.repeat):
                        done = subprocess.run(
                            [
                                sys.executable,
                                __file__,
                                "--measure",
                                impl,
                                "--job",
                                json.dumps(job),
                                "--workdir",
                                str(workdir),
                            ],
                            env=env,
                            capture_output=True,
                            text=True,
                            timeout=900,
                            check=False,
                        )
                        if done.returncode != 0:
                            raise SystemExit(f"{impl} failed:\n{done.stderr[-3000:]}")
                        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    row = {
                        "impl": impl,
                        "lines": lines,
                        "output_lines": lines - lines // FAIL_SHARE,
                        "error_lines": lines // FAIL_SHARE,
                        "seconds": statistics.median(r["seconds"] for r in runs),
                        "growth_mb": statistics.median(r["growth_kb"] for r in runs) / 1024,
                        "growth_mb_max": max(r["growth_kb"] for r in runs) / 1024,
                        "rows": runs[0]["rows"],
                        "runs": len(runs),
                    }
                    row["lines_per_s"] = lines / row["seconds"]
                    rows.append(row)
                    print(
                        f"{impl:<9} {lines:>6} lines: {row['seconds']:.2f}s "
                        f"({row['lines_per_s']:,.0f} lines/s) peak RSS growth {row['growth_mb']:.1f} MB",
                        flush=True,
                    )
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
