"""
API faults during every hook operation, on both faces, for every vendor in the registry.

Each case injects one fault kind into one operation at the emulator, as a single hit and as a
persistent outage, and checks what the caller sees: success after a bounded number of attempts (the
emulator counts them), or a typed error naming vendor, operation and status. A create or an upload is
never done twice (the emulator counts batches and files); a download is complete and identical, or it
fails with nothing left at the destination.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from relkit import FACES, MAX_RETRIES, VENDORS, Face, Waits, sha256, write_request_file

from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.emulator.testing import VendorClient, request_lines
from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    APITimeoutError,
    MalformedResponseError,
    RateLimitError,
    ServerError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.jsonl import RequestFileCheck, validate_request_file
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

# hook call name, emulator operation name
OPERATIONS: dict[str, str] = {
    "upload_file": "upload",
    "create_batch": "create",
    "get_batch": "get_batch",
    "list_batches": "list_batches",
    "cancel_batch": "cancel",
    "download_file": "download",
}
WRITES = {"upload_file", "create_batch"}
"""Calls whose blind repeat would pay twice or store twice: never repeated when their effect is unknown."""

HTTP_KINDS = ["429", "429_retry_after", "500", "502", "503", "html"]
LOST_ANSWER_KINDS = ["reset_after", "reset_mid_body", "stall_after", "stall_mid_body"]
TIMED_KINDS = {"slow", "stall_after", "stall_mid_body"}
KINDS = [*HTTP_KINDS, "reset", "slow", "malformed", *LOST_ANSWER_KINDS]
OUTAGE_KINDS = {"429_retry_after", "503", "html", "reset", "malformed", "reset_after", "stall_after"}
"""Kinds also tried as a lasting outage: one per error class and per lost-answer shape, to keep CI short."""

TIMEOUT = 0.1
"""The client's timeout in the timed cases; the emulator stalls for ``STALL`` seconds."""
STALL = 0.3
RETRY_AFTER = 2.0

ERROR_CLASS: dict[str, type[VendorAPIError]] = {
    "429": RateLimitError,
    "429_retry_after": RateLimitError,
    "500": ServerError,
    "502": ServerError,
    "503": ServerError,
    "html": ServerError,
    "reset": APIConnectionError,
    "slow": APITimeoutError,
    "malformed": MalformedResponseError,
    "reset_after": APIConnectionError,
    "reset_mid_body": APIConnectionError,
    "stall_after": APITimeoutError,
    "stall_mid_body": APITimeoutError,
}


@dataclass
class Setup:
    """What an operation under test needs, made before the fault is armed."""

    source: Path
    input_file_id: str
    batch_id: str
    output_file_id: str | None
    output_path: Path | None


def _prepare(emulator: Emulator, setup_hook: BatchHook, vendor: str, call: str, tmp_path: Path) -> Setup:
    source = write_request_file(tmp_path / "requests.jsonl", REGISTRY[vendor], 40, failing=3)
    if call == "upload_file":
        return Setup(source, "", "", None, None)
    uploaded = setup_hook.upload_file(source)
    if call == "create_batch":
        return Setup(source, uploaded.id, "", None, None)
    batch = setup_hook.create_batch(input_file_id=uploaded.id)
    status = "completed" if call == "download_file" else "in_progress"
    forced = emulator.force_status(vendor, batch.id, status)
    output = forced.get("output_file_id") or None
    path = emulator.file_path(vendor, output) if output else None
    return Setup(source, uploaded.id, batch.id, output, path)


def _invoke(face: Face, call: str, setup: Setup, tmp_path: Path) -> Any:
    if call == "upload_file":
        return face(call, setup.source)
    if call == "create_batch":
        return face(call, input_file_id=setup.input_file_id)
    if call == "download_file":
        # As FetchBatchResultsOperator does: the size the vendor lists lets a garbled 200 be refused.
        assert setup.output_path is not None
        size = setup.output_path.stat().st_size
        return face(call, setup.output_file_id, tmp_path / "out" / "output.jsonl", expected_bytes=size)
    if call == "list_batches":
        return face(call)
    return face(call, setup.batch_id)


