"""
Hardening, task arguments: what a DAG hands operators, sensor and trigger is refused before anything is spent.

``requests=`` values JSON cannot carry as they are, every duration argument of every public class, and
user metadata in the provider's ``llmbatch_`` namespace are tried with values hypothesis generates,
through ``execute`` against the emulator: a refusal names the record and field (or the argument), and
the emulator has seen nothing; whatever is accepted goes the whole way (a batch created, a deferral the
triggerer can rebuild). The identity scenario replays the review's finding: a create whose effect is
unknown, then another run, another input or another map index, must get a batch of its own.
Unit tables: ``tests/test_jsonl.py`` (single records), ``tests/test_waiting.py`` (seven values per
argument), ``tests/operators/test_create_batch.py`` and ``test_reattach.py`` (single keys and retries).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import re
from collections.abc import Callable
from decimal import Decimal
from enum import Enum
from fractions import Fraction
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred
from hypothesis import event, given
from hypothesis import strategies as st
from relkit import VENDORS, examples, write_request_file

from airflow_provider_llmbatch.checks import MAX_WAIT_SECONDS
from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.hooks import _core
from airflow_provider_llmbatch.hooks import base as hook_base
from airflow_provider_llmbatch.hooks.arguments import IDEMPOTENCY_KEY, RESERVED_PREFIX
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.jsonl import build_request_file
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.reattach import KEY_METADATA, REQUESTS_METADATA
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.sensors.batch import BatchSensor
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY, EndpointSpec
from airflow_provider_llmbatch.waiting import DEFER_TIMEOUT_MARGIN
from tests.operators.conftest import FakeStateStore, FakeTI, make_context
from tests.pollkit import Clock, rebuild, run_to_end, waits_on

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _operators_run_outside_task_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.bases.operator import ExecutorSafeguard

    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)
    # Operators build their own hooks: their backoff is milliseconds here, never slept for real.
    monkeypatch.setattr(
        hook_base, "RetryPolicy", lambda **kw: RetryPolicy(**{"base_delay": 0.001, "max_delay": 0.004, **kw})
    )


@pytest.fixture
def conns(rel_conn: Callable[..., str]) -> dict[str, str]:
    """One connection per vendor, hook retries off (a poll that fails is the waiter's to judge)."""
    return {vendor: rel_conn(vendor, max_retries=0) for vendor in VENDORS}


def _sent(emulator: Emulator) -> dict[str, dict[str, int]]:
    return {vendor: dict(emulator.stats(vendor)["operations"]) for vendor in VENDORS}


# -- class 3: requests= values JSON cannot carry as they are ----------------------------------------------


class Colour(Enum):
    RED = "red"


UNSAFE = st.one_of(
    st.binary(max_size=6),
    st.binary(max_size=6).map(bytearray),
    st.binary(max_size=4).map(memoryview),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.decimals(),
    st.fractions(),
    st.complex_numbers(),
    st.sets(st.integers(), max_size=3),
    st.frozensets(st.text(max_size=3), max_size=3),
    st.datetimes(),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.uuids(),
    st.builds(PurePosixPath, st.text(max_size=5)),
    st.sampled_from([Colour.RED, object(), range(3), Ellipsis]),
    st.dictionaries(
        st.integers() | st.none() | st.booleans() | st.floats(allow_nan=False) | st.tuples(st.integers()),
        st.text(max_size=3),
        min_size=1,
        max_size=2,
    ),
)
"""Every kind of Python value JSON would change: bytes to base64, NaN to null, a set to a list, ..."""

ENDPOINTS = [
    (vendor, endpoint)
    for vendor in VENDORS
    for endpoint in REGISTRY[vendor].endpoints
    if endpoint.kind in ("chat", "test", "responses", "embeddings", "completions", "images")
]


def _prompt_key(kind: str) -> str:
    return "input" if kind == "embeddings" else "prompt"


def _good(kind: str, number: int) -> dict[str, Any]:
    return {"custom_id": f"r-{number}", _prompt_key(kind): f"question {number}"}


def _planted(kind: str, slot: str, value: Any, number: int) -> tuple[dict[str, Any], str]:
    """Return a record with ``value`` at ``slot``, and the path the refusal must name."""
    record = _good(kind, number)
    chat = kind in ("chat", "test")
    if slot == "custom_id":
        record["custom_id"] = value
        return record, "custom_id"
    if slot == "prompt":
        record[_prompt_key(kind)] = value
        where = {"chat": "messages[0].content", "test": "messages[0].content"}.get(kind, _prompt_key(kind))
        return record, f"body.{'input' if kind == 'responses' else where}"
    if slot == "system" and chat:
        return {**record, "system": value}, "body.messages[0].content"
    if slot == "system" and kind == "responses":
        return {**record, "system": value}, "body.instructions"
    if slot == "message" and chat:
        del record["prompt"]
        record["messages"] = [{"role": "user", "content": "hi", "name": value}]
        return record, "body.messages[0].name"
    if slot == "params_list":
        return {**record, "params": {"stop": ["a", value]}}, "body.stop[1]"
    if slot == "body":
        content = {"messages": [{"role": "user", "content": "hi"}]} if chat else {_prompt_key(kind): "hi"}
        return {"custom_id": record["custom_id"], "body": {**content, "user_note": {"deep": [value]}}}, (
            "body.user_note.deep[0]"
        )
    return {**record, "params": {"max_tokens": 16, "user_note": value}}, "body.user_note"


SLOTS = ["custom_id", "prompt", "system", "message", "params", "params_list", "body"]


def _endpoint_args(endpoint: EndpointSpec) -> dict[str, str]:
    return {"endpoint": endpoint.path, "model": endpoint.required_model or "test-model"}


@examples(200)
@given(data=st.data())
def test_request_values_json_would_change_are_refused_before_upload(
    data: st.DataObject, emulator: Emulator, conns: dict[str, str], tmp_path: Path
) -> None:
    vendor, endpoint = data.draw(st.sampled_from(ENDPOINTS))
    slot, value = data.draw(st.sampled_from(SLOTS)), data.draw(UNSAFE)
    count = data.draw(st.integers(1, 4))
    number = data.draw(st.integers(1, count))
    records = [_good(endpoint.kind, n) for n in range(1, count + 1)]
    records[number - 1], path = _planted(endpoint.kind, slot, value, number)
    event(type(value).__name__)
    event(f"in {slot}")
    destination = tmp_path / f"built-{len(list(tmp_path.iterdir()))}.jsonl"
    ti = FakeTI()
    operator = CreateBatchOperator(
        task_id="create",
        conn_id=conns[vendor],
        requests=records,
        request_file_destination=str(destination),
        **_endpoint_args(endpoint),
    )
    with pytest.raises(InvalidRequestFileError) as info:
        operator.execute(make_context(ti, FakeStateStore()))
    problems = [p for p in info.value.problems if p.startswith("record ")]
    assert len(problems) == 1, info.value.problems
    assert problems[0].startswith(f"record {number}: {path}: expected a value JSON carries as it is, got ")
    assert _sent(emulator) == {v: {} for v in VENDORS}, "nothing uploaded, not even a look-up"
    assert not destination.exists()
    assert ti.pushed == []
    # The same records with the value JSON carries are built: it was that value, and only it.
    records[number - 1] = _planted(endpoint.kind, slot, "fine", number)[0]
    report = build_request_file(
        records, destination, vendor, endpoint.path, model=_endpoint_args(endpoint)["model"]
    )
    assert report.lines == count


MISSING = [
    ({"prompt": None}, ("chat", "test", "responses", "completions", "images")),
    ({"messages": None}, ("chat", "test", "responses")),
    ({"input": None}, ("embeddings", "responses")),
    ({"prompt": None, "messages": None, "input": None}, ("chat", "test", "responses", "embeddings")),
    ({}, ("chat", "test", "responses", "embeddings", "completions", "images")),
]


@examples(60)
@given(data=st.data())
def test_a_record_without_its_prompt_is_refused_naming_it(
    data: st.DataObject, emulator: Emulator, conns: dict[str, str]
) -> None:
    vendor, endpoint = data.draw(st.sampled_from(ENDPOINTS))
    fields = data.draw(st.sampled_from([f for f, kinds in MISSING if endpoint.kind in kinds]))
    count = data.draw(st.integers(1, 4))
    number = data.draw(st.integers(1, count))
    records: list[dict[str, Any]] = [_good(endpoint.kind, n) for n in range(1, count + 1)]
    records[number - 1] = {"custom_id": f"r-{number}", **fields}
    operator = CreateBatchOperator(
        task_id="create", conn_id=conns[vendor], requests=records, **_endpoint_args(endpoint)
    )
    with pytest.raises(InvalidRequestFileError) as info:
        operator.execute(make_context(FakeTI(), FakeStateStore()))
    problems = [p for p in info.value.problems if p.startswith("record ")]
    assert len(problems) == 1
    assert problems[0].startswith(f"record {number}: record: expected body or "), problems
    assert _sent(emulator) == {v: {} for v in VENDORS}


# -- class 4: every duration argument, the same check, before anything is spent ------------------------

DURATIONS = st.one_of(
    st.floats(),
    st.integers(),
    st.timedeltas(),
    st.sampled_from(
        [
            0,
            -0.0,
            -5,
            5e-324,
            0.5,
            30,
            MAX_WAIT_SECONDS,
            MAX_WAIT_SECONDS + 1,
            math.nextafter(MAX_WAIT_SECONDS, math.inf),
            10**400,
            -(10**400),
            1e30,
            math.nan,
            math.inf,
            -math.inf,
            True,
            False,
            None,
            "30",
            Decimal("30"),
            Fraction(1, 2),
            [30],
            datetime.timedelta(0),
            datetime.timedelta(days=60),
            datetime.timedelta(days=60, microseconds=1),
            datetime.timedelta.max,
            -datetime.timedelta(seconds=1),
        ]
    ),
)
VALID_DURATIONS = st.floats(1e-3, MAX_WAIT_SECONDS) | st.integers(1, int(MAX_WAIT_SECONDS))
MOSTLY_VALID = st.sampled_from([True, True, True, False]).flatmap(
    lambda ok: VALID_DURATIONS if ok else DURATIONS
)
WAIT_ARGUMENTS = ["poll_interval", "max_poll_interval", "timeout"]


def seconds(value: Any) -> float | None:
    """Return the seconds a duration argument means, or None for anything that is not one (the spec)."""
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):  # compared as an int: no float overflow decides it
        return float(value) if 0 < value <= MAX_WAIT_SECONDS else None
    return value if math.isfinite(value) and 0 < value <= MAX_WAIT_SECONDS else None


