"""
The canary key as it is pasted: with a line break, a carriage return, a tab, a space or a non-ASCII character.

Around the key (a secret file's newline, a copied tab, a non-breaking space) those are stripped and the
key works; inside it (or a zero-width or accented character at its end) the key is refused when the
connection is read, with an ``InvalidInputError`` naming the field and the position. Either way the key
is then searched for everywhere a run leaves text: exception ``str``/``repr``/traceback/pickle, stdlib
logs at DEBUG (httpx, httpcore, aiohttp included), structlog output, stdout/stderr, trigger kwargs and
events, XCom values, rendered template fields and ``test_connection``'s message, through the sync face,
the async face, the trigger and the operators. Each key is made of two random 32-hex pieces and the
search is for each piece alone: no escaping, quoting or splitting at the odd character hides a leak.
A wrong key with the same odd characters goes to an emulator whose 401 quotes the header it got.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred
from relkit import connection, shown, write_request_file
from structlog.testing import capture_logs

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig, FaultRule
from airflow_provider_llmbatch.exceptions import AuthenticationError, InvalidInputError, LLMBatchError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.errors import secret_forms
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.retry import NO_RETRY
from airflow_provider_llmbatch.sensors.batch import BatchSensor
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import FakeStateStore, FakeTI, make_context
from tests.pollkit import Clock, rebuild, run_to_end, waits_on

pytestmark = pytest.mark.integration

VENDOR = "openai"
GOOD = (uuid.uuid4().hex, uuid.uuid4().hex)
WRONG = (uuid.uuid4().hex, uuid.uuid4().hex)
CANARY = f"sk-canary-{GOOD[0]}{GOOD[1]}"
"""The key the emulator accepts; every wrapped variant below strips to it."""

WRAPS = {
    "line break": "{}\n",
    "carriage return": "\r{}\r\n",
    "tab": "\t{}\t",
    "trailing space": "{} ",
    "non-ASCII space": "\u3000{}\u00a0",
}
"""Whitespace around the key, as ``str.isspace`` knows it: stripped, and the key works."""

INSIDE = {
    "line break": "sk-canary-{}\n{}",
    "carriage return": "sk-canary-{}\r{}",
    "tab": "sk-canary-{}\t{}",
    "space": "sk-canary-{} {}",
    "zero-width space": "sk-canary-{}\u200b{}",
    "non-ASCII letter": "sk-canary-{}\u00e9{}",
    "zero-width space at the end": "sk-canary-{}{}\u200b",
    "NUL": "sk-canary-{}\x00{}",
}
"""Characters no header carries inside the key (or at its end, when they are not whitespace): refused."""


@pytest.fixture(scope="module")
def echoing() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(time_scale=0.1, echo_credentials=True), api_key=CANARY) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _quiet_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.bases.operator import ExecutorSafeguard

    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)
    clock = Clock()
    waits_on(clock, trigger_module, monkeypatch)
    waits_on(clock, waiting, monkeypatch)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """Every log line at DEBUG: the HTTP clients', and the provider's own through stdlib loggers."""
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "aiohttp", "airflow", "airflow_provider_llmbatch", "llmbatch.tests"):
        caplog.set_level(logging.DEBUG, logger=name)
    # Airflow's structlog drops debug lines before any processor sees them: these classes log to stdlib
    # loggers here instead, so a debug line holding the key would be caught too.
    for cls in (BatchHook, BatchTrigger, CreateBatchOperator, BatchSensor, FetchBatchResultsOperator):
        logger = logging.getLogger(f"llmbatch.tests.{cls.__name__}")
        monkeypatch.setattr(cls, "log", property(lambda self, logger=logger: logger))
    return caplog


@pytest.fixture(scope="module")
def batch_done(echoing: Emulator, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A completed batch the working keys wait for and fetch."""
    source = write_request_file(tmp_path_factory.mktemp("keys") / "requests.jsonl", REGISTRY[VENDOR], 3)
    with connection(_value(echoing, CANARY)) as conn, BatchHook(conn) as hook:
        batch_id = hook.create_batch(input_file_id=hook.upload_file(source).id).id
    echoing.force_status(VENDOR, batch_id, "completed")
    return batch_id


def _value(emulator: Emulator, key: str) -> dict[str, Any]:
    # No retries: a poll that fails is the waiter's to judge, and nothing here backs off for real.
    host = emulator.base_url(VENDOR)
    return {
        "conn_type": REGISTRY[VENDOR].conn_type,
        "host": host,
        "password": key,
        "extra": {"max_retries": 0},
    }


