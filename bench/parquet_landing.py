#!/usr/bin/env python3
"""
Landing typed results: 1,000,000 rows validated against a pydantic schema, as Parquet and as JSONL.

What runs is ``results.join_results``, the join ``FetchBatchResultsOperator`` runs after downloading the
vendor's files, on files already on local disk (the download is measured in ``results_out.py``):

- ``jsonl``: the join as it was before output schemas, no validation (the yardstick);
- ``jsonl+schema``: each succeeded answer parsed and validated against the pydantic model, rows with
  ``output`` (or ``invalid_output``) landed as JSONL;
- ``parquet+schema``: the same, landed as Parquet with typed columns, in row groups of 8,192 rows.

The input: a request file of N chat requests and an output file of N answers in OpenAI's line shape,
each answer a JSON object of the ``Review`` model below; one in ten is not valid (prose, or a label
outside the enum). Each operation runs in a fresh interpreter, which reports its peak RSS (the whole
process, imports included: ``VmHWM``), its RSS once its imports are done, its wall and CPU time, and rows
per second (N / wall). ``--row-group-rows`` runs ``parquet+schema`` again with other row-group sizes;
``--json`` records the rows, the counts and the machine (pyarrow version, input sizes, load average).

    .venv/bin/python bench/parquet_landing.py --rows 1000000
    .venv/bin/python bench/parquet_landing.py --rows 1000000 --row-group-rows 16384 65536 \
        --json bench/results/parquet_landing.json                 # what bench/run.py --steps typed runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OPERATIONS = ("jsonl", "jsonl+schema", "parquet+schema")


class Review(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    score: float
    summary: str
    aspects: list[str]


def generate(rows: int, folder: Path) -> tuple[Path, Path, int]:
    """Write the request file and the output file of ``rows`` requests; return both and the invalid count."""
    requests, output = folder / "requests.jsonl", folder / "output.jsonl"
    labels = ("positive", "negative", "neutral")
    invalid = 0
    with requests.open("w") as req, output.open("w") as out:
        for i in range(rows):
            custom_id = f"review-{i:07d}"
            prompt = f"Classify this review: the soup was {'hot' if i % 2 else 'cold'} and service {i % 7}/7."
            body = {"model": "bench-model", "messages": [{"role": "user", "content": prompt}]}
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
            req.write(json.dumps(line) + "\n")
            if i % 20 == 7:
                answer = "I would say it is mostly positive."
                invalid += 1
            elif i % 20 == 13:
                invalid += 1
                answer = json.dumps({"label": "mixed", "score": 0.5, "summary": "?", "aspects": []})
            else:
                answer = json.dumps(
                    {
                        "label": labels[i % 3],
                        "score": (i % 100) / 100,
                        "summary": f"review {i} in one line",
                        "aspects": ["food", "service"][: 1 + i % 2],
                    }
                )
            usage = {"prompt_tokens": 20 + i % 5, "completion_tokens": 30, "total_tokens": 50 + i % 5}
            answer_body = {
                "id": f"chatcmpl-{i}",
                "object": "chat.completion",
                "model": "bench-model",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                ],
                "usage": usage,
            }
            result = {
                "id": f"batch_req_{i}",
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": f"req-{i}", "body": answer_body},
                "error": None,
            }
            out.write(json.dumps(result) + "\n")
    return requests, output, invalid


def _status_mb(field: str) -> float:
    """
    Return ``VmHWM`` (peak) or ``VmRSS`` (now) of this process in MB.

    Not ``ru_maxrss`` for the peak: on Linux that survives fork and exec, so a child would report its
    parent's peak if it were higher.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: an upper bound