@examples(80)
@given(
    kind=st.sampled_from(["CreateBatchOperator", "BatchSensor"]),
    values=st.fixed_dictionaries({name: MOSTLY_VALID for name in WAIT_ARGUMENTS}),
)
def test_wait_durations_are_checked_before_anything_is_spent(
    kind: str, values: dict[str, Any], emulator: Emulator, conns: dict[str, str], tmp_path: Path
) -> None:
    emulator.reset()
    conn_id = conns["openai"]
    first_bad = next((name for name in WAIT_ARGUMENTS if seconds(values[name]) is None), None)
    event("refused" if first_bad else "accepted")
    batch_id = ""
    if kind == "BatchSensor":
        with BatchHook(conn_id) as hook:  # what the sensor waits for, made before the sensor exists
            uploaded = hook.upload_file(
                write_request_file(tmp_path / "requests.jsonl", REGISTRY["openai"], 2)
            )
            batch_id = hook.create_batch(input_file_id=uploaded.id).id
        emulator.force_status("openai", batch_id, "in_progress")
    before = _sent(emulator)

    def build() -> Any:
        if kind == "CreateBatchOperator":
            source = write_request_file(tmp_path / "requests.jsonl", REGISTRY["openai"], 2)
            return CreateBatchOperator(
                task_id="create", conn_id=conn_id, input_file=str(source), wait_for_completion=True,
                deferrable=True, **values,
            )  # fmt: skip
        return BatchSensor(task_id="wait", conn_id=conn_id, batch_id=batch_id, deferrable=True, **values)

    if first_bad is not None:
        with pytest.raises(InvalidInputError, match=f"^{first_bad} must be ") as info:
            build()
        assert repr(values[first_bad])[:40] in str(info.value)
        assert _sent(emulator) == before, "refused when the DAG is parsed: nothing sent"
        return
    operator = build()
    expected = [seconds(values[name]) for name in WAIT_ARGUMENTS]
    settings = operator.wait_settings
    assert [settings.poll_interval, settings.max_poll_interval, settings.timeout] == expected
    # Accepted values go the whole way: upload and create (the operator), then a deferral the triggerer
    # can rebuild. A check any later than construction would fail here, after the batch was paid for.
    emulator.add_fault(FaultRule("503", vendor="openai", operation="get_batch", times=1))  # never done yet
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(make_context(FakeTI(), FakeStateStore()))
    trigger = rebuild(deferred.value.trigger)
    assert [trigger.poll_interval, trigger.max_poll_interval] == expected[:2]
    assert deferred.value.timeout == datetime.timedelta(seconds=expected[2] + DEFER_TIMEOUT_MARGIN)