def assert_nowhere(pieces: tuple[str, str], key: str, texts: dict[str, str]) -> None:
    """Fail naming where either piece of the key (or any form of the whole key) was found."""
    needles = [*pieces, *(f for f in secret_forms(key) if f.strip())]
    for where, text in texts.items():
        for needle in needles:
            assert needle not in text, f"a piece of the key is in the {where}"


class Run:
    """Everything one path left behind: exceptions, return values, XComs, events, logs and output."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def keep(self, where: str, value: Any) -> Any:
        if isinstance(value, BaseException):
            for form, text in shown(value).items():
                self.texts[f"{where} ({form})"] = text
        else:
            self.texts[where] = json.dumps(value, default=repr)
        return value


Recording = Callable[[dict[str, Any]], AbstractContextManager[tuple[str, Run]]]


@pytest.fixture
def recording(debug_logs: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Recording:
    """Set a connection for a block; yield its id and a :class:`Run` that gets the block's logs and output."""

    @contextmanager
    def record(value: dict[str, Any]) -> Iterator[tuple[str, Run]]:
        run = Run()
        with connection(value) as conn, capture_logs() as structured:
            yield conn, run
        out = capfd.readouterr()
        run.texts["stdlib logs"] = debug_logs.text + "".join(
            f"{r.msg!r} {r.args!r}" for r in debug_logs.records
        )
        run.texts["structlog"] = json.dumps(structured, default=repr)
        run.texts["stdout and stderr"] = out.out + out.err

    return record


def _trigger(conn_id: str, batch_id: str, run: Run) -> list[dict[str, Any]]:
    trigger = rebuild(BatchTrigger(conn_id, batch_id, max_consecutive_errors=1))
    run.keep("trigger kwargs", trigger.serialize())
    return run.keep("trigger events", asyncio.run(run_to_end(trigger)))


async def _aget(hook: BatchHook, batch_id: str) -> Any:
    try:
        return await hook.aget_batch(batch_id)
    finally:
        await hook.aclose()


def _attempt(run: Run, where: str, call: Callable[[], Any]) -> Any:
    try:
        return run.keep(where, call())
    except LLMBatchError as exc:
        return run.keep(where, exc)


# -- wrapped in whitespace: stripped, works, never seen -----------------------------------------------------


def _working_paths(emulator: Emulator, conn: str, batch_id: str, run: Run, tmp: Path) -> None:
    with BatchHook(conn, retry_policy=NO_RETRY) as hook:
        assert run.keep("get_batch", hook.get_batch(batch_id).summary())["status"] == "completed"
        run.keep("list_batches", [b.summary() for b in hook.list_batches()])
        run.keep("hook repr", repr(hook))
        assert run.keep("test_connection", hook.test_connection())[0] is True
    assert (
        run.keep("aget_batch", asyncio.run(_aget(BatchHook(conn), batch_id)).summary())["batch_id"]
        == batch_id
    )
    assert [e["event"] for e in _trigger(conn, batch_id, run)] == ["terminal"]
    ti = FakeTI()
    source = write_request_file(tmp / "requests.jsonl", REGISTRY[VENDOR], 2)
    create = CreateBatchOperator(
        task_id="create",
        conn_id="{{ params.conn }}",
        input_file=str(source),
        metadata={"run": "{{ run_id }}"},
        wait_for_completion=True,
        deferrable=True,
    )
    context = {**make_context(ti, FakeStateStore()), "params": {"conn": conn}}
    create.render_template_fields(context)
    run.keep("rendered fields", {f: getattr(create, f) for f in create.template_fields})
    emulator.add_fault(FaultRule("503", vendor=VENDOR, operation="get_batch"))  # not yet done: it defers
    with pytest.raises(TaskDeferred) as deferred:
        create.execute(context)
    run.keep("deferral trigger kwargs", deferred.value.trigger.serialize())
    fetch = FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=conn,
        batch_id=batch_id,
        input_file=str(source),
        destination=str(tmp / "out.jsonl"),
    )
    run.keep("fetch manifest", fetch.execute(make_context(ti)))
    run.keep("XComs", ti.pushed)
    run.keep("results file", (tmp / "out.jsonl").read_text())


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_a_key_with_whitespace_around_it_works_and_is_never_seen(
    wrap: str, echoing: Emulator, batch_done: str, recording: Recording, tmp_path: Path
) -> None:
    key = WRAPS[wrap].format(CANARY)
    assert key != CANARY
    assert key.strip() == CANARY
    with recording(_value(echoing, key)) as (conn, run):
        _working_paths(echoing, conn, batch_done, run, tmp_path)
    assert_nowhere(GOOD, key, run.texts)
    # The search finds what is there: the batch id, in the trigger's event and the XComs.
    assert batch_done in run.texts["trigger events"]
    assert batch_done in run.texts["fetch manifest"]


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_a_wrong_key_with_whitespace_is_redacted_where_the_vendor_echoes_it(
    wrap: str, echoing: Emulator, recording: Recording
) -> None:
    wrong = f"sk-canary-{WRONG[0]}{WRONG[1]}"
    key = WRAPS[wrap].format(wrong)
    with recording(_value(echoing, key)) as (conn, run):
        hook = BatchHook(conn, retry_policy=NO_RETRY)
        sync = _attempt(run, "sync face", lambda: hook.get_batch("batch-1"))
        tested = run.keep("test_connection", hook.test_connection())
        hook.close()
        async_ = _attempt(run, "async face", lambda: asyncio.run(_aget(BatchHook(conn), "batch-1")))
        events = _trigger(conn, "batch-1", run)
    assert_nowhere(WRONG, key, run.texts)
    for exc in (sync, async_):
        assert isinstance(exc, AuthenticationError), repr(exc)
        assert "got Authorization: Bearer ***" in exc.vendor_message, "it was echoed, and redacted"
    assert tested[0] is False
    assert "AuthenticationError" in events[0]["message"]


