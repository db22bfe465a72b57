"""
Hardening, the wire: what a vendor (or anything between it and us) answers never decides the wrong thing.

Class 6: a completed batch whose request counts are unknown is judged from what is known, at the latest
from the landed rows, never as zero failures. Class 7: a poll answered with another batch's object is a
typed error counted against that poll, on both faces, in the trigger and on the worker. Class 8: a
trickled answer ends at the call's deadline on both faces. Class 9: an error answer of any size or
compression keeps its status and kind. The answers come from the emulator (real result files; only its
rendering of the counts is rewritten) or from a scripted loopback server where no vendor would go.
Unit tests: ``tests/test_outcomes.py``, ``tests/hooks/test_hook_core.py``, ``tests/hooks/test_transport.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st
from relkit import VENDORS, bounded, connection, examples, write_request_file

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.emulator import Emulator, dialects
from airflow_provider_llmbatch.exceptions import (
    APITimeoutError,
    MalformedResponseError,
    TooManyFailedRequestsError,
    VendorAPIError,
    WrongObjectError,
)
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.outcomes import request_counts
from airflow_provider_llmbatch.retry import NO_RETRY, RetryPolicy
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.hooks.loopback import Received, Vendor, Writer, response, serving
from tests.operators.conftest import FakeTI, make_context
from tests.pollkit import Clock, RecordingLog, run_to_end, waits_on

pytestmark = pytest.mark.integration

KEY = "sk-wire-0123456789abcdef"
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _operators_run_outside_task_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.bases.operator import ExecutorSafeguard

    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)


def _value(server: Vendor, timeout: float | None = None) -> dict[str, Any]:
    """Return a connection to a scripted vendor on loopback (with its timeout, if given)."""
    value: dict[str, Any] = {"conn_type": "llmbatch_openai", "host": f"{server.origin}/v1", "password": KEY}
    if timeout is not None:
        value["extra"] = {"timeout": timeout}
    return value


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """One clock for the trigger and the worker-side wait, moving only when they sleep."""
    clock = Clock()
    waits_on(clock, trigger_module, monkeypatch)
    waits_on(clock, waiting, monkeypatch)
    return clock


def _wait_on_worker(hook: BatchHook, batch_id: str, settings: waiting.WaitSettings) -> dict[str, Any]:
    return waiting.poll_until_done(
        hook, [batch_id], settings, waiting.clock() + settings.timeout, RecordingLog()
    )


def _wait_in_trigger(conn_id: str, batch_id: str, settings: waiting.WaitSettings) -> dict[str, Any]:
    trigger = settings.trigger(conn_id, [batch_id], trigger_module.clock() + settings.timeout)
    [event_] = asyncio.run(run_to_end(trigger))
    return dict(event_)


# -- class 6: unknown request counts are never zero --------------------------------------------------------

ABSENT = object()
UNKNOWN_COUNTS = st.one_of(
    st.sampled_from([ABSENT, None, {}, [], "12", {"total": None, "completed": None, "failed": None}]),
    st.fixed_dictionaries(
        {},
        optional={
            "total": st.none() | st.integers(0, 20),
            "completed": st.none() | st.integers(0, 20),
            "failed": st.none() | st.sampled_from(["many", [], {}]),
        },
    ),
    st.fixed_dictionaries(
        {"failed": st.integers(0, 5)}, optional={"total": st.none(), "completed": st.none()}
    ),
)
"""What a vendor may send instead of counts: nothing, null, empty, all null, no ``failed``, only it."""


@pytest.fixture
def counts_as(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Batch id -> the ``request_counts`` the emulator renders for it instead of its own (ABSENT: none)."""
    rewrites: dict[str, Any] = {}
    real = dialects.render_batch

    def render(spec: Any, batch: Any) -> dict[str, Any]:
        body = real(spec, batch)
        if batch.id in rewrites:
            body.pop("request_counts", None)
            if rewrites[batch.id] is not ABSENT:
                body["request_counts"] = rewrites[batch.id]
        return body

    monkeypatch.setattr(dialects, "render_batch", render)
    return rewrites