ROUND_WAIT_ARGUMENTS = ["poll_interval", "timeout"]


@examples(80)
@given(values=st.fixed_dictionaries({name: MOSTLY_VALID for name in ROUND_WAIT_ARGUMENTS}))
def test_the_fetchs_round_wait_durations_are_checked_when_built(values: dict[str, Any]) -> None:
    # The fetch waits for its resubmission rounds: its durations are checked like every other wait's.
    first_bad = next((name for name in ROUND_WAIT_ARGUMENTS if seconds(values[name]) is None), None)
    event("refused" if first_bad else "accepted")

    def build() -> FetchBatchResultsOperator:
        return FetchBatchResultsOperator(task_id="fetch", batch_id="batch_1", resubmit_failed=1, **values)

    if first_bad is not None:
        with pytest.raises(InvalidInputError, match=f"^{first_bad} must be ") as info:
            build()
        assert repr(values[first_bad])[:40] in str(info.value)
        return
    wait = build().round_wait
    assert [wait.poll_interval, wait.timeout] == [seconds(values[name]) for name in ROUND_WAIT_ARGUMENTS]


@pytest.mark.parametrize(
    ("kind", "name", "minimum"),
    [
        ("create", "max_batches", 1),
        ("fetch", "resubmit_failed", 0),
        ("sensor", "max_consecutive_errors", 1),
        ("trigger", "max_consecutive_errors", 1),
    ],
)
@examples(40)
@given(value=st.integers(-3, 3) | st.floats(allow_nan=True) | st.booleans() | st.text(max_size=3) | st.none())
def test_every_count_argument_is_checked_never_converted(
    kind: str, name: str, minimum: int, value: Any
) -> None:
    build = {
        "create": lambda: CreateBatchOperator(task_id="c", input_file="x.jsonl", **{name: value}),
        "fetch": lambda: FetchBatchResultsOperator(task_id="f", batch_id="b", **{name: value}),
        "sensor": lambda: BatchSensor(task_id="s", batch_id="b", **{name: value}),
        "trigger": lambda: BatchTrigger("c", "b", **{name: value}),
    }[kind]
    whole = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    event("accepted" if whole else "refused")
    if not whole:
        with pytest.raises(InvalidInputError, match=f"{name} must be a whole number >= {minimum}"):
            build()
        return
    built = build()
    held = built.wait_settings.max_consecutive_errors if kind == "sensor" else getattr(built, name)
    assert held == value
    assert type(held) is int


