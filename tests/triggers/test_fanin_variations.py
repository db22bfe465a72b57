"""
Variations of fan-in in one deferral (BatchSensor/BatchTrigger over a list of batch ids) and of the
merged fetch (FetchBatchResultsOperator over the parts and rounds of a job).

Schedules are checked on a virtual clock that wakes one sleeper at a time, so parts polled together are
timed exactly as if each were waited for alone. Outcomes run against the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_llmbatch import polling, waiting
from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.exceptions import (
    BatchCancelledError,
    BatchExpiredError,
    BatchFailedError,
    BatchOutcomeError,
    BatchTimeoutError,
    InvalidInputError,
    TooManyFailedRequestsError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch, RequestCounts
from airflow_provider_llmbatch.operators import results as results_op
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.outcomes import judge_parts
from airflow_provider_llmbatch.sensors.batch import BatchSensor
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.triggers.batch import CLASSPATH, BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import FakeTI, make_context, write_requests
from tests.pollkit import (
    START,
    Clock,
    Fixed,
    Parking,
    XComTI,
    batches_in,
    log_text,
    rebuild,
    run_to_end,
    scripted_clock,
    waits_on,
)

pytestmark = pytest.mark.integration

ERRORS = {"failed": BatchFailedError, "expired": BatchExpiredError, "cancelled": BatchCancelledError}


def _sensor(**kwargs: Any) -> BatchSensor:
    kwargs.setdefault("task_id", "wait")
    return BatchSensor(**kwargs)


def _summary(batch_id: str, status: str = "completed", total: int = 10, failed: int = 0) -> dict[str, Any]:
    counts = {"total": total, "completed": total - failed, "failed": failed}
    return {"batch_id": batch_id, "status": status, "request_counts": counts}


def _event(*summaries: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": "terminal",
        "batch_id": summaries[0]["batch_id"],
        "batch": summaries[0],
        "batches": list(summaries),
        "message": "",
        "polls": 1,
    }


# -- the shape of the list: one, duplicates, empty --------------------------------------------------------


def test_a_list_of_one_id_behaves_as_the_bare_id(emulator, connect, make_batch, monkeypatch):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    clock = waits_on(Clock(), waiting, monkeypatch)
    conn = connect("zhipu")

    deferred = []
    for given in (batch_id, [batch_id]):
        with pytest.raises(TaskDeferred) as info:
            _sensor(batch_id=given, conn_id=conn, deferrable=True, timeout=600).execute({"ti": XComTI()})
        deferred.append(info.value.trigger.serialize())
    assert deferred[0] == deferred[1]
    assert deferred[0][1]["batch_id"] == batch_id
    assert "batch_ids" not in deferred[0][1]
    assert deferred[0][1]["deadline"] == clock.now + 600
    assert BatchTrigger("c", batch_ids=[batch_id]).serialize() == BatchTrigger("c", batch_id).serialize()

    # The sensor's result and XCom keys are the same for a bare id and a list of one.
    summary = _summary(batch_id)
    event = {"event": "terminal", "batch_id": batch_id, "batch": summary, "message": "", "polls": 1}
    results, pushed = [], []
    for given in (batch_id, [batch_id]):
        ti = XComTI()
        results.append(_sensor(batch_id=given, conn_id=conn).execute_complete({"ti": ti}, event))
        pushed.append(ti.xcoms)
    assert results[0] == results[1] == summary
    assert pushed[0] == pushed[1] == {"batch_summary": summary}


@pytest.mark.parametrize("ids", [["b1", "b1"], ["b1", "b2", "b1"], ["b1", " b1 "]])
def test_duplicate_ids_are_refused_by_sensor_trigger_and_fetch(ids):
    ti = XComTI()
    with pytest.raises(InvalidInputError, match="more than once"):
        _sensor(batch_id=ids).execute({"ti": ti})
    assert ti.xcoms == {}
    with pytest.raises(InvalidInputError):
        BatchTrigger("c", batch_ids=ids)
    with pytest.raises(InvalidInputError, match="more than once"):
        FetchBatchResultsOperator(task_id="fetch", batch_id=ids).execute(make_context(FakeTI()))


@pytest.mark.parametrize("empty", [[], ()])
def test_an_empty_list_is_refused_by_sensor_trigger_and_fetch(empty):
    ti = XComTI()
    with pytest.raises(InvalidInputError, match="batch_id"):
        _sensor(batch_id=empty).execute({"ti": ti})
    assert ti.xcoms == {}
    with pytest.raises(InvalidInputError, match="batch_id"):
        BatchTrigger("c", batch_ids=empty)
    with pytest.raises(InvalidInputError, match="batch_id"):
        FetchBatchResultsOperator(task_id="fetch", batch_id=empty).execute(make_context(FakeTI()))


# -- the schedule: each part as if waited for alone -----------------------------------------------------


class VirtualTime:
    """A clock for concurrent sleepers: time jumps to the earliest wake-up, one sleeper woken at a time."""

    def __init__(self, start: float = START) -> None:
        self.now = start
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._heap, (self.now + max(seconds, 0.0), self._seq, future))
        await future

    async def run(self, trigger: BatchTrigger) -> list[dict[str, Any]]:
        task = asyncio.ensure_future(run_to_end(trigger))
        while True:
            for _ in range(40):
                await asyncio.sleep(0)
            if task.done():
                return task.result()
            while self._heap and self._heap[0][2].done():
                heapq.heappop(self._heap)
            assert self._heap, "the trigger blocks on something other than its sleep"
            wake, _, future = heapq.heappop(self._heap)
            self.now = max(self.now, wake)
            future.set_result(None)


class TimedHook:
    """A vendor whose batches progress linearly and end at given times; records each poll's time."""

    def __init__(self, vt: VirtualTime, ends: dict[str, tuple[float, int, int]]) -> None:
        self.vt = vt
        self.ends = ends  # batch id -> (end offset from START, total, failed)
        self.polls: list[tuple[str, float]] = []

    async def aslots(self) -> Any:
        @asynccontextmanager
        async def slot() -> Any:
            yield

        return slot()

    async def aget_batch(self, batch_id: str, *, retry: bool = True) -> Batch:
        assert retry is False
        now = self.vt.now
        self.polls.append((batch_id, now))
        end, total, failed = self.ends[batch_id]
        if now >= START + end:
            status, done_ok, done_bad = "completed", total - failed, failed
        else:
            share = (now - START) / end
            status, done_ok, done_bad = "in_progress", int((total - failed) * share), int(failed * share)
        counts = {"total": total, "completed": done_ok, "failed": done_bad}
        return Batch.model_validate({"id": batch_id, "status": status, "request_counts": counts})

    async def acancel_batch(self, batch_id: str) -> Batch:  # pragma: no cover - never reached
        raise AssertionError("nothing should be cancelled")

    async def aclose(self) -> None:
        pass

    def times(self, batch_id: str) -> list[float]:
        return [t for b, t in self.polls if b == batch_id]