# -- odd characters inside: refused when the connection is read, never seen ----------------------------------


def _refused_paths(conn: str, run: Run, tmp: Path) -> list[Any]:
    hook = BatchHook(conn, retry_policy=NO_RETRY)
    outcomes = [
        _attempt(run, "sync face", lambda: hook.get_batch("batch-1")),
        _attempt(run, "async face", lambda: asyncio.run(_aget(BatchHook(conn), "batch-1"))),
    ]
    tested = run.keep("test_connection", hook.test_connection())
    hook.close()
    [event] = _trigger(conn, "batch-1", run)
    ti = FakeTI()
    source = str(write_request_file(tmp / "requests.jsonl", REGISTRY[VENDOR], 2))
    operators = {
        "create": CreateBatchOperator(task_id="create", conn_id=conn, input_file=source),
        "sensor": BatchSensor(task_id="wait", conn_id=conn, batch_id="batch-1", deferrable=True),
        "fetch": FetchBatchResultsOperator(
            task_id="fetch", conn_id=conn, batch_id="batch-1", input_file=source
        ),
    }
    for name, operator in operators.items():
        outcomes.append(
            _attempt(run, name, lambda op=operator: op.execute(make_context(ti, FakeStateStore())))
        )
    run.keep("XComs", ti.pushed)
    assert tested[0] is False
    assert event["event"] == "error"
    return [*outcomes, tested[1], event["message"]]


@pytest.mark.parametrize("inside", sorted(INSIDE))
def test_a_key_with_an_odd_character_inside_is_refused_and_never_seen(
    inside: str, echoing: Emulator, recording: Recording, tmp_path: Path
) -> None:
    pieces = (uuid.uuid4().hex, uuid.uuid4().hex)
    key = INSIDE[inside].format(*pieces)
    before = echoing.stats(VENDOR)["operations"]
    with recording(_value(echoing, key)) as (conn, run):
        outcomes = _refused_paths(conn, run, tmp_path)
    assert_nowhere(pieces, key, run.texts)
    position = (
        len("sk-canary-") + len(pieces[0]) + (len(pieces[1]) if inside.endswith("at the end") else 0) + 1
    )
    message = (
        f"password (API key): expected printable ASCII only, got a {{}} character at position {position}"
    )
    kind = "non-ASCII" if ord(key[position - 1]) > 0x7E else "control or space"
    for outcome in outcomes:
        text = str(outcome)
        assert message.format(kind) in text, text
    for exc in outcomes[:5]:
        assert isinstance(exc, InvalidInputError), repr(exc)
    assert echoing.stats(VENDOR)["operations"] == before, "refused before anything was sent"