def _garbled_read(kind: str, call: str) -> bool:
    """A garbled 200 of a download is caught by its size and repeated like a broken body."""
    return kind == "malformed" and call == "download_file"


def _expect_success(kind: str, persistent: bool, call: str) -> bool:
    if not persistent:
        # One hit: every kind but a garbled success is retried (or, for a write, looked up) and succeeds.
        return kind != "malformed" or _garbled_read(kind, call)
    # A write whose effect happened is found by its lookup however often the answer is lost.
    return call in WRITES and kind in LOST_ANSWER_KINDS


def _expected_attempts(kind: str, persistent: bool, call: str, face: str = "sync") -> int:
    if kind == "malformed" and not _garbled_read(kind, call):
        return 1  # a 200 with a broken body is not repeated: the call may have worked
    if call in WRITES and kind in LOST_ANSWER_KINDS:
        return 1  # acted, answer lost: found by the lookup, never sent again
    attempts = MAX_RETRIES + 1 if persistent else 2
    if face == "async" and call == "get_batch" and kind in {"reset", "reset_after"} and persistent:
        # aiohttp sends an idempotent request once more by itself when its connection closes without an
        # answer (RFC 9112, 9.3.1): each attempt of the policy reaches the vendor twice.
        attempts *= 2
    return attempts


ASYNC_CALLS = {"get_batch", "cancel_batch"}
"""The async face has what a trigger needs only: a poll and a cancel."""

CASES = [
    pytest.param(
        call, kind, persistent, face, id=f"{call}-{kind}-{'outage' if persistent else 'once'}-{face}"
    )
    for call in OPERATIONS
    for kind in KINDS
    for persistent in (False, True)
    for face in FACES
    if not (persistent and kind not in OUTAGE_KINDS)
    # The vendor acting *after* the client gave up (slow, then act) is a race no client can close; the
    # lookup-before-repeat narrows it (tests/hooks) and the operator's llmbatch_key closes it across tries.
    and not (call in WRITES and kind == "slow")
    and (face == "sync" or call in ASYNC_CALLS)
]


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("call", "kind", "persistent", "face_name"), CASES)
def test_fault_during_operation(
    call: str,
    kind: str,
    persistent: bool,
    face_name: str,
    vendor: str,
    emulator: Emulator,
    rel_conn: Callable[..., str],
    faces: Callable[..., Face],
    waits: Waits,
    tmp_path: Path,
) -> None:
    operation = OPERATIONS[call]
    timed = kind in TIMED_KINDS
    conn_id = rel_conn(vendor, timeout=TIMEOUT) if timed else rel_conn(vendor)
    with BatchHook(rel_conn(vendor, "setup_" + vendor)) as setup_hook:
        setup = _prepare(emulator, setup_hook, vendor, call, tmp_path)
    face = faces(conn_id, face_name, retry_policy=waits.policy())
    before = emulator.stats(vendor)
    emulator.add_fault(
        FaultRule(
            kind,  # type: ignore[arg-type]
            vendor=vendor,
            operation=operation,  # type: ignore[arg-type]
            times=None if persistent else 1,
            delay=STALL,
            retry_after=RETRY_AFTER,
        )
    )

    outcome: Any
    try:
        outcome = _invoke(face, call, setup, tmp_path)
    except VendorAPIError as exc:
        outcome = exc
    emulator.clear_faults()
    after = emulator.stats(vendor)
    attempts = after["operations"].get(operation, 0) - before["operations"].get(operation, 0)

    if _expect_success(kind, persistent, call):
        assert not isinstance(outcome, BaseException), f"expected success, got {outcome!r}"
    else:
        expected = APIConnectionError if _garbled_read(kind, call) else ERROR_CLASS[kind]
        assert type(outcome) is expected, f"expected {expected.__name__}, got {outcome!r}"
        message = str(outcome)
        assert f"vendor={vendor}" in message
        assert f"operation={call}" in message
        if kind in HTTP_KINDS or (kind == "malformed" and not _garbled_read(kind, call)):
            status = 200 if kind == "malformed" else 502 if kind == "html" else int(kind[:3])
            assert f"http_status={status}" in message
        assert "emulator-key" not in message
    assert attempts == _expected_attempts(kind, persistent, call, face_name), f"{attempts} attempts"
    # Bounded: never more than the policy allows, and never a real backoff in these tests.
    assert len(waits.asked) <= MAX_RETRIES
    if kind == "429_retry_after" and waits.asked:
        assert waits.asked[0] == RETRY_AFTER  # the vendor's Retry-After, not the backoff

    if call in WRITES:
        # A write is looked up before any repeat exactly when its effect is unknown (not after a 429).
        listing = "list_files" if call == "upload_file" else "list_batches"
        lookups = after["operations"].get(listing, 0) - before["operations"].get(listing, 0)
        if kind.startswith("429") or kind == "malformed":
            assert lookups == 0
        else:
            assert lookups >= 1
    if kind == "html" and isinstance(outcome, BaseException):
        assert "Bad Gateway" in str(outcome)

    # Exactly-once writes: one file, one batch, whatever the fault.
    made_files = after["files_uploaded"] - before["files_uploaded"]
    made_batches = after["batches_created"] - before["batches_created"]
    if call == "upload_file":
        assert made_files == (1 if not isinstance(outcome, BaseException) else made_files)
        assert made_files <= 1
        if not isinstance(outcome, BaseException):
            assert outcome.id in {f["id"] for f in emulator.files(vendor)}
    else:
        assert made_files == 0
    if call == "create_batch":
        assert made_batches <= 1
        if not isinstance(outcome, BaseException):
            assert made_batches == 1
            assert [b["id"] for b in emulator.batches(vendor)] == [outcome.id]
    else:
        assert made_batches == 0

    if call == "download_file":
        destination = tmp_path / "out" / "output.jsonl"
        assert setup.output_path is not None
        if isinstance(outcome, BaseException):
            assert not destination.exists()
        else:
            assert outcome == setup.output_path.stat().st_size
            assert sha256(destination) == sha256(setup.output_path)
        assert [p.name for p in (tmp_path / "out").glob(".*")] == []  # no temporary left behind
    if call == "cancel_batch" and not isinstance(outcome, BaseException):
        assert emulator.batch(vendor, setup.batch_id)["status"] in {"cancelling", "cancelled"}


