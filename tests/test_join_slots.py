"""
The join of a multi-part job with resubmission rounds, against an in-memory reference of its rules.

The rules (``join_results(requests, destination, batches=[BatchFiles...])``):

- the round-0 batches are the parts of the input, in order, each holding ``requests`` request lines;
- every output and error line is indexed under its slot: its part, or its round (>= 1); in a slot the
  first line of an id wins (a batch's output file before its error file), and a later line of the same
  round is a ``duplicate``;
- a request of part k is answered by the line of the newest round that sent it again (the rounds' ``sent``
  request files) and has one, else by part k's own line, else it is missing/expired/cancelled by part k's
  status;
- a line no request used is an ``unknown_id``: the lines of the slots that could answer a request (its
  part's, and those of the rounds that sent it) are all used by it, whichever landed;
- ``duplicate_requests`` counts each request line whose id an earlier request line had;
- ``attempts`` is 1 + the number of rounds whose sent file holds the id (one file per round, however many
  batches the round was split into);
- the usage of a batch sums the rows whose line came from that batch.

``tests/test_results_index.py`` checks the reference join of a single batch; this module checks slots,
rounds and attempts, on random jobs (hypothesis) and on cases written out.
"""

from __future__ import annotations

import json
import tempfile
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch import results_index
from airflow_provider_llmbatch.results import ANOMALY_KINDS, ROW_STATUSES, BatchFiles, join_results

SETTINGS = settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

POOL = ["a", "b", "c", "d", "e", 'q"x', "ü", "7"]
KINDS = ("ok", "failed", "rate_limited", "expired", "cancelled")
_TOKENS = ("prompt_tokens", "completion_tokens", "total_tokens")
_MISSING = {"expired": "expired", "cancelled": "cancelled"}


# -- a job, described ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One output or error line: its id and what it says (``KINDS``)."""

    cid: str
    kind: str


@dataclass
class Batch:
    """One batch: its status and its files (None: no such file), each a list of lines."""

    status: str | None
    out: list[Line] | None = None
    err: list[Line] | None = None
    malformed: int = 0
    no_id: int = 0


@dataclass
class Part:
    requests: list[str]
    batch: Batch


@dataclass
class Round:
    sent: list[str]
    batches: list[Batch]


@dataclass
class Job:
    parts: list[Part]
    rounds: list[Round] = field(default_factory=list)
    last_count_known: bool = True
    # Where the rounds' batch groups go among the parts in the join's ``batches`` (parts keep their order;
    # None: every part, then every round in order, as the fetch passes them).
    places: list[int] | None = None
    # Request lines followed by a blank line (not a request: never counted in a part's ``requests``).
    blanks: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Placed:
    """A line as written: its tag (unique in the job), the batch it is in, its round and its slot."""

    tag: int
    cid: str
    kind: str
    number: int
    round: int
    slot: int


# -- the files of a job ------------------------------------------------------------------------------------


def _line(line: Line, tag: int) -> dict[str, Any]:
    """The vendor line of ``line``: its tag in the response body, or in the error message without one."""
    cid: Any = int(line.cid) if line.cid.isdigit() and tag % 2 else line.cid  # 7 is read as "7"
    usage = {"prompt_tokens": tag, "completion_tokens": 1, "total_tokens": tag + 1}
    if line.kind == "ok":
        body = {"tag": tag, "choices": [{"message": {"content": "hi"}}], "usage": usage}
        return {"custom_id": cid, "response": {"status_code": 200, "body": body}, "error": None}
    if line.kind == "failed":
        body = {"tag": tag, "error": {"code": "invalid_request", "message": "bad"}, "usage": usage}
        return {"custom_id": cid, "response": {"status_code": 400, "body": body}, "error": None}
    code = {"rate_limited": "rate_limit", "expired": "batch_expired", "cancelled": "batch_cancelled"}[
        line.kind
    ]
    return {"custom_id": cid, "response": None, "error": {"code": code, "message": f"m{tag}"}}


def _tag_of(row: dict[str, Any]) -> int | None:
    response = row.get("response")
    if isinstance(response, dict) and "tag" in response:
        return int(response["tag"])
    error = row.get("error") or {}
    message = error.get("message") or ""
    return int(message[1:]) if message.startswith("m") and message[1:].isdigit() else None


def _write_lines(path: Path, lines: list[dict[str, Any]], malformed: int, no_id: int) -> None:
    raw = [json.dumps(line, ensure_ascii=False).encode() for line in lines]
    # Junk in the middle and at the end: counted, never indexed.
    for n in range(malformed):
        raw.insert(min(n, len(raw)), b"not json {")
    for _ in range(no_id):
        raw.append(json.dumps({"response": {"status_code": 200, "body": {}}}).encode())
    path.write_bytes(b"".join(r + b"\n" for r in raw))


