"""
Resubmission rounds: rows that failed for a reason that may not last are sent again, each round once.

The emulator fails ``retry-*`` requests once, rate limited (the vendor's own code), and ``fail-*``
requests for good (an invalid request). The fetch waits for a round's batch on the worker, on a clock that
moves the emulator's batches along as it sleeps, so nobody really waits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.faults import FaultRule
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.resubmit import worth_resubmitting
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import (
    CONN_ID,
    STORES,
    FakeTI,
    create_op,
    make_context,
    state_store,
    write_requests,
)
from tests.pollkit import Clock

VENDORS = list(REGISTRY)
IDS = ["a", "retry-b", "fail-c", "retry-d", "e"]
RETRIED = {"retry-b", "retry-d"}


def _ended_job(
    emu: Emulator, tmp_path: Path, vendor: str, ids: list[str] = IDS
) -> tuple[dict[str, Any], Path]:
    """Create a batch of ``ids`` and let the emulator run it to the end; return the XCom and the file."""
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ids)
    created = create_op(input_file=str(path)).execute(make_context(FakeTI()))
    emu.advance_clock(10_000)
    assert emu.batch(vendor, created["batch_id"])["status"] == "completed"
    return created, path


def _fetch(created: dict[str, Any], path: Path, tmp_path: Path, **kwargs: Any) -> FetchBatchResultsOperator:
    return FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=CONN_ID,
        batch_id=created["batch_ids"],
        input_file=str(path),
        destination=str(tmp_path / "results.jsonl"),
        deferrable=False,
        poll_interval=60,
        **kwargs,
    )


def _rows(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    text = Path(manifest["result_uri"].removeprefix("file://")).read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    return {row["custom_id"]: row for row in rows}


@pytest.mark.parametrize("vendor", VENDORS)
def test_rows_worth_it_are_sent_again_and_replace_their_failures(
    connect: Any, moving: Clock, tmp_path: Path, vendor: str
) -> None:
    emu = connect(vendor)
    created, path = _ended_job(emu, tmp_path, vendor)

    manifest = _fetch(created, path, tmp_path, resubmit_failed=1).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    rows = _rows(manifest)
    assert list(rows) == IDS  # one row per request, in input order
    assert {i: rows[i]["attempts"] for i in IDS} == {i: 2 if i in RETRIED else 1 for i in IDS}
    assert {i: rows[i]["status"] for i in IDS} == {i: "failed" if i == "fail-c" else "succeeded" for i in IDS}
    # The invalid request was never sent again: the round's request file is the rate-limited rows only.
    [round_batch] = [b for b in emu.batches(vendor) if b["id"] != created["batch_id"]]
    sent = (tmp_path / "results.round-1.requests.jsonl").read_text().splitlines()  # kept beside the results
    assert sorted(json.loads(line)["custom_id"] for line in sent) == sorted(RETRIED)
    assert [r["batches"][0]["batch_id"] for r in manifest["rounds"]] == [round_batch["id"]]
    assert manifest["counts"]["total"] == len(IDS)
    assert manifest["counts"]["succeeded"] == len(IDS) - 1
    assert emu.stats(vendor)["batches_created"] == 2


@pytest.mark.parametrize("vendor", ["zhipu", "dashscope"])
def test_without_rounds_the_failures_land_as_they_are(
    connect: Any, moving: Clock, tmp_path: Path, vendor: str
) -> None:
    emu = connect(vendor)
    created, path = _ended_job(emu, tmp_path, vendor)

    manifest = _fetch(created, path, tmp_path).execute(make_context(FakeTI(task_id="fetch")))

    rows = _rows(manifest)
    assert {i for i in IDS if rows[i]["status"] == "failed"} == RETRIED | {"fail-c"}
    assert {row["attempts"] for row in rows.values()} == {1}
    assert manifest["rounds"] == []
    assert emu.stats(vendor)["batches_created"] == 1


def test_a_round_that_mends_everything_is_the_last(connect: Any, moving: Clock, tmp_path: Path) -> None:
    emu = connect("moonshot")
    created, path = _ended_job(emu, tmp_path, "moonshot")

    manifest = _fetch(created, path, tmp_path, resubmit_failed=3).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    # Round 1 answered the rate-limited rows; the invalid one is not worth a round 2.
    assert len(manifest["rounds"]) == 1
    assert emu.stats("moonshot")["batches_created"] == 2
    assert _rows(manifest)["fail-c"]["attempts"] == 1


def test_nothing_worth_sending_again_creates_no_round(connect: Any, moving: Clock, tmp_path: Path) -> None:
    emu = connect("openai")
    created, path = _ended_job(emu, tmp_path, "openai", ["a", "fail-b"])

    manifest = _fetch(created, path, tmp_path, resubmit_failed=2).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    assert manifest["rounds"] == []
    assert (emu.stats("openai")["files_uploaded"], emu.stats("openai")["batches_created"]) == (1, 1)


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True, None])
def test_rounds_must_be_a_whole_number(bad: Any) -> None:
    with pytest.raises(InvalidInputError, match="resubmit_failed must be a whole number"):
        FetchBatchResultsOperator(task_id="fetch", batch_id="b", resubmit_failed=bad)


# -- each round created once, whatever happens around it ---------------------------------------------


def _die_once(monkeypatch: pytest.MonkeyPatch, name: str, *, after: bool) -> dict[str, int]:
    """Make the hook's ``name`` kill the task once (before, or after, the call took effect)."""
    real = getattr(BatchHook, name)
    calls = {"n": 0}

    def dying(self: BatchHook, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1 and not after:
            raise RuntimeError(f"worker died before {name}")
        result = real(self, *args, **kwargs)
        if calls["n"] == 1:
            raise RuntimeError(f"worker died after {name} took effect")
        return result

    monkeypatch.setattr(BatchHook, name, dying)
    return calls


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(
    ("name", "after"),
    [
        ("create_batch", False),  # between the round's upload and its create
        ("create_batch", True),  # the round's batch made, its answer lost
        ("upload_file", True),  # the round's file stored, nothing created
    ],
)
def test_a_retry_after_a_death_around_a_round_creates_it_once(
    connect: Any,
    moving: Clock,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    store: str,
    name: str,
    after: bool,
) -> None:
    emu = connect("dashscope")
    created, path = _ended_job(emu, tmp_path, "dashscope")
    state = state_store(store)
    calls = _die_once(monkeypatch, name, after=after)

    with pytest.raises(RuntimeError, match="worker died"):
        _fetch(created, path, tmp_path, resubmit_failed=1).execute(
            make_context(FakeTI(task_id="fetch"), state)
        )
    assert calls["n"] == 1
    assert emu.stats("dashscope")["batches_created"] == (2 if name == "create_batch" and after else 1)

    manifest = _fetch(created, path, tmp_path, resubmit_failed=1).execute(
        make_context(FakeTI(task_id="fetch"), state)
    )

    stats = emu.stats("dashscope")
    # The job's batch and one round: the retry re-attached to what the dead try had made.
    assert (stats["batches_created"], stats["files_uploaded"]) == (2, 2)
    assert len(manifest["rounds"]) == 1
    assert {i: _rows(manifest)[i]["attempts"] for i in RETRIED} == dict.fromkeys(RETRIED, 2)

    # A third try (a cleared task) lands the same file and creates nothing.
    again = _fetch(created, path, tmp_path, resubmit_failed=1).execute(
        make_context(FakeTI(task_id="fetch"), state)
    )
    assert again["rounds"] == manifest["rounds"]
    assert emu.stats("dashscope")["batches_created"] == 2


def test_a_lost_create_answer_is_found_not_created_again(connect: Any, moving: Clock, tmp_path: Path) -> None:
    emu = connect("zhipu")
    created, path = _ended_job(emu, tmp_path, "zhipu")
    # The vendor creates the round's batch, then the connection breaks before the answer.
    emu.add_fault(FaultRule("reset_after", vendor="zhipu", operation="create", times=1))

    manifest = _fetch(created, path, tmp_path, resubmit_failed=1).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    # The hook looked the round up by its key before trying again: one batch for the round.
    assert emu.stats("zhipu")["batches_created"] == 2
    assert len(manifest["rounds"]) == 1
    assert {i: _rows(manifest)[i]["attempts"] for i in RETRIED} == dict.fromkeys(RETRIED, 2)


# -- what is worth sending again, per vendor ------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_each_vendors_transient_codes_are_worth_a_round(vendor: str) -> None:
    spec = REGISTRY[vendor]
    assert spec.errors.retryable_codes
    for code in [*spec.errors.retryable_codes, "batch_expired", "batch_cancelled"]:
        assert worth_resubmitting({"status": "failed", "error": {"code": code}}, spec), code
    for status in ("expired", "cancelled"):
        assert worth_resubmitting({"status": status, "error": None}, spec)


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(
    "row",
    [
        {"status": "failed", "error": {"code": "invalid_request"}},
        {"status": "failed", "error": {"code": "content_filter"}},
        {"status": "failed", "error": {"code": "context_length_exceeded"}},
        {"status": "failed", "error": {"code": None}},
        {"status": "failed", "error": "rate limited"},
        {"status": "failed"},
        {"status": "succeeded", "error": {"code": "rate_limit_exceeded"}},
        {"status": "missing"},
    ],
)
def test_failures_that_would_repeat_are_never_sent_again(vendor: str, row: dict[str, Any]) -> None:
    assert not worth_resubmitting(row, REGISTRY[vendor])


# (vendor, code, worth sending again): DashScope's families by prefix, every other code exactly as listed.
CODE_MATCHES = [
    ("dashscope", "Throttling", True),
    ("dashscope", "Throttling.RateQuota", True),
    ("dashscope", "Throttling.User", True),  # a member the registry does not list
    ("dashscope", "InternalError", True),
    ("dashscope", "InternalError.Timeout", True),
    ("dashscope", "RequestTimeOut", True),
    ("dashscope", "ThrottlingUser", False),  # no family without its dot
    ("dashscope", "InternalErrors", False),
    ("dashscope", "throttling.user", False),  # codes are case-sensitive
    ("dashscope", "InvalidParameter", False),
    ("dashscope", "RequestTimeOut.Later", False),  # an exact code is no family
    ("zhipu", "1302", True),
    ("zhipu", "13020", False),
    ("zhipu", "1302.1", False),
    ("moonshot", "server_error", True),
    ("moonshot", "server_error_x", False),
    ("openai", "rate_limit_exceeded", True),
    ("openai", "rate_limit_exceeded.soon", False),
    ("openai", "Throttling.User", False),
]


@pytest.mark.parametrize(("vendor", "code", "retry"), CODE_MATCHES)
def test_code_families_are_matched_by_prefix_and_other_codes_exactly(
    vendor: str, code: str, retry: bool
) -> None:
    assert worth_resubmitting({"status": "failed", "error": {"code": code}}, REGISTRY[vendor]) is retry
    assert REGISTRY[vendor].errors.is_retryable(code) is retry