async def _timed(monkeypatch, ends, **trigger_kwargs) -> tuple[list[dict[str, Any]], TimedHook, VirtualTime]:
    vt = VirtualTime()
    monkeypatch.setattr(trigger_module, "clock", vt.clock)
    monkeypatch.setattr(trigger_module, "sleep", vt.sleep)
    hook = TimedHook(vt, ends)
    trigger = BatchTrigger("c", poll_interval=30, max_poll_interval=300, **trigger_kwargs)
    trigger._hook = hook  # type: ignore[assignment]
    events = await vt.run(trigger)
    return events, hook, vt


ORDERS = {
    "first-ends-first": {"p1": (120, 10, 1), "p2": (2_000, 20, 2), "p3": (9_000, 30, 3)},
    "last-ends-first": {"p1": (9_000, 10, 1), "p2": (2_000, 20, 2), "p3": (120, 30, 3)},
    "middle-ends-last": {"p1": (2_000, 10, 1), "p2": (9_000, 20, 2), "p3": (120, 30, 3)},
    "ended-before": {"p1": (0, 10, 1), "p2": (9_000, 20, 2), "p3": (0, 30, 3)},
}


@pytest.mark.asyncio
@pytest.mark.parametrize("order", list(ORDERS))
async def test_each_part_is_polled_exactly_as_if_waited_for_alone(monkeypatch, trigger_logs, order):
    monkeypatch.setattr(polling, "random", Fixed(0.5))  # no jitter: schedules comparable poll for poll
    ends = ORDERS[order]
    ids = list(ends)

    [event], group, group_time = await _timed(monkeypatch, ends, batch_ids=ids)

    alone = {}
    for batch_id in ids:
        [solo], hook, _ = await _timed(monkeypatch, ends, batch_id=batch_id)
        assert solo["event"] == "terminal"
        alone[batch_id] = hook.times(batch_id)
    for batch_id in ids:
        # The same polls at the same moments: never more often than the one-batch schedule.
        assert group.times(batch_id) == alone[batch_id], batch_id
    assert event["event"] == "terminal"
    assert [b["batch_id"] for b in event["batches"]] == ids  # input order, whatever the order of ending
    assert [b["status"] for b in event["batches"]] == ["completed"] * 3
    assert event["polls"] == len(group.polls)
    # One event, once the last part's end was seen, not before.
    assert group_time.now == max(times[-1] for times in alone.values())
    # The progress line sums the parts.
    logged = log_text(trigger_logs, "info")
    assert "3 of 3 batches ended; 54 completed, 6 failed of 60 requests" in logged