def build(tmp: Path, job: Job) -> tuple[Path, list[BatchFiles], list[Placed], list[tuple[str, int]]]:
    """
    Write the job's request file, every batch's files and each round's sent file.

    :return: the request file, the join's batches, every line as placed (in file order), and every
        request line's id and part.
    """
    tags = iter(range(1, 1_000_000))
    placed: list[Placed] = []
    batches: list[BatchFiles] = []

    def files(batch: Batch, number: int, round_: int, slot: int) -> tuple[Path | None, Path | None]:
        paths: list[Path | None] = []
        for name, lines in (("out", batch.out), ("err", batch.err)):
            if lines is None:
                paths.append(None)
                continue
            written = []
            for line in lines:
                tag = next(tags)
                placed.append(Placed(tag, line.cid, line.kind, number, round_, slot))
                written.append(_line(line, tag))
            path = tmp / f"{number}.{name}.jsonl"
            _write_lines(path, written, batch.malformed if name == "out" else 0, batch.no_id)
            paths.append(path)
        return paths[0], paths[1]

    groups: list[tuple[int, int]] = [(0, k) for k in range(len(job.parts))]  # (round, part) of each group
    for r in range(1, len(job.rounds) + 1):
        where = len(groups) if job.places is None else job.places[r - 1] % (len(groups) + 1)
        groups.insert(where, (r, -r))
    sent_files: dict[int, Path] = {}
    for r, round_ in enumerate(job.rounds, start=1):
        sent = sent_files[r] = tmp / f"round-{r}.requests.jsonl"
        sent.write_text(
            "".join(json.dumps({"custom_id": cid, "body": {"r": r}}) + "\n" for cid in round_.sent)
        )
    for r, k in groups:
        if r == 0:
            part = job.parts[k]
            number = len(batches)
            out, err = files(part.batch, number, 0, k)
            count: int | None = len(part.requests)
            if k == len(job.parts) - 1 and not job.last_count_known:
                count = None  # the fetch passes none for the last part
            batches.append(BatchFiles(part.batch.status, out, err, requests=count))
            continue
        for batch in job.rounds[r - 1].batches:
            number = len(batches)
            out, err = files(batch, number, r, -r)  # a round's slot
            batches.append(BatchFiles(batch.status, out, err, round=r, sent=sent_files[r]))
    requests = [(cid, k) for k, part in enumerate(job.parts) for cid in part.requests]
    request_file = tmp / "requests.jsonl"
    request_file.write_text(
        "".join(
            json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/x", "body": {"n": n}})
            + ("\n  \n" if n in job.blanks else "\n")
            for n, (cid, _) in enumerate(requests)
        )
    )
    return request_file, batches, placed, requests


# -- the reference join -----------------------------------------------------------------------------------


def _status(kind: str) -> str:
    return {"ok": "succeeded", "expired": "expired", "cancelled": "cancelled"}.get(kind, "failed")


def _usage(line: Placed) -> tuple[int, int, int]:
    return (line.tag, 1, line.tag + 1) if line.kind in ("ok", "failed") else (0, 0, 0)