CHECKED_UPLOAD_CASES = [
    pytest.param(kind, persistent, id=f"{kind}-{'outage' if persistent else 'once'}")
    for kind in KINDS
    for persistent in (False, True)
    if not (persistent and kind not in OUTAGE_KINDS) and kind != "slow"
]


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("kind", "persistent"), CHECKED_UPLOAD_CASES)
def test_fault_during_checked_upload(
    kind: str,
    persistent: bool,
    vendor: str,
    emulator: Emulator,
    rel_conn: Callable[..., str],
    faces: Callable[..., Face],
    waits: Waits,
    tmp_path: Path,
) -> None:
    # The upload the operator makes: the file checked as it streams. Faults meet it as a plain upload,
    # each attempt checks the file again, and the file is stored once at most.
    spec = REGISTRY[vendor]
    source = write_request_file(tmp_path / "requests.jsonl", spec, 40, failing=3)
    conn_id = rel_conn(vendor, timeout=TIMEOUT) if kind in TIMED_KINDS else rel_conn(vendor)
    face = faces(conn_id, "sync", retry_policy=waits.policy())
    emulator.add_fault(
        FaultRule(
            kind,  # type: ignore[arg-type]
            vendor=vendor,
            operation="upload",
            times=None if persistent else 1,
            delay=STALL,
            retry_after=RETRY_AFTER,
        )
    )
    check = RequestFileCheck(spec)

    outcome: Any
    try:
        outcome = face("upload_file", source, check=check)
    except VendorAPIError as exc:
        outcome = exc
    emulator.clear_faults()
    stats = emulator.stats(vendor)

    assert stats["operations"]["upload"] == _expected_attempts(kind, persistent, "upload_file")
    assert stats["files_uploaded"] <= 1
    if _expect_success(kind, persistent, "upload_file"):
        assert not isinstance(outcome, BaseException), f"expected success, got {outcome!r}"
        assert [f["id"] for f in emulator.files(vendor)] == [outcome.id]
        assert emulator.file_path(vendor, outcome.id).read_bytes() == source.read_bytes()
        assert check.report == validate_request_file(source, spec)
    else:
        assert type(outcome) is ERROR_CLASS[kind], f"expected {ERROR_CLASS[kind].__name__}, got {outcome!r}"
        assert "operation=upload_file" in str(outcome)