@pytest.fixture
def finished_batch(emulator: Emulator, conns: dict[str, str], tmp_path: Path) -> str:
    with BatchHook(conns["openai"]) as hook:
        uploaded = hook.upload_file(write_request_file(tmp_path / "requests.jsonl", REGISTRY["openai"], 2))
        batch_id = hook.create_batch(input_file_id=uploaded.id).id
    emulator.force_status("openai", batch_id, "completed")
    return batch_id


@examples(100)
@given(name=st.sampled_from(["poll_interval", "max_poll_interval", "deadline"]), value=DURATIONS)
def test_trigger_arguments_are_checked_and_what_passes_runs(
    name: str,
    value: Any,
    finished_batch: str,
    conns: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected: float | str | None = "refused"
    if name != "deadline":
        expected = seconds(value) if seconds(value) is not None else "refused"
    elif value is None:
        expected = None  # no deadline
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # A point in time: any finite number of epoch seconds (an int too large for a float is not).
        with contextlib.suppress(OverflowError):
            expected = float(value) if math.isfinite(float(value)) else "refused"
    event("refused" if expected == "refused" else "accepted")
    if expected == "refused":
        with pytest.raises(InvalidInputError, match=f"^{name} must be "):
            BatchTrigger(conns["openai"], finished_batch, **{name: value})
        return
    trigger = rebuild(BatchTrigger(conns["openai"], finished_batch, **{name: value}))
    assert getattr(trigger, name) == expected
    with monkeypatch.context() as patch:
        waits_on(Clock(), trigger_module, patch)
        events = _run(trigger)
    assert [(e["event"], e["batch"]["status"]) for e in events] == [("terminal", "completed")]


def _run(trigger: BatchTrigger) -> list[dict[str, Any]]:
    import asyncio

    return asyncio.run(run_to_end(trigger))


def hook_seconds(value: Any) -> float | None:
    """The hook's ``timeout`` (seconds per call): a number, or text of one, from 0.001 to a day."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and 0.001 <= number <= 86400 else None


HOOK_TIMEOUTS = (
    DURATIONS | st.text(max_size=6) | st.floats(0.001, 86400) | st.sampled_from(["5", " 2.5 ", 86400])
)


@examples(80)
@given(value=HOOK_TIMEOUTS)
def test_the_hooks_timeout_is_checked_before_a_call_is_sent(
    value: Any, finished_batch: str, conns: dict[str, str], emulator: Emulator
) -> None:
    expected = 60.0 if value is None else hook_seconds(value)  # None: the connection's (the default)
    event("refused" if expected is None else "accepted")
    before = _sent(emulator)
    hook = BatchHook(conns["openai"], timeout=value)
    try:
        if expected is None:
            with pytest.raises(
                InvalidInputError, match=r"extra 'timeout': expected a number from 0\.001 to 86400"
            ):
                hook.get_batch(finished_batch)
            assert _sent(emulator) == before
            return
        assert hook.get_batch(finished_batch).id == finished_batch
        assert hook._core().settings.timeout == expected
    finally:
        hook.close()


# -- class 5: the provider's metadata namespace, and whose batch a look-up may take -----------------------

USER_KEYS = st.text(min_size=1, max_size=20).filter(lambda k: not k.startswith(RESERVED_PREFIX))
RESERVED_KEYS = st.text(max_size=12).map(lambda s: RESERVED_PREFIX + s) | st.just(IDEMPOTENCY_KEY)


@examples(60)
@given(
    vendor=st.sampled_from(VENDORS),
    user=st.dictionaries(USER_KEYS, st.text(max_size=20), max_size=4),
    reserved=st.dictionaries(RESERVED_KEYS, st.text(max_size=32), max_size=2),
    use_requests=st.booleans(),
)
def test_user_metadata_never_enters_the_providers_namespace(
    vendor: str,
    user: dict[str, str],
    reserved: dict[str, str],
    use_requests: bool,
    emulator: Emulator,
    conns: dict[str, str],
    tmp_path: Path,
) -> None:
    emulator.reset()
    metadata = {**user, **reserved}
    source: dict[str, Any] = (
        {"requests": [{"custom_id": "a", "prompt": "hi"}], "model": "test-model"}
        if use_requests
        else {"input_file": str(write_request_file(tmp_path / "requests.jsonl", REGISTRY[vendor], 2))}
    )
    ti = FakeTI()
    operator = CreateBatchOperator(task_id="create", conn_id=conns[vendor], metadata=metadata, **source)
    if reserved:
        event("reserved key refused")
        first = next(iter(reserved))
        reason = f"metadata key {first!r}: keys starting with 'llmbatch_' are reserved"
        with pytest.raises(InvalidInputError, match=f"^{re.escape(reason)}"):
            operator.execute(make_context(ti, FakeStateStore()))
        assert _sent(emulator)[vendor] == {}, "refused before the upload, before any look-up"
        assert ti.pushed == []
        return
    refused: InvalidInputError | None = None
    try:
        result = operator.execute(make_context(ti, FakeStateStore()))
    except InvalidInputError as exc:  # over the vendor's limits (pairs, key or value length)
        refused = exc
    if refused is not None:
        event("over the vendor's limits")
        assert "metadata" in str(refused)
        assert _sent(emulator)[vendor] == {}
        return
    event("created")
    stored = emulator.batch(vendor, result["batch_id"])["metadata"]
    assert {k: v for k, v in stored.items() if not k.startswith(RESERVED_PREFIX)} == user
    assert stored[KEY_METADATA] == result[KEY_METADATA]
    assert set(stored) - set(user) == {KEY_METADATA, REQUESTS_METADATA, IDEMPOTENCY_KEY}
    assert stored[REQUESTS_METADATA] == str(1 if use_requests else 2)


CHANGES = ["run_id", "input", "map_index", "task_id"]


@pytest.fixture
def pinned_idempotency(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Make every create carry the same idempotency key (as a user's own ``llmbatch_idem`` once did)."""
    real, fixed = _core.uuid, SimpleNamespace(hex="f" * 32)

    def pin(on: bool) -> None:
        monkeypatch.setattr(_core, "uuid", SimpleNamespace(uuid4=lambda: fixed) if on else real)

    return pin


@examples(24)
@given(
    vendor=st.sampled_from(VENDORS),
    fault=st.sampled_from(["500", "503", "reset", "reset_after"]),
    change=st.sampled_from(CHANGES),
    store=st.booleans(),
    collide=st.booleans(),
)
def test_a_create_of_unknown_effect_is_never_handed_another_runs_batch(
    vendor: str,
    fault: str,
    change: str,
    store: bool,
    collide: bool,
    emulator: Emulator,
    rel_conn: Callable[..., str],
    pinned_idempotency: Callable[[bool], None],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    emulator.reset()
    conn_id = rel_conn(vendor, f"identity_{vendor}", max_retries=2)  # a create is looked up, then repeated
    pinned_idempotency(collide)
    folder = tmp_path_factory.mktemp("identity")
    spec = REGISTRY[vendor]
    first_input = write_request_file(folder / "day1.jsonl", spec, 3)
    second_input = write_request_file(folder / "day2.jsonl", spec, 4) if change == "input" else first_input
    stores: dict[tuple[Any, ...], FakeStateStore] = {}

    def run(ti: FakeTI, source: Path) -> dict[str, Any]:
        identity = (ti.dag_id, ti.task_id, ti.run_id, ti.map_index)
        state = stores.setdefault(identity, FakeStateStore()) if store else None
        op = CreateBatchOperator(task_id=ti.task_id, conn_id=conn_id, input_file=str(source))
        return op.execute(make_context(ti, state))

    day1 = FakeTI(run_id="scheduled__2026-01-01T00:00:00+00:00")
    first = run(day1, first_input)
    other = {
        "run_id": FakeTI(run_id="scheduled__2026-01-02T00:00:00+00:00"),
        "input": FakeTI(run_id=day1.run_id),
        "map_index": FakeTI(run_id=day1.run_id, map_index=3),
        "task_id": FakeTI(run_id=day1.run_id, task_id="create_other"),
    }[change]
    # The vendor fails the create once: before acting (500, 503, reset) or after (reset_after).
    emulator.add_fault(FaultRule(fault, vendor=vendor, operation="create"))  # type: ignore[arg-type]
    second = run(other, second_input)

    assert second["batch_id"] != first["batch_id"], "handed another task instance's batch"
    assert second["reattached"] is False
    assert second[KEY_METADATA] != first[KEY_METADATA]
    batches = {b["id"]: b for b in emulator.batches(vendor)}
    assert set(batches) == {first["batch_id"], second["batch_id"]}, "exactly one batch each, none lost"
    assert batches[second["batch_id"]]["metadata"][KEY_METADATA] == second[KEY_METADATA]
    assert batches[second["batch_id"]]["input_file_id"] == second["input_file_id"] != first["input_file_id"]
    assert batches[first["batch_id"]]["status"] not in ("cancelling", "cancelled")
    # And the look-ups do find what is one's own: day 1's retry re-attaches to day 1's batch.
    again = run(FakeTI(run_id=day1.run_id), first_input)
    assert (again["batch_id"], again["reattached"]) == (first["batch_id"], True)
    assert len(emulator.batches(vendor)) == 2