# -- a bad part among several ------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("status", list(ERRORS))
@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("bad_ends", ["first", "last"])
async def test_a_bad_part_among_several_fails_the_whole_naming_it(
    emulator, connect, make_batch, monkeypatch, status, index, bad_ends
):
    ids = batches_in(emulator, make_batch, "moonshot")
    good = [i for n, i in enumerate(ids) if n != index]
    when = {"first": (100, 500, 900), "last": (900, 100, 500)}[bad_ends]
    plan = [(when[0], ids[index], status), (when[1], good[0], "completed"), (when[2], good[1], "completed")]
    clock = waits_on(scripted_clock(emulator, "moonshot", plan), trigger_module, monkeypatch)

    [event] = await run_to_end(BatchTrigger(connect("moonshot"), batch_ids=ids, poll_interval=30))

    assert event["event"] == "terminal"
    assert clock.now >= START + max(when)  # the bad part does not cut the wait short
    assert [b["status"] for b in event["batches"]] == [
        status if n == index else "completed" for n in range(3)
    ]
    named = rf"part {index + 1} of 3: batch {ids[index]} is {status}"
    with pytest.raises(ERRORS[status], match=named) as info:
        _sensor(batch_id=ids, conn_id="c").execute_complete({"ti": XComTI()}, event)
    assert info.value.batch_id == ids[index]


@pytest.mark.parametrize(
    ("statuses", "resubmitting", "error", "named"),
    [
        (["completed", "expired", "failed"], False, BatchExpiredError, 2),
        (["completed", "expired", "failed"], True, BatchFailedError, 3),
        (["cancelled", "completed", "expired"], True, None, None),
        (["cancelled", "completed", "expired"], False, BatchCancelledError, 1),
        (["completed", "completed", "cancelled"], True, None, None),
    ],
)
def test_resubmission_covers_only_unrun_parts(statuses, resubmitting, error, named):
    summaries = [_summary(f"b{n + 1}", s) for n, s in enumerate(statuses)]
    s = _sensor(batch_id=[x["batch_id"] for x in summaries], expect_resubmission=resubmitting)
    if error is None:
        assert s.execute_complete({"ti": XComTI()}, _event(*summaries))["batches"] == summaries
        return
    with pytest.raises(error, match=rf"part {named} of 3: batch b{named} is {statuses[named - 1]}") as info:
        s.execute_complete({"ti": XComTI()}, _event(*summaries))
    assert info.value.batch_id == f"b{named}"


# -- max_failed_fraction over the total of all parts -------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "fraction", "passes"),
    [
        # one small part 100% failed, the total (1 of 101) under 5%
        ([(1, 1), (50, 0), (50, 0)], 0.05, True),
        # the same failures, a threshold under the total share
        ([(1, 1), (50, 0), (50, 0)], 0.009, False),
        # every part over the threshold alone... is impossible; the reverse: each part alone within 12%,
        # except one, and the total over it
        ([(10, 1), (10, 2), (10, 1)], 0.12, False),
        # the one bad part alone at 20%, the total at 4/40 = 10%
        ([(10, 0), (10, 2), (10, 1), (10, 1)], 0.10, True),
        # exactly at the threshold is allowed
        ([(4, 1), (4, 0)], 0.125, True),
    ],
)
def test_the_failed_fraction_is_over_the_total_of_every_part(parts, fraction, passes):
    summaries = [_summary(f"b{n + 1}", total=t, failed=f) for n, (t, f) in enumerate(parts)]
    s = _sensor(batch_id=[x["batch_id"] for x in summaries], max_failed_fraction=fraction)
    failed, total = sum(f for _, f in parts), sum(t for t, _ in parts)
    if passes:
        assert s.execute_complete({"ti": XComTI()}, _event(*summaries))["batch_ids"] == [
            x["batch_id"] for x in summaries
        ]
    else:
        with pytest.raises(
            TooManyFailedRequestsError, match=rf"{len(parts)} batches: {failed} failed of {total} requests"
        ):
            s.execute_complete({"ti": XComTI()}, _event(*summaries))