# -- the fault kinds that let the request take effect, at the HTTP level -----------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_lost_answer_kinds_act_then_break_the_answer(vendor: str, emulator: Emulator, tmp_path: Path) -> None:
    spec = REGISTRY[vendor]
    api = VendorClient(emulator, spec)
    try:
        emulator.add_fault(FaultRule("reset_after", vendor=vendor, operation="upload"))
        with pytest.raises(httpx.ReadError):
            api.upload(request_lines(spec, ["a", "b"]))
        assert emulator.stats(vendor)["files_uploaded"] == 1  # stored, answer lost

        file_id = emulator.files(vendor)[0]["id"]
        emulator.add_fault(FaultRule("stall_after", vendor=vendor, operation="create", delay=0.3))
        with pytest.raises(httpx.ReadTimeout):
            api.http.post(
                "/batches",
                json={
                    "input_file_id": file_id,
                    "endpoint": spec.default_endpoint,
                    "completion_window": spec.completion_window.default or "24h",
                },
                timeout=0.1,
            )
        [batch] = emulator.batches(vendor)
        finished = emulator.force_status(vendor, batch["id"], "completed")
        size = emulator.file_path(vendor, finished["output_file_id"]).stat().st_size

        for after_bytes, expected in ((None, size // 2), (7, 7), (0, 0)):
            emulator.add_fault(
                FaultRule("reset_mid_body", vendor=vendor, operation="download", after_bytes=after_bytes)
            )
            got = bytearray()
            with api.http.stream("GET", f"/files/{finished['output_file_id']}/content") as response:
                assert response.status_code == 200
                assert int(response.headers["content-length"]) == size
                with pytest.raises(httpx.TransportError):
                    _read_raw(response, got)
            assert len(got) == expected
        assert emulator.stats(vendor)["batches_created"] == 1
    finally:
        api.close()


def _read_raw(response: httpx.Response, into: bytearray) -> None:
    for chunk in response.iter_raw():
        into += chunk


def test_after_bytes_is_checked_and_round_trips() -> None:
    rule = FaultRule.from_dict({"kind": "stall_mid_body", "after_bytes": 10, "delay": 2})
    assert rule.to_dict()["after_bytes"] == 10
    with pytest.raises(ValueError, match="after_bytes must be"):
        FaultRule("reset_mid_body", after_bytes=-1)


@pytest.mark.parametrize("lookup_fault", ["503", "reset"])
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("call", sorted(WRITES))
def test_the_lookup_itself_fails_after_a_lost_answer(
    call: str,
    vendor: str,
    lookup_fault: str,
    emulator: Emulator,
    rel_conn: Callable[..., str],
    faces: Callable[..., Face],
    waits: Waits,
    tmp_path: Path,
) -> None:
    # The write took effect and its answer was lost; then the listing meant to find it fails too.
    with BatchHook(rel_conn(vendor, "setup_" + vendor)) as setup_hook:
        setup = _prepare(emulator, setup_hook, vendor, call, tmp_path)
    face = faces(rel_conn(vendor), "sync", retry_policy=waits.policy())  # writes are the sync face's
    listing = "list_files" if call == "upload_file" else "list_batches"
    emulator.add_fault(FaultRule("reset_after", vendor=vendor, operation=OPERATIONS[call]))  # type: ignore[arg-type]
    emulator.add_fault(FaultRule(lookup_fault, vendor=vendor, operation=listing))  # type: ignore[arg-type]
    try:
        outcome: Any = _invoke(face, call, setup, tmp_path)
    except VendorAPIError as exc:
        outcome = exc
    stats = emulator.stats(vendor)
    # Never a second one.
    made = stats["files_uploaded"] if call == "upload_file" else stats["batches_created"]
    assert made == 1
    # The listing has retries of its own: one failed page does not lose the object that exists.
    assert not isinstance(outcome, BaseException), outcome
    found = {f["id"] for f in emulator.files(vendor)} | {b["id"] for b in emulator.batches(vendor)}
    assert outcome.id in found
