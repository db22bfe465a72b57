#!/usr/bin/env python3
"""
How close can a results join written in Python come to the bare parse of the vendor's files?

Issue 13 asks for download+merge within 3x the CPU of a bare msgspec parse of the output and error files.
This bench separates the join from the download and measures, on the same local files, each in a fresh
interpreter (CPU seconds; peak RSS of the whole process):

- ``bare``: every output line parsed with msgspec, nothing else (the yardstick);
- ``floor``: the least a join in Python does with flat memory, a part at a time: decode the part's output
  lines in blocks into structs (the id, the status code, the body left raw), spool each row's members
  (the body spliced in as the vendor wrote it), keep an in-memory map of the part's ids to the spool,
  then read the part's request ids in blocks and write the rows in request order. No judging of errors,
  no usage, no anomalies, no resubmission rounds: a lower bound, not a join the provider could ship;
- ``join``: ``results.join_results``, the join ``FetchBatchResultsOperator`` runs after its downloads.

The files: N chat requests (``large_job.write_requests``: about 1 KB each, or short), split into parts of
50,000 as Zhipu's limit splits them, and one output file per part with every request answered, in an
order shuffled within the part (as vendors write them), each line in OpenAI's shape.

    .venv/bin/python bench/merge_floor.py                         # 1,000,000 requests, both line sizes
    .venv/bin/python bench/merge_floor.py --requests 200000
"""

# ruff: noqa: E501

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PART = 50_000
OPERATIONS = ("bare", "floor", "join")


def generate(folder: Path, requests: int, line_bytes: int | None) -> dict[str, Any]:
    """Write the request file and one output file per part; return their paths and sizes."""
    sys.path.insert(0, str(BENCH))
    from large_job import write_requests

    source = folder / "requests.jsonl"
    write_requests(source, requests, line_bytes)
    ids = [json.loads(line)["custom_id"] for line in source.open("rb")]
    rng = random.Random(13)
    outputs = []
    for start in range(0, len(ids), PART):
        part = ids[start : start + PART]
        rng.shuffle(part)
        path = folder / f"output-{len(outputs):04d}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for n, custom_id in enumerate(part):
                body = {
                    "id": f"chatcmpl-{start + n}",
                    "object": "chat.completion",
                    "created": 1764800000,
                    "model": "glm-4-flash",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": "正面。The delivery was late but the box was fine. " * 6,
                            },
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 120, "completion_tokens": 48, "total_tokens": 168},
                }
                line = {
                    "id": f"batch_req_{start + n}",
                    "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": f"req-{start + n}", "body": body},
                    "error": None,
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
        outputs.append((str(path), len(part)))
    return {
        "requests": str(source),
        "outputs": outputs,
        "request_bytes": source.stat().st_size,
        "output_bytes": sum(Path(p).stat().st_size for p, _ in outputs),
    }


# -- the operations, each in a fresh interpreter --------------------------------------------------------


def _bare(files: dict[str, Any], _: Path) -> int:
    decode = msgspec.json.Decoder().decode
    lines = 0
    for path, _count in files["outputs"]:
        with open(path, "rb") as handle:
            for raw in handle:
                decode(raw)
                lines += 1
    return lines


def _blocks(path: str) -> Any:
    """Yield a file's whole lines a block (about 1 MB) at a time."""
    with open(path, "rb") as handle:
        tail = b""
        while chunk := handle.read(1 << 20):
            chunk = tail + chunk
            cut = chunk.rfind(b"\n") + 1
            tail = chunk[cut:]
            if cut:
                yield chunk[:cut]
        if tail:
            yield tail + b"\n"


class _Response(msgspec.Struct, gc=False):
    status_code: Any = None
    body: msgspec.Raw = msgspec.Raw(b"null")


class _Line(msgspec.Struct, gc=False):
    custom_id: Any = None
    response: _Response | None = None


class _Request(msgspec.Struct, gc=False):
    custom_id: Any = None