def reference(job: Job, placed: list[Placed], requests: list[tuple[str, int]]) -> dict[str, Any]:
    """The join, by the rules, in memory."""
    anomalies = Counter({kind: 0 for kind in ANOMALY_KINDS})
    for batch in [p.batch for p in job.parts] + [b for r in job.rounds for b in r.batches]:
        if batch.out is not None:
            anomalies["malformed_lines"] += batch.malformed
        anomalies["no_custom_id"] += batch.no_id * ((batch.out is not None) + (batch.err is not None))
    # Newest round first; in a round, batches in order; in a batch, the output file before the error file
    # (``placed`` is already in batch and file order).
    winners: dict[tuple[int, str], Placed] = {}
    for each in sorted(placed, key=lambda p: -p.round):
        key = (each.slot, each.cid)
        winner = winners.get(key)
        if winner is None:
            winners[key] = each
        elif winner.round == each.round:
            anomalies["duplicates"] += 1
    sent_by = {
        cid: {r for r, round_ in enumerate(job.rounds, 1) if cid in round_.sent} for cid, _ in requests
    }
    status_of_part = [_MISSING.get(p.batch.status or "", "missing") for p in job.parts]
    used: set[tuple[int, str]] = set()
    rows: list[tuple[str, str, int, int | None]] = []
    usage = [0, 0, 0]
    batch_usage: dict[int, list[int]] = {}
    seen: set[str] = set()
    for cid, part in requests:
        if cid in seen:
            anomalies["duplicate_requests"] += 1
        seen.add(cid)
        rounds = sent_by[cid]
        # The newest round that sent it and has a line, else its part's own line; every line of those
        # slots answered it (the replaced ones are no unknown ids).
        eligible = [(-r, cid) for r in sorted(rounds, reverse=True)] + [(part, cid)]
        answers = [slot for slot in eligible if slot in winners]
        used.update(answers)
        line: Placed | None = winners[answers[0]] if answers else None
        if line is None:
            rows.append((cid, status_of_part[part], 1 + len(rounds), None))
            continue
        rows.append((cid, _status(line.kind), 1 + len(rounds), line.tag))
        tokens = _usage(line)
        per = batch_usage.setdefault(line.number, [0, 0, 0])
        for i in range(3):
            usage[i] += tokens[i]
            per[i] += tokens[i]
    anomalies["unknown_ids"] = len(set(winners) - used)
    counts: dict[str, int] = {s: sum(row[1] == s for row in rows) for s in ROW_STATUSES}
    counts["total"] = len(rows)
    batches = len(job.parts) + sum(len(r.batches) for r in job.rounds)
    return {
        "rows": rows,
        "counts": counts,
        "anomalies": dict(anomalies),
        "usage": dict(zip(_TOKENS, usage, strict=True)),
        "batch_usage": [
            dict(zip(_TOKENS, batch_usage.get(n, [0, 0, 0]), strict=True)) for n in range(batches)
        ],
    }


def joined(job: Job, batch_lines: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Join the job with the provider and with the reference; ``batch_lines``: the index's batch size."""
    with tempfile.TemporaryDirectory(prefix="join-slots-") as folder:
        tmp = Path(folder)
        requests, batches, placed, request_ids = build(tmp, job)
        patch = (
            mock.patch.object(results_index, "_BATCH_LINES", batch_lines)
            if batch_lines is not None
            else mock.patch.object(results_index, "_BATCH_LINES", results_index._BATCH_LINES)
        )
        with patch:
            report = join_results(requests, tmp / "results.jsonl", batches=batches)
        landed = [json.loads(line) for line in (tmp / "results.jsonl").read_text().splitlines()]
    assert report.reconciled
    got = {
        "rows": [(r["custom_id"], r["status"], r["attempts"], _tag_of(r)) for r in landed],
        "counts": report.counts,
        "anomalies": report.anomalies,
        "usage": report.usage,
        "batch_usage": report.batch_usage,
    }
    return got, reference(job, placed, request_ids)


# -- random jobs ---------------------------------------------------------------------------------------------

ids = st.sampled_from(POOL)
lines = st.lists(st.builds(Line, ids, st.sampled_from(KINDS)), max_size=7)
statuses = st.sampled_from(["completed", "failed", "expired", "cancelled", None])
batches_with_files = st.builds(
    Batch,
    status=statuses,
    out=st.none() | lines,
    err=st.none() | lines,
    malformed=st.integers(0, 1),
    no_id=st.integers(0, 1),
)
# A part or round the vendor expired or cancelled before it ran: no files at all.
batches_without_files = st.builds(Batch, status=st.sampled_from(["expired", "cancelled"]))
any_batch = st.one_of(batches_with_files, batches_with_files, batches_without_files)


@st.composite
def jobs(draw: st.DrawFn, sent_repeats: bool = False) -> Job:
    parts = draw(st.lists(st.builds(Part, st.lists(ids, max_size=6), any_batch), min_size=1, max_size=4))
    requested = sorted({cid for p in parts for cid in p.requests}, key=POOL.index)
    # A round sends ids of the request file, mostly; any id of the pool now and then.
    sendable = st.sampled_from(requested) | ids if requested else ids
    rounds = draw(
        st.lists(
            st.builds(
                Round,
                st.lists(sendable, max_size=5, unique=not sent_repeats),
                st.lists(any_batch, min_size=1, max_size=2),
            ),
            max_size=3,
        )
    )
    total = sum(len(p.requests) for p in parts)
    places = draw(st.none() | st.lists(st.integers(0, 8), min_size=len(rounds), max_size=len(rounds)))
    blanks = draw(st.frozensets(st.integers(0, max(total - 1, 0)), max_size=2))
    return Job(parts, rounds, draw(st.booleans()), places, blanks)


@SETTINGS
@given(job=jobs(), batch_lines=st.sampled_from([None, 1, 2, 3]))
def test_random_jobs_join_like_the_reference(job: Job, batch_lines: int | None) -> None:
    got, expected = joined(job, batch_lines)
    assert got == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=jobs(sent_repeats=True))