def _judged(call: Callable[[], Any]) -> str:
    try:
        call()
    except TooManyFailedRequestsError:
        return "too many failed"
    return "success"


@examples(40)
@given(
    vendor=st.sampled_from(VENDORS),
    total=st.integers(1, 6),
    data=st.data(),
    fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    counts=UNKNOWN_COUNTS,
)
def test_unknown_counts_are_judged_from_what_is_known_never_as_zero(
    vendor: str,
    total: int,
    data: st.DataObject,
    fraction: float,
    counts: Any,
    emulator: Emulator,
    rel_conn: Callable[..., str],
    counts_as: dict[str, Any],
    fake_time: Clock,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    emulator.reset()
    failing = data.draw(st.integers(0, total))
    conn_id = rel_conn(vendor, max_retries=0)
    source = write_request_file(
        tmp_path_factory.mktemp("counts") / "requests.jsonl", REGISTRY[vendor], total, failing=failing
    )
    with BatchHook(conn_id) as hook:
        batch_id = hook.create_batch(input_file_id=hook.upload_file(source).id).id
        emulator.force_status(vendor, batch_id, "completed")  # real output and error files
        counts_as[batch_id] = counts
        batch = hook.get_batch(batch_id)
        assume(request_counts(batch.summary()) is None)  # only what really reads as unknown
        settings = waiting.WaitSettings.checked(max_failed_fraction=fraction)
        worker = _judged(
            lambda: waiting.complete({}, _wait_on_worker(hook, batch_id, settings), settings, None)
        )
    trigger = _judged(
        lambda: waiting.complete({}, _wait_in_trigger(conn_id, batch_id, settings), settings, None)
    )
    assert worker == trigger, "both faces read the same answer the same way"
    verdict = worker
    if verdict == "success":  # the wait let it through: the fetch judges the landed rows
        fetch = FetchBatchResultsOperator(
            task_id="fetch", conn_id=conn_id, batch_id=batch_id, input_file=str(source),
            destination=str(source.with_name("results.jsonl")), max_failed_fraction=fraction,
        )  # fmt: skip
        verdict = _judged(lambda: fetch.execute(make_context(FakeTI())))
    truth = "success" if failing / total <= fraction else "too many failed"
    event(f"{'no output file' if failing == total else 'output file'}: {truth}")
    assert verdict == truth, f"{failing} of {total} failed, {fraction:.0%} allowed, counts {counts!r}"


# -- class 7: an answer about another batch ---------------------------------------------------------------

OTHER_IDS = st.one_of(
    st.sampled_from(["batch_other", "BATCH_OURS", "batch_ours ", " batch_ours", "batch_ours2", "batch_our"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
).filter(lambda other: other != "batch_ours")
STATUSES = ["completed", "failed", "expired", "cancelled", "in_progress", "validating"]


def scripted_polls(answers: list[dict[str, Any]]) -> Callable[[Received], bytes]:
    """Answer each poll with the next of ``answers`` (the last repeats); record nothing else."""
    served = iter(answers)
    last = answers[-1]

    def handler(request: Received) -> bytes:
        body = next(served, last)
        return response(200, json.dumps(body).encode(), "Content-Type: application/json")

    return handler


@pytest.mark.parametrize("path", ["sync hook", "async hook", "trigger", "worker wait"])
@examples(30)
@given(
    others=st.lists(st.tuples(OTHER_IDS, st.sampled_from(STATUSES)), max_size=5), allowed=st.integers(1, 4)
)
def test_an_answer_about_another_batch_is_a_counted_error(
    path: str, others: list[tuple[str, str]], allowed: int, fake_time: Clock
) -> None:
    ours = {"id": "batch_ours", "object": "batch", "status": "completed"}
    answers = [{"id": other, "object": "batch", "status": status} for other, status in others] + [ours]
    with serving(scripted_polls(answers)) as server, connection(_value(server)) as conn:
        outcome = _poll_through(path, conn, allowed)
    wrong = len(others)
    polls = len(server.requests)
    event(f"{path}: {'ours' if wrong < allowed else 'gave up'}")
    if path.endswith(
        "hook"
    ):  # the hook's retry policy repeats a wrong answer like a 5xx: `allowed - 1` times
        if wrong < allowed:
            assert isinstance(outcome, Batch), repr(outcome)
            assert (outcome.id, outcome.status, polls) == ("batch_ours", "completed", wrong + 1)
        else:
            assert isinstance(outcome, WrongObjectError), repr(outcome)
            assert f"asked for 'batch_ours', the answer is about {others[allowed - 1][0]!r}" in str(outcome)
            assert polls == allowed
        return
    if wrong < allowed:  # each wrong answer cost one poll and counted as one error
        assert outcome["event"] == "terminal"
        assert (outcome["batch"]["batch_id"], outcome["batch"]["status"]) == ("batch_ours", "completed")
    else:
        assert outcome["event"] == "error"
        assert outcome["batch"] is None, "never the other batch's summary"
        assert f"failed {allowed} times in a row; last error: " in outcome["message"]
        assert "the answer is about" in outcome["message"]
    assert outcome["polls"] == polls == min(wrong, allowed - 1) + 1


def _poll_through(path: str, conn_id: str, allowed: int) -> Any:
    policy = RetryPolicy(max_retries=allowed - 1, base_delay=0.001, max_delay=0.001, sleep=lambda s: None)
    settings = waiting.WaitSettings.checked(max_consecutive_errors=allowed, timeout=3600)
    hook = BatchHook(conn_id, retry_policy=policy)
    try:
        if path == "sync hook":
            return hook.get_batch("batch_ours")
        if path == "async hook":
            return asyncio.run(_aget(hook, "batch_ours"))
        if path == "trigger":
            return _wait_in_trigger(conn_id, "batch_ours", settings)
        return _wait_on_worker(hook, "batch_ours", settings)
    except VendorAPIError as exc:
        return exc
    finally:
        hook.close()


async def _aget(hook: BatchHook, batch_id: str) -> Batch:
    try:
        return await hook.aget_batch(batch_id)
    finally:
        await hook.aclose()


# -- class 8: a deadline for the whole call, however the answer trickles ------------------------------------

STATUS = b"HTTP/1.1 200 OK\r\n"
PAD = b"X-Pad: " + b"a" * 200_000 + b"\r\n"
REST = b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
STAGES = {
    "status line": (b"", STATUS + PAD + REST),
    "headers": (STATUS, PAD + REST),
    "body": (STATUS + REST, b'{"id": "b1", "object": "batch", "status": "in_progress"' + b" " * 200_000),
}
"""
Where the answer starts to trickle: what is sent at once, then what follows a few bytes at a time (a
long header line, or a long body: hours at that pace, and far below any parser's size limit by then).
"""
TIMEOUT = 0.3


def trickler(stage: str, pause: float, size: int, finished: list[bool]) -> Callable[[Received], Any]:
    """Answer with the stage's head at once, then ``size`` bytes per ``pause`` seconds: hours of answer."""
    at_once, slowly = STAGES[stage]

    async def send(writer: Writer) -> None:
        writer.write(at_once)
        await writer.drain()
        for start in range(0, len(slowly), size):
            await asyncio.sleep(pause)
            writer.write(slowly[start : start + size])
            await writer.drain()
        finished.append(True)

    return lambda request: send


SYNC_CALLS: dict[str, Callable[[BatchHook], Any]] = {
    "get_batch": lambda h: h.get_batch("b1"),
    "cancel_batch": lambda h: h.cancel_batch("b1"),
    "list_batches": lambda h: list(h.list_batches()),
    "create_batch": lambda h: h.create_batch(input_file_id="f1"),
    "get_file": lambda h: h.get_file("f1"),
    "list_files": lambda h: list(h.list_files()),
    "delete_file": lambda h: h.delete_file("f1"),
}
ASYNC_CALLS = {"aget_batch": "get_batch", "acancel_batch": "cancel_batch"}


@examples(24)
@given(
    call=st.sampled_from([*SYNC_CALLS, *ASYNC_CALLS, "test_connection", "trigger poll"]),
    stage=st.sampled_from(sorted(STAGES)),
    pause=st.floats(0.01, 0.1),
    size=st.integers(1, 3),
)
def test_a_trickled_answer_ends_at_the_calls_deadline(
    call: str, stage: str, pause: float, size: int, fake_time: Clock
) -> None:
    finished: list[bool] = []
    with (
        serving(trickler(stage, pause, size, finished)) as server,
        connection(_value(server, TIMEOUT)) as conn,
    ):
        # Each read comes well within the timeout; only a deadline for the whole call ends it. Per read,
        # the answer would take hours: the bound fails the test long before.
        outcome = bounded(lambda: _call_trickled(call, conn), seconds=30)
    assert finished == [], "the server still had most of the answer to send"
    if call == "test_connection":
        assert outcome[0] is False
        assert "APITimeoutError" in outcome[1]
    elif call == "trigger poll":
        assert outcome["event"] == "error"
        assert "APITimeoutError" in outcome["message"]
    else:
        assert isinstance(outcome, APITimeoutError), repr(outcome)
        assert outcome.effect == "unknown"
        assert outcome.operation == ASYNC_CALLS.get(call, call)


def _call_trickled(call: str, conn_id: str) -> Any:
    if call == "trigger poll":
        settings = waiting.WaitSettings.checked(max_consecutive_errors=1)
        return _wait_in_trigger(conn_id, "b1", settings)
    hook = BatchHook(conn_id, retry_policy=NO_RETRY)
    try:
        if call == "test_connection":
            return hook.test_connection()
        if call in ASYNC_CALLS:

            async def once() -> Any:
                try:
                    return await getattr(hook, call)("b1")
                finally:
                    await hook.aclose()

            return asyncio.run(once())
        return SYNC_CALLS[call](hook)
    except VendorAPIError as exc:
        return exc
    finally:
        hook.close()


# -- class 9: error answers of any size keep their status and kind ------------------------------------------

ERROR_STATUSES = [400, 401, 403, 404, 409, 413, 422, 429, 500, 502, 503]
CODES = [None, "invalid_api_key", "rate_limit_exceeded", "insufficient_quota", "server_error", "1113"]


BOMB_MB = 1024
"""A compressed answer inflates to this many megabytes: about a megabyte on the wire."""


def _compressed(head: bytes, megabytes: int, encoding: str) -> bytes:
    """Return ``head`` and ``megabytes`` MB of spaces, gzip or zlib: one MB compressed, then repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    spaces = b" " * MB
    first = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    if not megabytes:
        return first + compressor.flush()
    # A full flush resets the compressor, so every further megabyte is the same bytes. The trailer's
    # checksum covers what was compressed once: only a client that read to the very end would notice.
    block = compressor.compress(spaces) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + block * megabytes + compressor.flush()


def answering(status: int, head: bytes, megabytes: int, encoding: str, sent: list[bool]) -> Any:
    """Answer every call with ``status``: ``head`` and ``megabytes`` MB of spaces, written 1 MB at a time."""
    compressed = encoding in ("gzip", "deflate")
    body = _compressed(head, megabytes, encoding) if compressed else b""
    headers = [f"Content-Encoding: {encoding}"] if compressed else []
    size = len(body) if compressed else len(head) + megabytes * MB

    async def send(writer: Writer) -> None:
        framing = "Transfer-Encoding: chunked" if encoding == "chunked" else f"Content-Length: {size}"
        head_lines = "".join(f"{h}\r\n" for h in [framing, "Content-Type: application/json", *headers])
        writer.write(f"HTTP/1.1 {status} Whatever\r\n{head_lines}\r\n".encode())
        pieces = [body[i : i + MB] for i in range(0, len(body), MB)] if compressed else [head]
        for piece in itertools.chain(pieces, () if compressed else itertools.repeat(b" " * MB, megabytes)):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if encoding == "chunked" else piece)
            await writer.drain()
        if encoding == "chunked":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        sent.append(True)

    return lambda request: send


ERROR_CALLS = ["get_batch", "cancel_batch", "list_batches", "create_batch", "download_file", "aget_batch"]


def _fail(call: str, conn_id: str, tmp: Path) -> Any:
    hook = BatchHook(conn_id, retry_policy=NO_RETRY)
    try:
        if call == "download_file":
            return hook.download_file("f1", tmp / "out.jsonl")
        if call == "aget_batch":
            return asyncio.run(_aget(hook, "b1"))
        return {**SYNC_CALLS, "list_batches": lambda h: list(h.list_batches())}[call](hook)
    except VendorAPIError as exc:
        return exc
    finally:
        hook.close()


@examples(30)
@given(
    status=st.sampled_from(ERROR_STATUSES),
    code=st.sampled_from(CODES),
    html=st.booleans(),
    encoding=st.sampled_from(["identity", "chunked", "gzip", "deflate"]),
    megabytes=st.integers(32, 200),
    call=st.sampled_from(ERROR_CALLS),
)
def test_an_error_answer_of_any_size_keeps_its_status_and_kind(
    status: int,
    code: str | None,
    html: bool,
    encoding: str,
    megabytes: int,
    call: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    message = "the vendor says no"
    head = (
        b"<html><head><title>502 Bad Gateway</title></head><body>" + message.encode()
        if html
        else json.dumps({"error": {"message": message, "code": code}}).encode()
    )
    tmp = tmp_path_factory.mktemp("errors")
    size = BOMB_MB if encoding in ("gzip", "deflate") else megabytes
    outcomes: list[Any] = []
    for megabytes_sent in (0, size):  # the same answer, small and huge (compressed: a bomb)
        sent: list[bool] = []
        answer = answering(status, head, megabytes_sent, encoding, sent)
        with serving(answer) as server, connection(_value(server)) as conn:
            tracemalloc.start()
            try:
                outcomes.append(bounded(lambda c=conn: _fail(call, c, tmp)))
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        if megabytes_sent:
            # Read up to the error-body limit, however far it would inflate: never the answer whole.
            bound = min(megabytes_sent * MB // 2, 8 * transport.MAX_BODY_BYTES)
            assert peak < bound, f"peak {peak // MB} MB reading an answer of {megabytes_sent} MB"
        if megabytes_sent and encoding in ("identity", "chunked"):
            assert sent == [], "the client stopped reading after the error's head"
    small, huge = outcomes
    assert isinstance(small, VendorAPIError), repr(small)
    assert type(huge) is type(small), f"{small!r} became {huge!r}"
    assert (huge.status_code, huge.code, huge.vendor_message) == (status, small.code, small.vendor_message)
    assert message in huge.vendor_message
    event(f"{type(huge).__name__}")
    event(encoding)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("call", ["get_batch", "cancel_batch", "list_batches", "create_batch", "aget_batch"])
def test_a_compressed_success_is_bounded_after_decompression(
    call: str,
    encoding: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    head = json.dumps({"id": "b1", "object": "batch", "status": "in_progress", "pad": ""}).encode()[:-2]
    with serving(answering(200, head, BOMB_MB, encoding, [])) as server, connection(_value(server)) as conn:
        tracemalloc.start()
        try:
            outcome = bounded(lambda: _fail(call, conn, tmp_path_factory.mktemp("bomb")))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert isinstance(outcome, MalformedResponseError), repr(outcome)
    assert f"larger than {transport.MAX_BODY_BYTES} bytes" in str(outcome)
    assert peak < 8 * transport.MAX_BODY_BYTES, f"peak {peak // MB} MB"
