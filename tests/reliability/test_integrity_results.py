"""
Every request ends in exactly one results row, whatever the batch did and whatever the vendor files hold.

Three layers: real vendor files from the emulator for every outcome (through the fetch operator), the
same real files with handcrafted anomalies (missing, repeated, unknown, id-less, malformed, shuffled
lines), and arbitrary bytes as vendor files. ``tests/test_results.py`` covers the single cases; this
module covers their combinations.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.results import error_line, success_line
from airflow_provider_llmbatch.emulator.testing import request_lines
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.results import ANOMALY_KINDS, ROW_STATUSES, JoinReport, join_results
from airflow_provider_llmbatch.vendors import REGISTRY

EXAMPLES = int(os.environ.get("LLMBATCH_FUZZ_EXAMPLES", "300"))
# The temp directory is rewritten by every example, so the function-scoped tmp_path is safe to share.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
VENDORS = sorted(REGISTRY)


def _reject(token: str) -> Any:
    raise ValueError(f"{token} in a results row")


def _rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a results file strictly: every row must be standard JSON."""
    local = Path(str(path).removeprefix("file://"))
    with local.open("rb") as handle:
        return [json.loads(line, parse_constant=_reject) for line in handle if line.strip()]


def _assert_one_row_each(report: JoinReport, ids: list[str], destination: Path) -> list[dict[str, Any]]:
    rows = _rows(destination)
    assert [row["custom_id"] for row in rows] == ids, "one row per request line, in request order"
    assert report.counts["total"] == len(ids)
    assert sum(report.counts[s] for s in ROW_STATUSES) == len(ids)
    assert report.reconciled
    assert Counter(row["status"] for row in rows) == Counter(
        {s: report.counts[s] for s in ROW_STATUSES if report.counts[s]}
    )
    assert set(report.anomalies) == set(ANOMALY_KINDS)
    return rows


# -- real vendor files: outcome x vendor, through the fetch operator ----------------------------------

OUTCOMES = ["completed", "failed", "expired", "cancelled"]
IDS = [f"ok-{i}" for i in range(8)] + [f"fail-{i}" for i in range(4)]  # "^fail" ids end in the error file


def _run_batch(
    emulator: Emulator, conn_id: str, vendor: str, outcome: str, tmp_path: Path
) -> tuple[str, Path]:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(request_lines(REGISTRY[vendor], IDS))
    hook = BatchHook(conn_id)
    uploaded = hook.upload_file(requests)
    metadata = {} if outcome == "completed" else {"emulator_outcome": outcome}
    batch = hook.create_batch(input_file_id=uploaded.id, metadata=metadata)
    deadline = time.monotonic() + 30
    while not batch.is_terminal and time.monotonic() < deadline:
        time.sleep(0.05)
        batch = hook.get_batch(batch.id)
    assert batch.status == outcome, batch
    hook.close()
    return batch.id, requests


@pytest.mark.integration
@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_every_outcome_gives_one_row_per_request(
    vendor: str,
    outcome: str,
    emulator: Emulator,
    emulator_connections: dict[str, str],
    tmp_path: Path,
) -> None:
    batch_id, requests = _run_batch(emulator, emulator_connections[vendor], vendor, outcome, tmp_path)
    destination = tmp_path / "results.jsonl"
    operator = FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=emulator_connections[vendor],
        batch_id=batch_id,
        input_file=str(requests),
        destination=str(destination),
    )
    manifest = operator.execute({})  # type: ignore[arg-type]

    rows = _rows(destination)
    assert [row["custom_id"] for row in rows] == IDS
    counts = manifest["counts"]
    assert counts["total"] == len(IDS) == sum(counts[s] for s in ROW_STATUSES)
    assert all(v == 0 for v in manifest["anomalies"].values()), manifest["anomalies"]
    by_id = {row["custom_id"]: row["status"] for row in rows}
    if outcome == "completed":
        assert (counts["succeeded"], counts["failed"]) == (8, 4)
        assert all(by_id[i] == ("failed" if i.startswith("fail") else "succeeded") for i in IDS)
    elif outcome == "failed":
        # Validation ended the batch: nothing ran, nothing came back.
        assert counts["missing"] == len(IDS)
    else:
        # Ended half-way: what ran succeeded or failed, the rest carries the batch's outcome.
        assert counts[outcome] > 0
        assert counts[outcome] + counts["succeeded"] + counts["failed"] == len(IDS)
        assert all(by_id[i] != "succeeded" for i in IDS if i.startswith("fail"))