def _upload_batch(conn_id: str, tmp_path: Path, vendor: str, ids: list[str]) -> str:
    path = write_requests(tmp_path / f"{ids[0]}-{len(ids)}.jsonl", REGISTRY[vendor], ids)
    with BatchHook(conn_id) as hook:
        return hook.create_batch(input_file_id=hook.upload_file(str(path)).id).id


@pytest.mark.asyncio
@pytest.mark.parametrize(("fraction", "passes"), [(0.05, True), (0.04, False)])
async def test_a_fully_failed_part_is_judged_within_the_whole_end_to_end(
    emulator, connect, tmp_path, monkeypatch, fraction, passes
):
    conn = connect("openai")
    ids = [
        _upload_batch(conn, tmp_path, "openai", ["fail-0"]),  # 100% failed
        _upload_batch(conn, tmp_path, "openai", [f"ok-{i}" for i in range(20)]),
    ]
    for batch_id in ids:
        emulator.force_status("openai", batch_id, "in_progress")
    plan = [(100, ids[1], "completed"), (400, ids[0], "completed")]
    clock = scripted_clock(emulator, "openai", plan)
    waits_on(clock, waiting, monkeypatch)
    waits_on(clock, trigger_module, monkeypatch)
    s = _sensor(batch_id=ids, conn_id=conn, deferrable=True, max_failed_fraction=fraction)
    context = {"ti": XComTI()}
    with pytest.raises(TaskDeferred) as info:
        s.execute(context)

    [event] = await run_to_end(info.value.trigger)

    assert [b["request_counts"]["failed"] for b in event["batches"]] == [1, 0]
    if passes:
        assert s.execute_complete(context, event)["batch_ids"] == ids
    else:
        with pytest.raises(TooManyFailedRequestsError, match="2 batches: 1 failed of 21 requests"):
            s.execute_complete(context, event)
    assert context["ti"].xcoms["batch_summaries"] == event["batches"]


# -- serialized, without secrets, no sync I/O, no downloads ----------------------------------------------


@pytest.mark.asyncio
async def test_a_parts_trigger_round_trips_and_carries_no_secret(
    emulator, connect, make_batch, monkeypatch, loop_guard
):
    ids = batches_in(emulator, make_batch, "dashscope")
    conn = connect("dashscope", workspace="ws-1")
    clock = Clock()
    waits_on(clock, waiting, monkeypatch)
    waits_on(clock, trigger_module, monkeypatch)
    with pytest.raises(TaskDeferred) as info:
        _sensor(batch_id=tuple(ids), conn_id=conn, deferrable=True, timeout=900).execute({"ti": XComTI()})
    for batch_id in ids:  # they end while deferred (the emulator's own file writes kept off the loop)
        emulator.force_status("dashscope", batch_id, "completed")
    classpath, kwargs = info.value.trigger.serialize()

    assert classpath == CLASSPATH
    assert (kwargs["batch_id"], kwargs["batch_ids"]) == (None, ids)
    assert emulator.api_key not in json.dumps(kwargs)
    from airflow.serialization.serialized_objects import BaseSerialization

    restored = BaseSerialization.deserialize(BaseSerialization.serialize(kwargs))
    assert BatchTrigger(**restored).serialize() == (classpath, kwargs)
    rebuilt = rebuild(info.value.trigger)
    assert rebuilt.serialize() == (classpath, kwargs)

    downloads = emulator.stats("dashscope")["downloads"]
    with loop_guard.watch():
        [event] = await run_to_end(rebuilt)

    assert event["event"] == "terminal"
    assert json.loads(json.dumps(event)) == event
    assert emulator.api_key not in json.dumps(event)
    assert emulator.stats("dashscope")["downloads"] == downloads  # the trigger never downloads results


@pytest.mark.asyncio
async def test_an_auth_failure_event_of_parts_carries_no_secret(emulator, connect, make_batch, fake_time):
    ids = batches_in(emulator, make_batch, "zhipu", count=2)
    secret = "sk-fanin-SECRET-0123456789abcdef"
    [event] = await run_to_end(BatchTrigger(connect("zhipu", "bad_key", key=secret), batch_ids=ids))
    assert event["event"] == "error"
    assert secret not in json.dumps(event)
    assert secret[-8:] not in json.dumps(event)