def run_one(operation: str, requests: str, output: str, destination: str, row_group_rows: int | None) -> None:
    """Run one landing in this process and print its measurements as JSON."""
    sys.path.insert(0, str(ROOT))
    from airflow_provider_llmbatch.parquet_out import DEFAULT_ROW_GROUP_ROWS, pyarrow_modules
    from airflow_provider_llmbatch.results import join_results
    from airflow_provider_llmbatch.schema import OutputSchema

    schema = OutputSchema.of(Review) if operation.endswith("+schema") else None
    fmt = "parquet" if operation.startswith("parquet") else "jsonl"
    if fmt == "parquet":
        pyarrow_modules()  # the join imports pyarrow when it starts: count it with the imports
    rows_per_group = row_group_rows or DEFAULT_ROW_GROUP_ROWS
    imports_mb = _status_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    report = join_results(
        requests,
        destination,
        output_file=output,
        output_schema=schema,
        format=fmt,
        row_group_rows=rows_per_group,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak_mb = _status_mb("VmHWM")
    groups = None
    if fmt == "parquet":
        groups = pyarrow_modules()[1].ParquetFile(destination).metadata.num_row_groups
    print(
        json.dumps(
            {
                "operation": operation,
                "row_group_rows": rows_per_group if fmt == "parquet" else None,
                "row_groups": groups,
                "rows": report.counts["total"],
                "counts": report.counts,
                "wall_s": wall,
                "cpu_s": cpu,
                "rows_per_s": report.counts["total"] / wall,
                "peak_rss_mb": peak_mb,
                "imports_rss_mb": imports_mb,
                "bytes_out": os.path.getsize(destination),
                "load_average": os.getloadavg(),
            }
        )
    )


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _machine() -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {
            name: _version(name)
            for name in ("airflow-provider-llmbatch", "apache-airflow", "pyarrow", "pydantic", "msgspec")
        },
    }


def _land(
    operation: str, requests: Path, output: Path, folder: Path, row_group_rows: int | None
) -> dict[str, Any]:
    """Run one operation in a fresh interpreter and return what it reported."""
    suffix = "parquet" if operation.startswith("parquet") else "jsonl"
    destination = folder / f"results-{operation.replace('+', '-')}.{suffix}"
    command = [sys.executable, __file__, "--one", operation, str(requests), str(output), str(destination)]
    if row_group_rows:
        command += ["--row-group-rows", str(row_group_rows)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    destination.unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    parser.add_argument(
        "--row-group-rows",
        type=int,
        nargs="*",
        default=[],
        help="with --one: rows per Parquet row group; otherwise: run parquet+schema again with each size",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the measurements to this JSON file")
    parser.add_argument("--one", nargs=4, metavar=("OPERATION", "REQUESTS", "OUTPUT", "DESTINATION"))
    args = parser.parse_args()
    if args.one:
        run_one(*args.one, row_group_rows=args.row_group_rows[0] if args.row_group_rows else None)
        return
    load_before = os.getloadavg()
    started_at = datetime.now(UTC)
    runs = [(operation, None) for operation in args.operations]
    runs += [("parquet+schema", size) for size in args.row_group_rows]
    measured = []
    with tempfile.TemporaryDirectory(prefix="llmbatch-bench-parquet-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        requests, output, invalid = generate(args.rows, folder)
        generate_s = time.perf_counter() - started
        requests_bytes, output_bytes = requests.stat().st_size, output.stat().st_size
        print(
            f"# {args.rows:,} rows ({invalid:,} answers not valid): requests {requests_bytes / 1e6:.0f} MB, "
            f"output {output_bytes / 1e6:.0f} MB (generated in {generate_s:.0f} s); "
            f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
            flush=True,
        )
        print(
            "| operation | row group | rows | rows/s | wall (s) | CPU (s) "
            "| peak RSS, whole process (MB) | after imports (MB) | file (MB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for operation, row_group_rows in runs:
            m = _land(operation, requests, output, folder, row_group_rows)
            measured.append(m)
            group = f"{m['row_group_rows']:,} ({m['row_groups']:,} written)" if m["row_group_rows"] else ""
            print(
                f"| `{operation}` | {group} | {m['rows']:,} | {m['rows_per_s']:,.0f} | {m['wall_s']:.1f} "
                f"| {m['cpu_s']:.1f} | {m['peak_rss_mb']:.0f} | {m['imports_rss_mb']:.0f} "
                f"| {m['bytes_out'] / 1e6:.0f} |",
                flush=True,
            )
            print(f"<!-- {operation} counts: {m['counts']} -->", flush=True)
    if args.json:
        sys.path.insert(0, str(ROOT))
        from airflow_provider_llmbatch.parquet_out import DEFAULT_ROW_GROUP_BYTES, DEFAULT_ROW_GROUP_ROWS

        record = {
            "command": shlex.join(["python3", os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
            "started": started_at.strftime("%Y-%m-%d %H:%M UTC"),
            "rows": args.rows,
            "invalid_answers": invalid,
            "requests_bytes": requests_bytes,
            "output_bytes": output_bytes,
            "generate_s": generate_s,
            "default_row_group_rows": DEFAULT_ROW_GROUP_ROWS,
            "default_row_group_bytes": DEFAULT_ROW_GROUP_BYTES,
            "machine": _machine(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "results": measured,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