# -- real vendor files with handcrafted anomalies -------------------------------------------------------


@pytest.fixture(scope="module")
def vendor_files(
    emulator_server: Emulator, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[bytes], list[bytes]]]:
    """Per vendor: the request file and the output and error lines of a completed batch with failures."""
    emulator_server.reset()
    files: dict[str, tuple[Path, list[bytes], list[bytes]]] = {}
    saved = dict(os.environ)
    try:
        for vendor in VENDORS:
            conn_id = f"integrity_{vendor}"
            os.environ.update(emulator_server.airflow_conn_env(vendor, conn_id))
            tmp = tmp_path_factory.mktemp(f"files-{vendor}")
            batch_id, requests = _run_batch(emulator_server, conn_id, vendor, "completed", tmp)
            hook = BatchHook(conn_id)
            batch = hook.get_batch(batch_id)
            lines: list[list[bytes]] = []
            for file_id in (batch.output_file_id, batch.error_file_id):
                assert file_id
                content = io.BytesIO()
                hook.download_file(file_id, content)
                lines.append([raw.rstrip(b"\r") for raw in content.getvalue().split(b"\n") if raw.strip()])
            hook.close()
            files[vendor] = (requests, lines[0], lines[1])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return files


ANOMALIES = st.lists(
    st.sampled_from(["drop", "duplicate", "cross_duplicate", "unknown", "no_custom_id", "malformed"]),
    max_size=12,
)