# -- a triggerer restart: the sensor's trigger rebuilt from its row -------------------------------------


async def _stop_midway(trigger: BatchTrigger, clock: Clock, monkeypatch, polls: int) -> None:
    """Run the trigger until it has polled ``polls`` times, then stop it as a stopping triggerer does."""
    parking = Parking(clock, polls)
    monkeypatch.setattr(trigger_module, "sleep", parking.sleep)
    task = asyncio.ensure_future(run_to_end(trigger))
    await asyncio.wait_for(parking.parked.wait(), timeout=60)
    for _ in range(20):
        await asyncio.sleep(0.01)  # the other parts park too, or are mid-poll
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    monkeypatch.setattr(trigger_module, "sleep", clock.asleep)


@pytest.mark.asyncio
async def test_after_a_triggerer_restart_the_deadline_is_the_sensors(
    emulator, connect, make_batch, monkeypatch
):
    ids = batches_in(emulator, make_batch, "moonshot")
    emulator.force_status("moonshot", ids[1], "completed")
    clock = Clock()
    waits_on(clock, waiting, monkeypatch)
    waits_on(clock, trigger_module, monkeypatch)
    s = _sensor(batch_id=ids, conn_id=connect("moonshot"), deferrable=True, timeout=3600, poll_interval=30)
    context = {"ti": XComTI()}
    with pytest.raises(TaskDeferred) as info:
        s.execute(context)
    trigger = info.value.trigger
    assert trigger.deadline == START + 3600

    await _stop_midway(trigger, clock, monkeypatch, polls=6)
    assert emulator.stats("moonshot")["cancels"] == 0  # a stopping triggerer cancels nothing
    assert clock.now < trigger.deadline
    restarted_at = clock.now

    rebuilt = rebuild(trigger)
    assert rebuilt.deadline == trigger.deadline  # not restarted_at + timeout
    [event] = await run_to_end(rebuilt)

    assert restarted_at < trigger.deadline <= clock.now
    assert event["event"] == "timeout"
    assert [emulator.batch("moonshot", i)["status"] for i in ids] == ["cancelling", "completed", "cancelling"]
    assert ids[0] in event["message"]
    assert ids[2] in event["message"]
    assert ids[1] not in event["message"]
    with pytest.raises(BatchTimeoutError, match=f"Batch {ids[0]} did not finish before the deadline"):
        s.execute_complete(context, event)


@pytest.mark.asyncio
async def test_after_a_triggerer_restart_parts_that_ended_meanwhile_are_judged(
    emulator, connect, make_batch, monkeypatch
):
    ids = batches_in(emulator, make_batch, "zhipu")
    clock = Clock()
    waits_on(clock, waiting, monkeypatch)
    waits_on(clock, trigger_module, monkeypatch)
    s = _sensor(batch_id=ids, conn_id=connect("zhipu"), deferrable=True, timeout=7200, poll_interval=30)
    context = {"ti": XComTI()}
    with pytest.raises(TaskDeferred) as info:
        s.execute(context)

    await _stop_midway(info.value.trigger, clock, monkeypatch, polls=4)
    # While the triggerer is down, the parts end (one of them badly).
    emulator.force_status("zhipu", ids[0], "completed")
    emulator.force_status("zhipu", ids[1], "cancelled")
    emulator.force_status("zhipu", ids[2], "completed")

    [event] = await run_to_end(rebuild(info.value.trigger))

    assert event["event"] == "terminal"
    assert [b["status"] for b in event["batches"]] == ["completed", "cancelled", "completed"]
    with pytest.raises(BatchCancelledError, match=rf"part 2 of 3: batch {ids[1]} is cancelled"):
        s.execute_complete(context, event)
    left = _sensor(batch_id=ids, conn_id="c", expect_resubmission=True)
    assert [b["batch_id"] for b in left.execute_complete(context, event)["batches"]] == ids


# -- results merged over parts and rounds -------------------------------------------------------------------

FETCH_CONN = "fanin_fetch"


@pytest.fixture(scope="module")
def slow_server() -> Iterator[Emulator]:
    """An emulator whose batches stay put until a test moves them."""
    with Emulator(EmulatorConfig(time_scale=100.0)) as server:
        yield server