def test_a_sent_file_that_repeats_an_id_counts_one_attempt(job: Job) -> None:
    got, expected = joined(job)
    assert got == expected


# -- cases written out --------------------------------------------------------------------------------------


def _ok(cid: str) -> Line:
    return Line(cid, "ok")


def _rows(job: Job) -> list[tuple[str, str, int, int | None]]:
    got, expected = joined(job)
    assert got == expected
    rows: list[tuple[str, str, int, int | None]] = got["rows"]
    return rows


def test_a_stray_line_in_another_parts_file_is_an_unknown_id() -> None:
    job = Job(
        [
            Part(["a", "b"], Batch("completed", out=[_ok("a")])),
            Part(["c"], Batch("completed", out=[_ok("b"), _ok("c")])),  # "b" is part 0's
        ]
    )
    got, _ = joined(job)
    assert [(cid, status) for cid, status, _, _ in _rows(job)] == [
        ("a", "succeeded"),
        ("b", "missing"),
        ("c", "succeeded"),
    ]
    assert got["anomalies"]["unknown_ids"] == 1


def test_a_round_line_replaces_the_part_line_and_the_part_line_is_no_unknown_id() -> None:
    job = Job(
        [Part(["a", "b"], Batch("completed", err=[Line("a", "rate_limited"), _ok("b")]))],
        [Round(["a"], [Batch("completed", out=[_ok("a")])])],
    )
    got, _ = joined(job)
    assert [(cid, status, attempts) for cid, status, attempts, _ in got["rows"]] == [
        ("a", "succeeded", 2),
        ("b", "succeeded", 1),
    ]
    assert got["anomalies"]["unknown_ids"] == 0
    assert got["batch_usage"][0]["prompt_tokens"] == 2  # b's line (tag 2); a's line 1 was replaced
    assert got["batch_usage"][1]["prompt_tokens"] == 3


def test_a_round_line_for_an_id_no_round_sent_lands_nowhere() -> None:
    job = Job(
        [Part(["a", "b"], Batch("completed", out=[Line("a", "failed"), _ok("b")]))],
        [Round(["z"], [Batch("completed", out=[_ok("a"), _ok("b")])])],
    )
    got, _ = joined(job)
    assert [status for _, status, _, _ in got["rows"]] == ["failed", "succeeded"]
    assert got["anomalies"]["unknown_ids"] == 2
    assert got["batch_usage"][1] == dict.fromkeys(_TOKENS, 0)


def test_expired_and_cancelled_parts_without_files() -> None:
    job = Job(
        [
            Part(["a"], Batch("expired")),
            Part(["b", "c"], Batch("cancelled")),
            Part(["d"], Batch("completed", out=[])),
        ],
        [Round(["a", "c"], [Batch("completed", out=[_ok("c")])])],
    )
    assert [(cid, status, attempts) for cid, status, attempts, _ in _rows(job)] == [
        ("a", "expired", 2),
        ("b", "cancelled", 1),
        ("c", "succeeded", 2),
        ("d", "missing", 1),
    ]


def test_a_round_split_in_batches_counts_one_attempt_and_its_lines_duplicate_each_other() -> None:
    job = Job(
        [Part(["a", "b"], Batch("expired"))],
        [
            Round(
                ["a", "b"], [Batch("completed", out=[_ok("a")]), Batch("completed", out=[_ok("b"), _ok("a")])]
            )
        ],
    )
    got, _ = joined(job)
    assert [(status, attempts, tag) for _, status, attempts, tag in got["rows"]] == [
        ("succeeded", 2, 1),
        ("succeeded", 2, 2),
    ]
    assert got["anomalies"]["duplicates"] == 1


def test_a_newer_rounds_line_wins_and_the_older_one_is_no_anomaly() -> None:
    job = Job(
        [Part(["a"], Batch("completed", err=[Line("a", "rate_limited")]))],
        [
            Round(["a"], [Batch("completed", err=[Line("a", "rate_limited")])]),
            Round(["a"], [Batch("completed", out=[_ok("a")])]),
        ],
    )
    got, _ = joined(job)
    assert got["rows"] == [("a", "succeeded", 3, 3)]
    assert got["anomalies"] == dict.fromkeys(ANOMALY_KINDS, 0)