def _floor(files: dict[str, Any], work: Path) -> int:
    decode_lines = msgspec.json.Decoder(_Line).decode_lines
    decode_requests = msgspec.json.Decoder(_Request).decode_lines
    encode = msgspec.json.Encoder().encode
    requests = _blocks(files["requests"])
    pending: list[Any] = []
    rows = 0
    with open(work / "floor.jsonl", "wb") as out, open(work / "floor.spool", "w+b") as spool:
        for path, count in files["outputs"]:
            spool.seek(0)
            spool.truncate()
            index: dict[str, tuple[int, int]] = {}
            at = 0
            for block in _blocks(path):
                members = []
                for line in decode_lines(block):
                    response = line.response
                    ok = response is not None and response.status_code == 200
                    fragment = (
                        (b'"status":"succeeded","response":' if ok else b'"status":"failed","response":')
                        + (response.body if response is not None else b"null")
                        + b',"error":null'
                    )
                    index[line.custom_id] = (at, len(fragment))
                    at += len(fragment)
                    members.append(fragment)
                spool.write(b"".join(members))
            spool.flush()
            fd = spool.fileno()
            wanted = count
            while wanted:
                if not pending:
                    pending = decode_requests(next(requests))
                    pending.reverse()
                request = pending.pop()
                wanted -= 1
                at, size = index[request.custom_id]
                rows += 1
                out.write(
                    b'{"custom_id":'
                    + encode(request.custom_id)
                    + b","
                    + os.pread(fd, size, at)
                    + b',"attempts":1}\n'
                )
    return rows


def _join(files: dict[str, Any], work: Path) -> int:
    from airflow_provider_llmbatch.results import BatchFiles, join_results

    batches = [BatchFiles("completed", output_file=path, requests=count) for path, count in files["outputs"]]
    report = join_results(files["requests"], work / "join.jsonl", batches=batches)
    return int(report.counts["total"])


STEPS = {"bare": _bare, "floor": _floor, "join": _join}


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_here(operation: str, files: dict[str, Any], work: Path) -> dict[str, Any]:
    if operation == "join":  # what a task has imported before it joins
        import airflow.sdk  # noqa: F401
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    rows = STEPS[operation](files, work)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "operation": operation,
        "rows": rows,
        "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run(requests: int, line_bytes: int | None, folder: Path) -> dict[str, Any]:
    files = generate(folder, requests, line_bytes)
    (folder / "files.json").write_text(json.dumps(files))
    measured = {}
    for operation in OPERATIONS:
        argv = [sys.executable, __file__, "--measure", operation, "--workdir", str(folder)]
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if done.returncode != 0:
            raise SystemExit(f"{operation} failed:\n{done.stderr[-4000:]}")
        measured[operation] = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "requests": requests,
        "line_bytes": line_bytes,
        **{k: files[k] for k in ("request_bytes", "output_bytes")},
        "measured": measured,
        "load_average": os.getloadavg(),
    }


def report(row: dict[str, Any]) -> str:
    bare = row["measured"]["bare"]["cpu_seconds"]
    size = f"{row['line_bytes']:,} B" if row["line_bytes"] else "short"
    lines = [
        f"{row['requests']:,} {size} requests ({row['request_bytes'] / 1e6:.0f} MB), output files {row['output_bytes'] / 1e6:.0f} MB; load average {row['load_average'][0]:.2f}",
        "",
        "| operation | rows | CPU seconds | vs bare msgspec | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for operation in OPERATIONS:
        m = row["measured"][operation]
        lines.append(
            f"| {operation} | {m['rows']:,} | {m['cpu_seconds']:.2f} | {m['cpu_seconds'] / bare:.2f}x | {m['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--line-bytes", type=int, nargs="*", default=[1000, 0], help="0: short lines")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "merge_floor.json")
    parser.add_argument("--measure", choices=OPERATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        files = json.loads((args.workdir / "files.json").read_text())
        print(json.dumps(measure_here(args.measure, files, args.workdir)))
        return
    rows = []
    for line_bytes in args.line_bytes:
        with tempfile.TemporaryDirectory(prefix="llmbatch-merge-floor-") as tmp:
            rows.append(run(args.requests, line_bytes or None, Path(tmp)))
        print(report(rows[-1]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    args.output.with_suffix(".md").write_text("\n\n".join(report(row) for row in rows) + "\n")


if __name__ == "__main__":
    main()