@pytest.fixture
def slow(slow_server: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Emulator:
    from airflow.sdk.bases.operator import ExecutorSafeguard

    slow_server.reset()
    for key, value in slow_server.airflow_conn_env("openai", FETCH_CONN).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow-home"))
    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)
    return slow_server


def _job(tmp_path: Path, parts: list[list[str]]) -> tuple[list[str], Path]:
    """Create one openai batch per part; return their ids and the job's whole request file."""
    spec = REGISTRY["openai"]
    whole = write_requests(tmp_path / "requests.jsonl", spec, [i for p in parts for i in p])
    ids = []
    with BatchHook(FETCH_CONN) as hook:
        for n, part in enumerate(parts):
            path = write_requests(tmp_path / f"part-{n}.jsonl", spec, part)
            ids.append(hook.create_batch(input_file_id=hook.upload_file(str(path)).id).id)
    return ids, whole


Edit = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def _tamper(monkeypatch: pytest.MonkeyPatch, edits: dict[str, Edit | None]) -> None:
    """Change what a downloaded output or error file holds (None: the vendor gave no such file)."""
    real = results_op.download

    def download(hook: Any, file_id: str | None, path: Path, log: Any) -> Path | None:
        if file_id in edits and edits[file_id] is None:
            return None
        got = real(hook, file_id, path, log)
        edit = edits.get(file_id) if file_id else None
        if got is not None and edit is not None:
            lines = [json.loads(line) for line in got.read_text().splitlines() if line.strip()]
            got.write_text("".join(json.dumps(line) + "\n" for line in edit(lines)))
        return got

    monkeypatch.setattr(results_op, "download", download)


def _fetch(ids: list[str], tmp_path: Path, input_file: Path | None, **kwargs: Any) -> dict[str, Any]:
    op = FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=FETCH_CONN,
        batch_id=ids,
        input_file=None if input_file is None else str(input_file),
        destination=str(tmp_path / "results.jsonl"),
        deferrable=False,
        **kwargs,
    )
    return op.execute(make_context(FakeTI(task_id="fetch")))


def _rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    text = Path(manifest["result_uri"].removeprefix("file://")).read_text()
    return [json.loads(line) for line in text.splitlines()]


def _content(row: dict[str, Any]) -> str:
    return row["response"]["choices"][0]["message"]["content"]


def _assert_reconciled(manifest: dict[str, Any], requests: int) -> None:
    counts = manifest["counts"]
    assert counts["total"] == requests
    assert sum(v for k, v in counts.items() if k != "total") == requests
    assert sum(p["request_counts"]["total"] for p in manifest["parts"]) == requests


def test_merged_fetch_shuffled_lines_an_error_only_part_and_a_part_without_files(slow, tmp_path, monkeypatch):
    parts = [[f"a{i}" for i in range(5)], [f"fail-b{i}" for i in range(3)], [f"c{i}" for i in range(4)]]
    ids, whole = _job(tmp_path, parts)
    slow.force_status("openai", ids[0], "completed")
    slow.force_status("openai", ids[1], "completed")  # every request failed: only an error file
    slow.force_status("openai", ids[2], "expired")  # nothing ran
    batches = [slow.batch("openai", i) for i in ids]
    assert (bool(batches[0]["output_file_id"]), bool(batches[0]["error_file_id"])) == (True, False)
    assert (bool(batches[1]["output_file_id"]), bool(batches[1]["error_file_id"])) == (False, True)
    _tamper(
        monkeypatch,
        {
            batches[0]["output_file_id"]: lambda lines: lines[::-1],  # shuffled
            batches[2]["error_file_id"]: None,  # a vendor that writes neither file for it
        },
    )

    manifest = _fetch(ids, tmp_path, whole)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == [i for p in parts for i in p]
    assert [r["status"] for r in rows] == ["succeeded"] * 5 + ["failed"] * 3 + ["expired"] * 4
    assert all(f"say {r['custom_id']}" in _content(r) for r in rows[:5])  # each row its own line
    assert {r["attempts"] for r in rows} == {1}
    assert manifest["counts"] == {
        "succeeded": 5,
        "failed": 3,
        "expired": 4,
        "cancelled": 0,
        "missing": 0,
        "total": 12,
    }
    assert [p["batch_id"] for p in manifest["parts"]] == ids == manifest["batch_ids"]
    assert [p["status"] for p in manifest["parts"]] == ["completed", "completed", "expired"]
    assert manifest["rounds"] == []
    assert not any(manifest["anomalies"].values())
    _assert_reconciled(manifest, 12)


