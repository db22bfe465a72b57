#!/usr/bin/env python3
"""
Request files: memory and throughput of validating, building, splitting and uploading them.

Generates realistic chat request files (10 MB, 100 MB, 500 MB by default: 10 and 100), then measures
each operation in a fresh interpreter, so one measurement's high-water mark cannot leak into the next:

- ``bare json`` / ``bare msgspec``: read lines and parse them, nothing else (the yardstick);
- ``validate``: ``validate_request_file`` (every rule, SHA-256 included);
- ``fingerprint``, ``build`` (from a stream of prompt records), ``split`` (into four parts);
- ``upload``: ``BatchHook.upload_file`` of the file as it is, to the bundled emulator (in a process
  of its own unless ``LLMBATCH_BENCH_EMULATOR_URL`` names a running one);
- ``validate+upload``: what ``CreateBatchOperator`` runs, ``upload_file(..., check=RequestFileCheck(...))``:
  the file is checked as it streams into the upload, one pass, the report and SHA-256 included;
- ``openai upload``: the openai SDK's ``files.create`` with an open file handle, to the same emulator
  (needs the ``[bench]`` extra, as in ``bench/.venv``).

Rounds take every operation in turn (one fresh interpreter per run), after one untimed upload that
warms the emulator; every upload run deletes its file again, untimed, so each run meets the emulator
with the same disk.

Peak RSS growth is the process's peak resident set during the operation minus its resident set just
before it (Linux: the peak is reset through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss`` is used,
which can only over-state). Throughput is file bytes (10^6) per second; the median of ``--repeat``
runs counts for time, the largest for memory.

    python bench/request_file_memory.py                 # 10 MB and 100 MB
    python bench/request_file_memory.py --sizes 500     # 500 MB (DashScope's limit)
    python bench/request_file_memory.py --no-upload --repeat 1
    bench/.venv/bin/python bench/request_file_memory.py --sizes 10 100 500 --operations upload \\
        validate+upload "openai upload"

The table is printed and written to ``bench/results/request_file_memory.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "request_file_memory.md"
MB = 1_000_000
TARGET_GROWTH_MB = 50
TARGET_SPEED_SHARE = 0.5
OPERATIONS = (
    "noop",
    "bare json",
    "bare msgspec",
    "validate",
    "fingerprint",
    "build",
    "split",
    "upload",
    "validate+upload",
    "openai upload",
)
UPLOADS = ("upload", "validate+upload", "openai upload")
EMULATOR_URL_ENV = "LLMBATCH_BENCH_EMULATOR_URL"

_ZH = [
    "请阅读下面的用户评论，判断情感倾向（正面、负面或中性），并用一句话说明理由。",
    "这款耳机的音质非常好，但是佩戴久了耳朵会有点疼，续航也比宣传的短一些。",
    "物流很快，包装完好，客服回复及时，整体购物体验令人满意，下次还会再来。",
    "请把以下段落翻译成英文，保持专业术语准确，语气正式。",
]
_EN = [
    "Summarize the following support ticket in two sentences and suggest the next action. ",
    "The customer reports that the export job fails after the latest update with a timeout error. ",
    "Classify the review as positive, negative or neutral and extract the product aspects mentioned. ",
    "Please answer concisely; if the question cannot be answered from the context, say so. ",
]


# ------------------------------------------------------------------------------------------ generating


def prompt_records(lines: int, line_bytes: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """Yield prompt records whose request lines come out at about ``line_bytes`` each."""
    rng = random.Random(seed)
    # About 250 bytes of each line are keys, ids and the system prompt; the last piece overshoots by ~50.
    target = max(line_bytes - 300, 40)
    for n in range(lines):
        parts: list[str] = []
        size = 0
        wanted = target * rng.uniform(0.8, 1.2)
        while size < wanted:
            piece = rng.choice(_ZH if rng.random() < 0.5 else _EN)
            parts.append(piece)
            size += len(piece.encode())
        yield {
            "custom_id": f"review-{n:06d}",
            "system": "You are a careful analyst. Answer in the language of the question.",
            "prompt": "".join(parts),
            "params": {"max_tokens": rng.choice((256, 512, 1024))},
        }


def generate(path: Path, vendor: str, lines: int, size_bytes: int) -> int:
    """Write a request file of about ``size_bytes`` with ``lines`` chat requests; return its size."""
    from airflow_provider_llmbatch.jsonl import build_request_file

    report = build_request_file(
        prompt_records(lines, size_bytes // lines), path, vendor, model="bench-model", params=None
    )
    return report.bytes


# ------------------------------------------------------------------------------------------- measuring


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _maxrss_kb() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage // 1024 if sys.platform == "darwin" else usage


def _nothing(result: object) -> None:
    return None


def _operation(
    name: str, path: Path, vendor: str, lines: int, workdir: Path
) -> tuple[Callable[[], object], Callable[[object], None]]:
    """Return the operation to time (its set-up, imports and emulator, done) and its untimed clean-up."""
    from airflow_provider_llmbatch import jsonl

    if name == "noop":
        return (lambda: None), _nothing
    if name == "bare json":

        def bare_json() -> None:
            with open(path, "rb") as handle:
                for line in handle:
                    json.loads(line)

        return bare_json, _nothing
    if name == "bare msgspec":
        import msgspec

        decode = msgspec.json.Decoder().decode

        def bare_msgspec() -> None:
            with open(path, "rb") as handle:
                for line in handle:
                    decode(line)

        return bare_msgspec, _nothing
    if name == "validate":
        return (lambda: jsonl.validate_request_file(path, vendor)), _nothing
    if name == "fingerprint":
        return (lambda: jsonl.fingerprint(path)), _nothing
    if name == "build":
        size = path.stat().st_size
        out = workdir / "built.jsonl"
        return (
            lambda: jsonl.build_request_file(
                prompt_records(lines, size // lines), out, vendor, model="bench-model"
            )
        ), _nothing
    if name == "split":
        return (
            lambda: jsonl.split_request_file(path, vendor, workdir / "parts", max_requests=max(lines // 4, 1))
        ), _nothing
    if name in UPLOADS:
        return _upload_operation(name, path, vendor, workdir)
    raise SystemExit(f"unknown operation {name!r}")


def _upload_operation(
    name: str, path: Path, vendor: str, workdir: Path
) -> tuple[Callable[[], object], Callable[[object], None]]:
    """
    Return an upload to time and the deletion of what it stored.

    Every run deletes its upload again (untimed), so each run meets the emulator with the same files on
    its disk: kept, the files of earlier runs (gigabytes at 500 MB) slow later runs through the
    kernel's write-back of dirty pages, whichever client those runs use.
    """
    from airflow_provider_llmbatch import jsonl
    from airflow_provider_llmbatch.emulator import DEFAULT_API_KEY, Emulator, emulator_prefix
    from airflow_provider_llmbatch.vendors import REGISTRY

    url = os.environ.get(EMULATOR_URL_ENV)
    if url is None:
        emulator = Emulator(data_dir=workdir / "emulator").start()
        url = emulator.url
    base_url = url + emulator_prefix(REGISTRY[vendor])
    warm = workdir / "warm-up.jsonl"
    jsonl.build_request_file(prompt_records(1, 300), warm, vendor, model="bench-model")
    if name == "openai upload":
        from openai import OpenAI

        client = OpenAI(api_key=DEFAULT_API_KEY, base_url=base_url)

        def sdk_upload(source: Path) -> Any:
            with open(source, "rb") as handle:
                return client.files.create(file=handle, purpose="batch")

        client.files.delete(sdk_upload(warm).id)  # warm up: HTTP client, first connection
        return (lambda: sdk_upload(path)), lambda uploaded: client.files.delete(uploaded.id)  # type: ignore[attr-defined]
    os.environ["AIRFLOW_CONN_LLMBATCH_BENCH"] = json.dumps(
        {"conn_type": REGISTRY[vendor].conn_type, "host": base_url, "password": DEFAULT_API_KEY}
    )
    from airflow_provider_llmbatch.hooks.batch import BatchHook

    hook = BatchHook("llmbatch_bench")

    def delete(uploaded: object) -> None:
        hook.delete_file(uploaded.id)  # type: ignore[attr-defined]

    if name == "validate+upload":
        # BatchHook.upload_file(check=...): the file is checked as it streams into the upload (one pass).
        # CreateBatchOperator checks while it splits, then uploads each part: see large_job.py.

        def validate_and_upload() -> object:
            check = jsonl.RequestFileCheck(vendor)
            uploaded = hook.upload_file(path, check=check)
            assert check.report is not None
            assert check.report.bytes == uploaded.bytes
            return uploaded

        # Warm up (connection lookup, HTTP client, the checker) so the measurement is the upload alone.
        delete(hook.upload_file(warm, check=jsonl.RequestFileCheck(vendor)))
        return validate_and_upload, delete
    delete(hook.upload_file(warm))
    return (lambda: hook.upload_file(path)), delete


def measure_here(name: str, path: Path, vendor: str, lines: int, workdir: Path) -> dict[str, Any]:
    """Run one operation in this process and return its time and peak RSS growth."""
    run, clean_up = _operation(name, path, vendor, lines, workdir)
    gc.collect()
    precise = _reset_peak()
    before = _status_kb("VmRSS") or _maxrss_kb()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    peak = (_status_kb("VmHWM") if precise else None) or _maxrss_kb()
    clean_up(result)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "growth_kb": max(peak - before, 0),
        "baseline_kb": before,
        "precise": precise,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, path: Path, vendor: str, lines: int, workdir: Path) -> dict[str, Any]:
    """Run one operation in a fresh interpreter and return what it measured."""
    env = {**os.environ, "AIRFLOW_HOME": str(workdir / "airflow-home"), "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        __file__,
        "--measure",
        name,
        "--file",
        str(path),
        "--vendor",
        vendor,
        "--lines",
        str(lines),
        "--workdir",
        str(workdir),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------------- reporting


def pick_vendor(size_bytes: int) -> str:
    """Return the first vendor whose file limit takes ``size_bytes``."""
    from airflow_provider_llmbatch.jsonl_lines import byte_limit
    from airflow_provider_llmbatch.vendors import REGISTRY

    for name in ("zhipu", "moonshot", "openai", "dashscope"):
        spec = REGISTRY[name]
        if byte_limit(spec, spec.endpoints[0]) >= size_bytes * 1.01:
            return name
    raise SystemExit(f"no vendor accepts a {size_bytes / MB:.0f} MB file")


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| file | vendor | lines | operation | seconds | CPU seconds | MB/s | peak RSS growth (MB) "
        "| speed vs bare json | speed vs bare msgspec | speed vs openai upload |\n"
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    body = []
    for row in rows:
        body.append(
            f"| {row['size_mb']} MB | {row['vendor']} | {row['lines']:,} | {row['operation']} "
            f"| {row['seconds']:.3f} | {row['cpu_seconds']:.3f} | {row['mb_s']:.0f} | {row['growth_mb']:.1f} "
            f"| {row.get('vs_json', '')} | {row.get('vs_msgspec', '')} | {row.get('vs_sdk', '')} |"
        )
    return "\n".join([head, *body])


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        if row["operation"] == "validate+upload" and row.get("vs_sdk"):
            growth_ok = row["growth_mb"] < TARGET_GROWTH_MB
            speed_ok = float(row["vs_sdk"].rstrip("x")) >= 1.0
            out.append(
                f"- {row['size_mb']} MB validate+upload: {row['vs_sdk']} the speed of the SDK's upload "
                f"({'meets' if speed_ok else 'MISSES'} >= 1.00x); peak RSS growth {row['growth_mb']:.1f} MB "
                f"({'meets' if growth_ok else 'MISSES'} < {TARGET_GROWTH_MB} MB)"
            )
        if row["operation"] != "validate":
            continue
        growth_ok = row["growth_mb"] < TARGET_GROWTH_MB
        out.append(
            f"- {row['size_mb']} MB validate: peak RSS growth {row['growth_mb']:.1f} MB "
            f"({'meets' if growth_ok else 'MISSES'} < {TARGET_GROWTH_MB} MB); "
            f"speed {row.get('vs_json', '?')} of bare json, {row.get('vs_msgspec', '?')} of bare msgspec "
            f"(target >= {TARGET_SPEED_SHARE:.0%})"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="file sizes in MB (10^6)")
    parser.add_argument("--vendor", default="auto", help="registry name, or auto (first whose limit fits)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per operation (fresh process each)")
    parser.add_argument("--no-upload", action="store_true", help="skip the upload through the hook")
    parser.add_argument("--operations", nargs="+", choices=OPERATIONS, default=list(OPERATIONS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--link-mbps",
        type=float,
        default=None,
        help="the emulator takes uploads in at most this many Mbit/s, as a link to a vendor would",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where files go (default: a temp dir)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lines", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        result = measure_here(args.measure, args.file, args.vendor, args.lines, args.workdir)
        print(json.dumps(result))
        return

    operations = [op for op in args.operations if not (args.no_upload and op in UPLOADS)]
    emulator = None
    if any(op in UPLOADS for op in operations) and EMULATOR_URL_ENV not in os.environ:
        # The emulator receives uploads in its own process, so its CPU and memory are not counted.
        emulator = subprocess.Popen(
            [sys.executable, "-m", "airflow_provider_llmbatch.emulator", "--port", "0"]
            + (["--upload-mbps", str(args.link_mbps)] if args.link_mbps else []),
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert emulator.stdout is not None
        os.environ[EMULATOR_URL_ENV] = emulator.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
    try:
        rows = _run_all(args, operations)
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait(timeout=10)
    _report(args, rows)


def _run_all(args: argparse.Namespace, operations: list[str]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="llmbatch-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        rows: list[dict[str, Any]] = []
        for size_mb in args.sizes:
            vendor = pick_vendor(size_mb * MB) if args.vendor == "auto" else args.vendor
            lines = min(50_000, size_mb * 500)
            path = workdir / f"requests-{size_mb}mb.jsonl"
            started = time.perf_counter()
            size = generate(path, vendor, lines, size_mb * MB)
            took = time.perf_counter() - started
            print(f"generated {path.name}: {size:,} bytes, {lines:,} lines in {took:.1f}s")
            if any(op in UPLOADS for op in operations):
                # The first large upload into the emulator is a little slower: keep it out of every row.
                measure("upload", path, vendor, lines, workdir)
            # Rounds take every operation in turn, so a drift of the machine's load touches all of them.
            all_runs: dict[str, list[dict[str, Any]]] = {op: [] for op in operations}
            for round_number in range(args.repeat):
                for op in operations:
                    run = measure(op, path, vendor, lines, workdir)
                    all_runs[op].append(run)
                    print(f"  round {round_number + 1} {op:<16} {run['seconds']:8.3f}s", flush=True)
            by_op: dict[str, dict[str, Any]] = {}
            for op in operations:
                runs = all_runs[op]
                seconds = statistics.median(r["seconds"] for r in runs)
                cpu_seconds = statistics.median(r["cpu_seconds"] for r in runs)
                growth_mb = max(r["growth_kb"] for r in runs) / 1024
                by_op[op] = row = {
                    "size_mb": size_mb,
                    "vendor": vendor,
                    "lines": lines,
                    "operation": op,
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "mb_s": size / MB / seconds if seconds > 0 and op != "noop" else 0.0,
                    "growth_mb": growth_mb,
                    "precise": all(r["precise"] for r in runs),
                }
                rows.append(row)
                print(
                    f"  {op:<13} {seconds:8.3f}s ({cpu_seconds:.3f}s CPU) peak RSS growth {growth_mb:.1f} MB",
                    flush=True,
                )
            for op, row in by_op.items():
                if op in ("noop", "bare json", "bare msgspec"):
                    continue
                if op == "validate+upload" and "openai upload" in by_op and row["seconds"] > 0:
                    row["vs_sdk"] = f"{by_op['openai upload']['seconds'] / row['seconds']:.2f}x"
                for bare, key in (("bare json", "vs_json"), ("bare msgspec", "vs_msgspec")):
                    if bare in by_op and row["seconds"] > 0:
                        row[key] = f"{by_op[bare]['seconds'] / row['seconds']:.0%}"
            for part in (workdir / "parts").glob("*.jsonl"):
                part.unlink()
            path.unlink()
    return rows


def _report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import msgspec

    precise = all(r["precise"] for r in rows)
    sizes = " ".join(map(str, args.sizes))
    command = f"python bench/request_file_memory.py --sizes {sizes} --repeat {args.repeat}"
    if args.no_upload:
        command += " --no-upload"
    if args.link_mbps:
        command += f" --link-mbps {args.link_mbps:g}"
    header = [
        "# Request files: memory and throughput",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}`.",
        *(
            [f"The emulator takes uploads in at most {args.link_mbps:g} Mbit/s, as a link to a vendor would."]
            if args.link_mbps
            else []
        ),
        f"Python {platform.python_version()}, msgspec {msgspec.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.machine()}. Peak RSS: "
        + ("VmHWM reset per run (precise)." if precise else "ru_maxrss (an upper bound)."),
        "Each operation runs in a fresh interpreter; median of the runs for time, largest for memory. "
        "CPU seconds count every thread of the measuring process (the hashing helper). "
        "Uploads go to the emulator running in its own process; `openai upload` is the openai SDK's "
        "`files.create` with an open file handle; `validate+upload` is the hook's one-pass checked upload "
        "(what CreateBatchOperator runs). Rounds take the operations in turn, after one untimed warm-up "
        "upload; each upload is deleted again after its run (untimed).",
        f"Load average when the run ended: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(wall-clock figures move with load).",
        "",
    ]
    text = "\n".join([*header, table(rows), "", *verdicts(rows), ""])
    print()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