@pytest.mark.integration
@FUZZ
@given(
    vendor=st.sampled_from(VENDORS),
    changes=ANOMALIES,
    targets=st.lists(st.integers(min_value=0, max_value=len(IDS) - 1), min_size=12, max_size=12),
    batch_status=st.sampled_from(OUTCOMES),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_anomalies_in_real_vendor_files_are_counted_and_every_request_has_a_row(
    vendor_files: dict[str, tuple[Path, list[bytes], list[bytes]]],
    tmp_path: Path,
    vendor: str,
    changes: list[str],
    targets: list[int],
    batch_status: str,
    seed: int,
) -> None:
    requests, output, errors = vendor_files[vendor]
    line_of = {json.loads(raw)["custom_id"]: raw for raw in [*output, *errors]}
    out = {i: [line_of[i]] for i in IDS if not i.startswith("fail")}
    err = {i: [line_of[i]] for i in IDS if i.startswith("fail")}
    extra_out: list[bytes] = []
    expected = Counter[str]()
    for change, target in zip(changes, targets, strict=False):
        cid = IDS[target]
        home, other = (out, err) if cid in out else (err, out)
        if change == "drop":
            home[cid] = []
            other.pop(cid, None)
        elif change == "duplicate" and home[cid]:
            home[cid].append(home[cid][0])
        elif change == "cross_duplicate" and home[cid]:
            other.setdefault(cid, []).append(home[cid][0])
        elif change == "unknown":
            data = json.loads(line_of[cid])
            data["custom_id"] = f"stranger-{len(extra_out)}"
            extra_out.append(json.dumps(data).encode())
            expected["unknown_ids"] += 1
        elif change == "no_custom_id":
            data = json.loads(line_of[cid])
            data.pop("custom_id")
            extra_out.append(json.dumps(data).encode())
            expected["no_custom_id"] += 1
        elif change == "malformed":
            extra_out.append(line_of[cid][: len(line_of[cid]) // 2])
            expected["malformed_lines"] += 1
    copies = {i: len(out.get(i, [])) + len(err.get(i, [])) for i in IDS}
    expected["duplicates"] = sum(max(0, n - 1) for n in copies.values())
    out_lines = [raw for lines in out.values() for raw in lines] + extra_out
    err_lines = [raw for lines in err.values() for raw in lines]
    rng = random.Random(seed)
    rng.shuffle(out_lines)
    rng.shuffle(err_lines)
    out_path, err_path = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    out_path.write_bytes(b"".join(raw.rstrip(b"\n") + b"\n" for raw in out_lines))
    err_path.write_bytes(b"".join(raw.rstrip(b"\n") + b"\n" for raw in err_lines))
    destination = tmp_path / "results.jsonl"

    report = join_results(
        requests, destination, output_file=out_path, error_file=err_path, batch_status=batch_status
    )

    rows = _assert_one_row_each(report, IDS, destination)
    assert {k: v for k, v in report.anomalies.items() if v} == {k: v for k, v in expected.items() if v}
    missing_as = {"expired": "expired", "cancelled": "cancelled"}.get(batch_status, "missing")
    for row in rows:
        cid = row["custom_id"]
        if not copies[cid]:
            assert row["status"] == missing_as
        elif out.get(cid):
            # The output file is read first: its line wins over a copy in the error file.
            assert row["status"] == ("failed" if cid.startswith("fail") else "succeeded")
        else:
            assert row["status"] == ("failed" if cid.startswith("fail") else "succeeded")
            assert cid in err


# -- synthetic lines in every vendor's format -----------------------------------------------------------


@st.composite
def plans(draw: st.DrawFn) -> list[str]:
    return draw(
        st.lists(
            st.sampled_from(["ok", "err", "unrun_expired", "unrun_cancelled", "none", "dup", "both"]),
            max_size=25,
        )
    )


@FUZZ
@given(
    plan=plans(),
    vendor=st.sampled_from(VENDORS),
    batch_status=st.sampled_from(OUTCOMES),
    strangers=st.integers(min_value=0, max_value=3),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_each_request_gets_the_status_its_lines_say(
    tmp_path: Path, plan: list[str], vendor: str, batch_status: str, strangers: int, seed: int
) -> None:
    spec = REGISTRY[vendor]
    ids = [f"r{i}" for i in range(len(plan))]
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(request_lines(spec, ids) if ids else b"")
    body = {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 2, "total_tokens": 3}}
    out: list[dict[str, Any]] = []
    err: list[dict[str, Any]] = []
    expected: dict[str, str] = {}
    missing_as = {"expired": "expired", "cancelled": "cancelled"}.get(batch_status, "missing")
    for cid, what in zip(ids, plan, strict=True):
        if what in ("ok", "dup", "both"):
            out.append(success_line(spec, "batch_1", cid, body))
            expected[cid] = "succeeded"
        if what == "dup":
            out.append(success_line(spec, "batch_1", cid, body))
        if what in ("err", "both"):
            err.append(error_line(spec, "batch_1", cid, "invalid_request", "bad", with_response=True))
            expected.setdefault(cid, "failed")
        if what.startswith("unrun_"):
            status = what.removeprefix("unrun_")
            err.append(error_line(spec, "batch_1", cid, f"batch_{status}", "never ran", with_response=False))
            expected[cid] = status
        if what == "none":
            expected[cid] = missing_as
    out.extend(success_line(spec, "batch_1", f"stranger{i}", body) for i in range(strangers))
    rng = random.Random(seed)
    rng.shuffle(out)
    rng.shuffle(err)
    out_path, err_path = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    out_path.write_text("".join(json.dumps(line) + "\n" for line in out))
    err_path.write_text("".join(json.dumps(line) + "\n" for line in err))
    destination = tmp_path / "results.jsonl"

    report = join_results(
        requests, destination, output_file=out_path, error_file=err_path, batch_status=batch_status
    )

    rows = _assert_one_row_each(report, ids, destination)
    assert {row["custom_id"]: row["status"] for row in rows} == expected
    assert report.anomalies["duplicates"] == plan.count("dup") + plan.count("both")
    assert report.anomalies["unknown_ids"] == strangers
    assert report.usage["prompt_tokens"] == 2 * list(expected.values()).count("succeeded")


# -- arbitrary bytes as vendor files -------------------------------------------------------------------

_line_pieces: Callable[[list[str]], st.SearchStrategy[bytes]] = lambda ids: st.one_of(  # noqa: E731
    st.binary(max_size=80),
    st.sampled_from(
        [
            b"NaN",
            b'{"custom_id": NaN}',
            b'{"custom_id": 1e999}',
            b'{"custom_id": "r0", "response": {"status_code": 200, "body": {"x": NaN}}}',
            b'{"custom_id": "r0", "response": {"status_code": 200, "body": {"usage": {"x": 1e999}}}}',
            b'{"custom_id": "r1", "custom_id": "r2", "response": {"status_code": 200}}',
            b'{"custom_id": "r0", "error": "boom"}',
            b'{"custom_id": ["r0"]}',
            b'{"custom_id": "r1", "response": [], "error": {"code": {"a": 1}}}',
            b'{"custom_id": "r2", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            b"\xef\xbb\xbf{}",
            b'{"custom_id": "\xff\xfe"}',
            b'{"custom_id": "r3", "response": {"status_code": "200", "body": {"usage": {"x": true}}}}',
        ]
    ),
    st.builds(
        lambda cid, status: json.dumps({"custom_id": cid, "response": {"status_code": status}}).encode(),
        st.sampled_from(ids),
        st.integers(min_value=-1, max_value=999),
    ),
)


@FUZZ
@given(
    data=st.data(),
    count=st.integers(min_value=0, max_value=6),
    separator=st.sampled_from([b"\n", b"\r\n"]),
    batch_status=st.sampled_from([*OUTCOMES, None, "weird"]),
)
def test_any_vendor_bytes_still_give_one_row_per_request(
    tmp_path: Path, data: st.DataObject, count: int, separator: bytes, batch_status: str | None
) -> None:
    ids = [f"r{i}" for i in range(count)]
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(request_lines(REGISTRY["openai"], ids) if ids else b"")
    files = []
    for name in ("out.jsonl", "err.jsonl"):
        pieces = data.draw(st.lists(_line_pieces(ids or ["r0"]), max_size=8))
        path = tmp_path / name
        path.write_bytes(separator.join(pieces))
        files.append(path)
    destination = tmp_path / "results.jsonl"

    report = join_results(
        requests, destination, output_file=files[0], error_file=files[1], batch_status=batch_status
    )

    _assert_one_row_each(report, ids, destination)
    assert all(isinstance(v, int) for v in report.usage.values())


@pytest.mark.timeout(240)
def test_fifty_megabyte_vendor_line_and_deep_nesting_finish(tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(request_lines(REGISTRY["openai"], ["a", "b", "c"]))
    out = tmp_path / "out.jsonl"
    with out.open("wb") as handle:
        handle.write(b'{"custom_id": "a", "response": {"status_code": 200, "body": {"pad": "')
        for _ in range(50):
            handle.write(b"x" * (1 << 20))
        handle.write(b'"}}}\n')
        handle.write(b'{"custom_id": "b", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    destination = tmp_path / "results.jsonl"

    report = join_results(requests, destination, output_file=out, batch_status="completed")

    assert (report.counts["succeeded"], report.counts["missing"]) == (1, 2)
    assert report.anomalies["malformed_lines"] == 1