def test_an_id_repeated_across_parts_gets_each_parts_line_and_counts_once() -> None:
    job = Job(
        [
            Part(["a", "b"], Batch("completed", out=[_ok("a")])),
            Part(["a"], Batch("completed", out=[Line("a", "failed")])),
            Part(["a"], Batch("expired")),
        ]
    )
    got, _ = joined(job)
    assert [(status, tag) for _, status, _, tag in got["rows"]] == [
        ("succeeded", 1),
        ("missing", None),
        ("failed", 2),
        ("expired", None),
    ]
    assert got["anomalies"]["duplicate_requests"] == 2


def test_output_line_wins_over_the_error_file_copy_in_the_same_part() -> None:
    job = Job([Part(["a"], Batch("completed", out=[_ok("a")], err=[Line("a", "failed")]))])
    got, _ = joined(job)
    assert got["rows"] == [("a", "succeeded", 1, 1)]
    assert got["anomalies"]["duplicates"] == 1


def test_many_requests_across_index_batches() -> None:
    # More than one batch of requests and of lines (512), an id repeated far apart, across parts.
    first = [f"r{i}" for i in range(700)]
    second = [f"s{i}" for i in range(300)] + ["r5", "r600", "x"]
    job = Job(
        [
            Part(first, Batch("completed", out=[_ok(c) for c in reversed(first[:650])] + [_ok("s7")])),
            Part(second, Batch("expired", err=[Line(c, "failed") for c in second[::2]])),
        ],
        [Round(["r5", "s1", "x"], [Batch("completed", out=[_ok("s1"), _ok("r5")])])],
    )
    got, expected = joined(job)
    assert got == expected


# -- a round's lines answer only what it sent ------------------------------------------------------------


def test_a_later_rounds_stray_line_does_not_replace_the_round_that_sent_the_request() -> None:
    """
    README, "Large jobs": a round's requests are answered by the round's lines, "never landed on a request
    it was not sent for". Round 2 did not send "a": its line for "a" is an unknown id, and round 1's line,
    which answered it, lands.
    """
    job = Job(
        [Part(["a", "b"], Batch("completed", err=[Line("a", "rate_limited"), Line("b", "rate_limited")]))],
        [
            Round(["a", "b"], [Batch("completed", out=[_ok("a")], err=[Line("b", "rate_limited")])]),
            Round(["b"], [Batch("completed", out=[_ok("b"), Line("a", "failed")])]),  # "a": a stray
        ],
    )
    got, expected = joined(job)
    assert got["rows"][0] == ("a", "succeeded", 2, 3)
    assert got["anomalies"]["unknown_ids"] == 1
    assert got == expected


# -- memory ----------------------------------------------------------------------------------------------


def _large_job(tmp: Path, count: int) -> tuple[Path, list[BatchFiles]]:
    """Three parts, each part's lines in reverse order, and a round that sent every tenth request again."""
    half = count // 3
    spans = [(0, half), (half, 2 * half), (2 * half, count)]
    requests = tmp / "requests.jsonl"
    with requests.open("w") as handle:
        for i in range(count):
            handle.write(json.dumps({"custom_id": f"r{i}", "body": {"p": "x" * 100}}) + "\n")
    batches = []
    for k, (start, end) in enumerate(spans):
        out = tmp / f"p{k}.jsonl"
        with out.open("w") as handle:
            for i in reversed(range(start, end)):
                handle.write(
                    json.dumps(_line(Line(f"r{i}", "ok" if i % 10 else "rate_limited"), i + 1)) + "\n"
                )
        batches.append(BatchFiles("completed", out, requests=end - start))
    sent = tmp / "round-1.requests.jsonl"
    out = tmp / "r1.jsonl"
    with sent.open("w") as s_handle, out.open("w") as o_handle:
        for i in range(0, count, 10):
            s_handle.write(json.dumps({"custom_id": f"r{i}", "body": {}}) + "\n")
            o_handle.write(json.dumps(_line(Line(f"r{i}", "ok"), i + 1)) + "\n")
    batches.append(BatchFiles("completed", out, round=1, sent=sent))
    return requests, batches


def test_memory_of_a_job_with_parts_and_a_round_does_not_grow_with_its_lines(tmp_path: Path) -> None:
    peaks = []
    for count in (3_000, 24_000):
        tmp = tmp_path / str(count)
        tmp.mkdir()
        requests, batches = _large_job(tmp, count)
        tracemalloc.start()
        try:
            report = join_results(requests, tmp / "r.jsonl", batches=batches)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert report.counts["succeeded"] == count
        assert report.anomalies == dict.fromkeys(ANOMALY_KINDS, 0)
    # Eight times the lines: the same batches in flight, plus one byte per line.
    assert peaks[1] < peaks[0] * 1.25 + 30_000, peaks
    assert peaks[1] < 3_000_000, peaks