@pytest.mark.parametrize("where", ["stray-in-an-earlier-part", "stray-in-a-later-part"])
def test_a_stray_line_in_another_parts_file_never_replaces_the_owners_line(
    slow, tmp_path, monkeypatch, where
):
    parts = [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    ids, whole = _job(tmp_path, parts)
    for batch_id in ids:
        slow.force_status("openai", batch_id, "completed")
    outputs = [slow.batch("openai", i)["output_file_id"] for i in ids]
    # The stray line: in one part's output file, for a request of the other part, with another answer.
    host, victim = (0, "b1") if where == "stray-in-an-earlier-part" else (1, "a1")

    def add_stray(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        stray = json.loads(json.dumps(lines[0]))
        stray["custom_id"] = victim
        stray["response"]["body"]["choices"][0]["message"]["content"] = "STRAY"
        return [lines[0], stray, *lines[1:]]

    _tamper(monkeypatch, {outputs[host]: add_stray})

    manifest = _fetch(ids, tmp_path, whole)

    rows = {r["custom_id"]: r for r in _rows(manifest)}
    assert list(rows) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert f"say {victim}" in _content(rows[victim])  # the line of the part that ran it
    assert "STRAY" not in json.dumps(list(rows.values()))
    assert sum(manifest["anomalies"].values()) >= 1  # counted, never silent
    assert manifest["counts"]["succeeded"] == 6
    _assert_reconciled(manifest, 6)


def test_duplicate_lines_in_parts_keep_one_row_each_and_are_counted(slow, tmp_path, monkeypatch):
    parts = [["a0", "a1", "a2"], ["b0", "b1"]]
    ids, whole = _job(tmp_path, parts)
    for batch_id in ids:
        slow.force_status("openai", batch_id, "completed")
    outputs = [slow.batch("openai", i)["output_file_id"] for i in ids]

    def twice(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [*lines, *lines]

    _tamper(monkeypatch, {outputs[0]: twice, outputs[1]: twice})

    manifest = _fetch(ids, tmp_path, whole)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == ["a0", "a1", "a2", "b0", "b1"]
    assert manifest["anomalies"]["duplicates"] == 5
    assert manifest["counts"]["succeeded"] == 5
    _assert_reconciled(manifest, 5)


def test_merged_fetch_without_input_file_lands_a_row_for_every_part(slow, tmp_path):
    # OpenAI serves request files: the default input is downloaded from the vendor.
    parts = [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0", "c1"]]
    ids, _ = _job(tmp_path, parts)
    for batch_id in ids:
        slow.force_status("openai", batch_id, "completed")

    manifest = _fetch(ids, tmp_path, None)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == [i for p in parts for i in p]
    assert manifest["counts"]["succeeded"] == 8
    assert manifest["anomalies"]["unknown_ids"] == 0
    _assert_reconciled(manifest, 8)


@pytest.mark.parametrize("variant", ["failed-part-reports-total-0", "expired-part-reports-null-counts"])
def test_rows_without_a_line_take_their_own_parts_end(slow, tmp_path, monkeypatch, variant):
    parts = [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0", "c1", "c2"]]
    ids, whole = _job(tmp_path, parts)
    if variant == "failed-part-reports-total-0":
        # OpenAI reports 0 of 0 for a batch that failed validation; the part after it never ran.
        statuses = ["completed", "failed", "expired"]
        patched, counts = ids[1], RequestCounts(total=0, completed=0, failed=0)
        expected = ["succeeded"] * 3 + ["missing"] * 3 + ["expired"] * 3
    else:
        # Counts unknown (README: null is never zero) on an expired part, followed by a failed part.
        statuses = ["expired", "completed", "failed"]
        patched, counts = ids[0], RequestCounts(total=None, completed=None, failed=None)
        expected = ["expired"] * 3 + ["succeeded"] * 3 + ["missing"] * 3
    for batch_id, status in zip(ids, statuses, strict=True):
        slow.force_status("openai", batch_id, status)
    # Neither file for the expired part: its rows can only come from the part's own end.
    expired = ids[statuses.index("expired")]
    _tamper(monkeypatch, {slow.batch("openai", expired)["error_file_id"]: None})
    real = BatchHook.get_batch

    def get_batch(self: BatchHook, batch_id: str, **kwargs: Any) -> Batch:
        batch = real(self, batch_id, **kwargs)
        return batch.model_copy(update={"request_counts": counts}) if batch_id == patched else batch

    monkeypatch.setattr(BatchHook, "get_batch", get_batch)

    if variant == "failed-part-reports-total-0":
        manifest = _fetch(ids, tmp_path, whole)
        assert manifest["counts"]["total"] == 9
    else:
        # Unknown counts: the fetch judges the landed rows after landing them (README), and fails.
        with pytest.raises(BatchOutcomeError):
            _fetch(ids, tmp_path, whole)
    landed = tmp_path / "results.jsonl"
    rows = [json.loads(line) for line in landed.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [i for p in parts for i in p]
    assert [r["status"] for r in rows] == expected


@pytest.fixture
def moving(slow: Emulator, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The worker's waits move the slow emulator's clock instead of sleeping."""
    return waits_on(Clock(on_sleep=slow.advance_clock), waiting, monkeypatch)


def test_a_round_over_parts_replaces_failed_rows_and_the_manifest_adds_up(slow, moving, tmp_path):
    parts = [["a0", "retry-a1", "a2", "fail-a3"], ["b0", "b1", "b2"]]
    ids, whole = _job(tmp_path, parts)
    slow.force_status("openai", ids[0], "completed")
    slow.force_status("openai", ids[1], "expired")  # nothing ran: left to the round

    manifest = _fetch(ids, tmp_path, whole, resubmit_failed=1, poll_interval=60)

    rows = {r["custom_id"]: r for r in _rows(manifest)}
    assert list(rows) == [i for p in parts for i in p]  # input order, one row per request
    resent = {"retry-a1", "b0", "b1", "b2"}
    assert {i: r["attempts"] for i, r in rows.items()} == {i: 2 if i in resent else 1 for i in rows}
    assert {i: r["status"] for i, r in rows.items()} == {
        i: "failed" if i == "fail-a3" else "succeeded" for i in rows
    }
    assert [p["batch_id"] for p in manifest["parts"]] == ids
    assert [p["request_counts"]["total"] for p in manifest["parts"]] == [4, 3]
    [round_] = manifest["rounds"]
    assert round_["round"] == 1
    [round_batch] = round_["batches"]
    assert round_batch["batch_id"] not in ids
    assert round_batch["request_counts"]["total"] == len(resent)
    assert manifest["counts"] == {
        "succeeded": 6,
        "failed": 1,
        "expired": 0,
        "cancelled": 0,
        "missing": 0,
        "total": 7,
    }
    assert manifest["anomalies"]["duplicates"] == 0  # a round's line replaces, it does not duplicate
    _assert_reconciled(manifest, 7)


def test_an_error_event_of_parts_fails_with_the_failing_part_named():
    # 1 of 100 failed is within 1%, whichever part holds the failure (here one that failed entirely).
    judge_parts([_summary("b1", total=1, failed=1), _summary("b2", total=99)], max_failed_fraction=0.01)
    event = {
        "event": "error",
        "batch_id": "b1",
        "batch": None,
        "batches": [None, None],
        "message": "Polling batch b2 failed: NotFoundError: no such batch",
        "polls": 2,
    }
    with pytest.raises(VendorAPIError, match="Polling batch b2 failed"):
        _sensor(batch_id=["b1", "b2"], conn_id="c").execute_complete({"ti": XComTI()}, event)


@pytest.mark.parametrize("given_input", [True, False])
def test_a_round_is_made_from_the_request_files_the_vendor_serves(slow, moving, tmp_path, given_input):
    # Without input_file every part's request file is downloaded, joined, and read again for the round.
    parts = [["a0", "retry-a1"], ["retry-b0", "b1", "b2"]]
    ids, whole = _job(tmp_path, parts)
    for batch_id in ids:
        slow.force_status("openai", batch_id, "completed")

    manifest = _fetch(ids, tmp_path, whole if given_input else None, resubmit_failed=1, poll_interval=60)

    rows = {r["custom_id"]: r for r in _rows(manifest)}
    assert list(rows) == [i for p in parts for i in p]
    assert {i: r["attempts"] for i, r in rows.items()} == {i: 1 + i.startswith("retry-") for i in rows}
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    [round_] = manifest["rounds"]
    [round_batch] = round_["batches"]
    assert round_batch["request_counts"]["total"] == 2
    _assert_reconciled(manifest, 5)
