"""
Restarts: the triggerer dies mid-wait, the worker dies after the create, the worker dies mid-download.

Each scenario runs the interrupted path, then the restarted one, and compares the outcome with an
uninterrupted run: the same trigger event, exactly one batch and one uploaded file, and a results file
byte-identical to a clean run's (never a partial file at the final URI).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from relkit import VENDORS, sha256, write_request_file

from airflow_provider_llmbatch import results_index
from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.exceptions import VendorAPIError
from airflow_provider_llmbatch.hooks import base as hook_base
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.hooks._io import MultipartLayout
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import FakeStateStore, FakeTI, make_context
from tests.pollkit import Clock, Parking, rebuild, run_to_end, waits_on

pytestmark = pytest.mark.integration

OUTCOMES = ["completed", "failed", "expired", "cancelled"]


def _quick_policy(**kwargs: Any) -> RetryPolicy:
    return RetryPolicy(**{"base_delay": 0.001, "max_delay": 0.004, **kwargs})


CONN_ID = "llmbatch_rel"


@pytest.fixture(autouse=True)
def _operators_run_outside_task_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.bases.operator import ExecutorSafeguard

    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)


@pytest.fixture
def connect(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Point ``llmbatch_rel`` at the emulator for a vendor, with tiny retry waits."""

    def _connect(vendor: str, **extra: Any) -> str:
        value = json.loads(emulator.airflow_conn_env(vendor, CONN_ID)[f"AIRFLOW_CONN_{CONN_ID.upper()}"])
        value["extra"] = {"max_retries": 2, **extra}
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(value))
        # Operators build their own hooks: keep those hooks' backoff in milliseconds too.
        monkeypatch.setattr(hook_base, "RetryPolicy", _quick_policy)
        return CONN_ID

    return _connect


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The triggers' clock, moving only when they sleep: waits cost nothing and nothing is timed."""
    return waits_on(Clock(), trigger_module, monkeypatch)


def _batch(vendor: str, tmp_path: Path, n: int = 6, metadata: dict[str, str] | None = None) -> str:
    source = write_request_file(tmp_path / f"{vendor}-setup.jsonl", REGISTRY[vendor], n, failing=1)
    with BatchHook(CONN_ID) as hook:
        uploaded = hook.upload_file(source)
        return hook.create_batch(input_file_id=uploaded.id, metadata=metadata).id


def _stable(event: dict[str, Any]) -> dict[str, Any]:
    """Return an event without what differs between two runs that saw the same batch (poll counts)."""
    return {k: v for k, v in event.items() if k != "polls"}


# -- the triggerer dies mid-wait --------------------------------------------------------------------


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_triggerer_dies_mid_wait_and_the_rebuilt_trigger_ends_the_same(
    vendor: str,
    outcome: str,
    emulator: Emulator,
    connect: Callable[..., str],
    fake_time: Clock,
    tmp_path: Path,
) -> None:
    conn_id = connect(vendor)
    batch_id = _batch(vendor, tmp_path)
    emulator.force_status(vendor, batch_id, "in_progress")
    deadline = 4_000_000_000.0
    trigger = BatchTrigger(conn_id, batch_id, poll_interval=0.01, max_poll_interval=0.02, deadline=deadline)

    async def first_life() -> None:
        # Each life runs on its own event loop, as a new triggerer process would; this one ends after
        # its third poll.
        parking = Parking(fake_time, polls=3)
        trigger_module.sleep = parking.sleep
        try:
            task = asyncio.create_task(run_to_end(trigger))
            await parking.parked.wait()
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        finally:
            trigger_module.sleep = fake_time.asleep
        assert transport.shared_sessions() == {}

    asyncio.run(first_life())
    # A restart is not a kill: the batch runs on, untouched.
    assert emulator.stats(vendor)["operations"]["get_batch"] == 3
    assert emulator.batch(vendor, batch_id)["status"] == "in_progress"
    assert emulator.stats(vendor)["cancels"] == 0

    emulator.force_status(vendor, batch_id, outcome)
    rebuilt = rebuild(trigger)
    assert rebuilt.serialize() == trigger.serialize()
    events = asyncio.run(run_to_end(rebuilt))
    # The same batch read by a trigger that never died: the reference outcome.
    reference = asyncio.run(
        run_to_end(BatchTrigger(conn_id, batch_id, poll_interval=0.01, deadline=deadline))
    )

    assert len(events) == 1
    assert events[0]["event"] == "terminal"
    assert events[0]["batch"]["status"] == outcome
    assert _stable(events[0]) == _stable(reference[0])
    assert emulator.stats(vendor)["batches_created"] == 1


# -- the worker dies after the create, before (or during) its XCom pushes -----------------------------

KILL_POINTS = ["after_create_returned", "batch_id", "conn_type", "input_fingerprint", "input_file_id"]
"""Where the worker dies: right after the vendor created the batch, or while pushing one of the XComs."""


@pytest.mark.parametrize("store", ["state_store", "metadata_only"])
@pytest.mark.parametrize("kill_at", KILL_POINTS)
@pytest.mark.parametrize("vendor", VENDORS)
def test_worker_dies_after_create_and_the_retry_reattaches(
    vendor: str,
    kill_at: str,
    store: str,
    emulator: Emulator,
    connect: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    connect(vendor)
    source = write_request_file(tmp_path / "requests.jsonl", REGISTRY[vendor], 5, failing=1)
    state = FakeStateStore() if store == "state_store" else None
    dying = FakeTI(fail_on={kill_at} if kill_at != "after_create_returned" else None)
    real_create = BatchHook.create_batch
    if kill_at == "after_create_returned":

        def create_then_die(self: BatchHook, **kwargs: Any) -> Any:
            real_create(self, **kwargs)
            raise RuntimeError("worker died right after the create")

        monkeypatch.setattr(BatchHook, "create_batch", create_then_die)
    with pytest.raises(RuntimeError, match="worker died"):
        CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(source)).execute(
            make_context(dying, state)
        )
    monkeypatch.setattr(BatchHook, "create_batch", real_create)

    retry = FakeTI()
    result = CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(source)).execute(
        make_context(retry, state)
    )

    stats = emulator.stats(vendor)
    assert (stats["files_uploaded"], stats["batches_created"], stats["batches"]) == (1, 1, 1)
    [batch] = emulator.batches(vendor)
    assert result["batch_id"] == batch["id"] == retry.xcom("batch_id")
    assert result["input_file_id"] == batch["input_file_id"] == retry.xcom("input_file_id")
    # Every XCom is pushed once the batch exists: wherever the worker died, the retry re-attaches.
    assert result["reattached"] is True


def _stats_once_settled(emulator: Emulator, vendor: str, *, expect_upload: bool) -> dict[str, Any]:
    """
    Return the emulator's stats once an aborted upload has reached it.

    The server handles the request on its own thread; a client that aborted its body has gone on before
    the server counted the request, so wait (briefly) for the count instead of reading it at once.
    """
    deadline = time.monotonic() + 10
    while True:
        stats = emulator.stats(vendor)
        if not expect_upload or stats["operations"].get("upload") or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


@pytest.mark.parametrize("store", ["state_store", "metadata_only"])
@pytest.mark.parametrize("kill_at", ["mid_upload", "after_upload_returned"])
@pytest.mark.parametrize("vendor", ["zhipu", "openai"])
def test_worker_dies_around_the_upload_and_the_retry_pays_once(
    vendor: str,
    kill_at: str,
    store: str,
    emulator: Emulator,
    connect: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    connect(vendor)
    spec = REGISTRY[vendor]
    # About 1 KB a request, 3.5 MB in all: one part, sent in several chunks.
    source = write_request_file(tmp_path / "requests.jsonl", spec, 3500, padding=900)
    state = FakeStateStore() if store == "state_store" else None
    real_upload = BatchHook.upload_file
    real_body = MultipartLayout.body

    def body_then_die(self: MultipartLayout, handle: Any) -> Any:
        chunks = real_body(self, handle)
        yield next(chunks)  # the form fields
        yield next(chunks)  # the first chunk of the file: the request is under way
        raise RuntimeError("worker died mid-upload")

    def upload_then_die(self: BatchHook, *args: Any, **kwargs: Any) -> Any:
        real_upload(self, *args, **kwargs)
        raise RuntimeError("worker died right after the upload returned")

    if kill_at == "mid_upload":
        monkeypatch.setattr(MultipartLayout, "body", body_then_die)
    else:
        monkeypatch.setattr(BatchHook, "upload_file", upload_then_die)
    with pytest.raises(RuntimeError, match="worker died"):
        CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(source)).execute(
            make_context(FakeTI(), state)
        )
    monkeypatch.setattr(MultipartLayout, "body", real_body)
    monkeypatch.setattr(BatchHook, "upload_file", real_upload)
    died_with = _stats_once_settled(emulator, vendor, expect_upload=kill_at == "mid_upload")

    retry = FakeTI()
    result = CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(source)).execute(
        make_context(retry, state)
    )

    stats = emulator.stats(vendor)
    assert (stats["batches_created"], stats["batches"]) == (1, 1)
    [batch] = emulator.batches(vendor)
    assert result["batch_id"] == batch["id"]
    assert emulator.file_path(vendor, batch["input_file_id"]).read_bytes() == source.read_bytes()
    if kill_at == "mid_upload":
        # The worker died inside the upload's body, the file checked whole before it. The vendor stored
        # nothing; the retry's upload is the only file.
        assert died_with["operations"]["upload"] == 1
        assert (died_with["files_uploaded"], stats["files_uploaded"], stats["files"]) == (0, 1, 1)
    else:
        # Named by its key, the earlier upload is found and reused; with a task state store too, which
        # heard of the upload before it was sent, so the retry knows it is not a first try.
        assert stats["files_uploaded"] == 1


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from airflow.sdk.bases.operator import ExecutorSafeguard
    from airflow_provider_llmbatch.hooks.batch import BatchHook
    from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
    from tests.operators.conftest import FakeTI, make_context

    ExecutorSafeguard.test_mode = True
    real_create = BatchHook.create_batch

    def create_then_sigkill(self, **kwargs):
        batch = real_create(self, **kwargs)
        print("created", batch.id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    BatchHook.create_batch = create_then_sigkill
    CreateBatchOperator(task_id="create", conn_id={conn_id!r}, input_file={source!r}).execute(
        make_context(FakeTI())
    )
    print("survived", flush=True)
    """
)


@pytest.mark.parametrize("vendor", ["zhipu", "dashscope"])
def test_worker_sigkilled_right_after_create_then_retried(
    vendor: str, emulator: Emulator, connect: Callable[..., str], tmp_path: Path
) -> None:
    connect(vendor)
    source = write_request_file(tmp_path / "requests.jsonl", REGISTRY[vendor], 5)
    root = str(Path(__file__).resolve().parents[2])
    script = CHILD.format(root=root, conn_id=CONN_ID, source=str(source))
    child = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    created = [line.split()[1] for line in child.stdout.splitlines() if line.startswith("created ")]
    assert len(created) == 1, child.stdout
    assert "survived" not in child.stdout
    created_id = created[0]
    assert [b["id"] for b in emulator.batches(vendor)] == [created_id]

    retry = FakeTI()
    result = CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(source)).execute(
        make_context(retry)
    )

    assert result["reattached"] is True
    assert result["batch_id"] == created_id
    stats = emulator.stats(vendor)
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)


# -- the worker dies mid-download or mid-join --------------------------------------------------------


def _finished_batch(emulator: Emulator, vendor: str, tmp_path: Path) -> tuple[str, Path]:
    source = write_request_file(tmp_path / "requests.jsonl", REGISTRY[vendor], 300, failing=20)
    with BatchHook(CONN_ID) as hook:
        uploaded = hook.upload_file(source)
        batch_id = hook.create_batch(input_file_id=uploaded.id).id
    emulator.force_status(vendor, batch_id, "completed")
    return batch_id, source


def _fetch(batch_id: str, source: Path, destination: Path) -> dict[str, Any]:
    operator = FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=CONN_ID,
        batch_id=batch_id,
        input_file=str(source),
        destination=str(destination),
    )
    result: dict[str, Any] = operator.execute(make_context(FakeTI(task_id="fetch")))
    return result


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def clean_result(emulator: Emulator, connect: Callable[..., str], tmp_path: Path) -> Any:
    """Return ``(vendor, **conn extra) -> (batch_id, source, sha256 of a clean run's results)``."""

    def _make(vendor: str, **extra: Any) -> tuple[str, Path, str]:
        connect(vendor, **extra)
        batch_id, source = _finished_batch(emulator, vendor, tmp_path)
        clean = tmp_path / "clean" / "results.jsonl"
        _fetch(batch_id, source, clean)
        return batch_id, source, sha256(clean)

    return _make


DOWNLOAD_FAULTS = ["reset_mid_body", "stall_mid_body", "malformed", "reset_after"]


@pytest.mark.parametrize("kind", DOWNLOAD_FAULTS)
@pytest.mark.parametrize("vendor", VENDORS)
def test_download_dies_for_good_then_the_retry_lands_identical_results(
    vendor: str, kind: str, emulator: Emulator, clean_result: Any, tmp_path: Path
) -> None:
    extra = {"timeout": 0.2} if kind == "stall_mid_body" else {}
    batch_id, source, clean_sha = clean_result(vendor, **extra)
    out = tmp_path / "out"
    out.mkdir()
    destination = out / "results.jsonl"
    emulator.add_fault(
        FaultRule(kind, vendor=vendor, operation="download", times=None, delay=0.4)  # type: ignore[arg-type]
    )
    with pytest.raises(VendorAPIError, match=f"vendor={vendor}.*operation=download_file"):
        _fetch(batch_id, source, destination)
    assert not destination.exists()
    assert _leftovers(out) == []

    emulator.clear_faults()
    manifest = _fetch(batch_id, source, destination)
    assert sha256(destination) == clean_sha
    assert manifest["counts"]["total"] == 300
    assert _leftovers(out) == []


@pytest.mark.parametrize("kind", DOWNLOAD_FAULTS)
@pytest.mark.parametrize("vendor", VENDORS)
def test_download_fault_once_is_absorbed_with_identical_results(
    vendor: str, kind: str, emulator: Emulator, clean_result: Any, tmp_path: Path
) -> None:
    batch_id, source, clean_sha = clean_result(vendor)
    destination = tmp_path / "out" / "results.jsonl"
    downloads = emulator.stats(vendor)["operations"]["download"]
    emulator.add_fault(
        FaultRule(kind, vendor=vendor, operation="download", times=1, delay=0.05)  # type: ignore[arg-type]
    )
    _fetch(batch_id, source, destination)
    assert sha256(destination) == clean_sha
    # One broken answer costs exactly one more download.
    assert emulator.stats(vendor)["operations"]["download"] - downloads == 3


@pytest.mark.parametrize("rows_before_death", [0, 1, 150, 299])
def test_worker_dies_mid_join_leaves_no_partial_file(
    rows_before_death: int,
    emulator: Emulator,
    clean_result: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch_id, source, clean_sha = clean_result("openai")
    out = tmp_path / "out"
    destination = out / "results.jsonl"
    destination.parent.mkdir()
    destination.write_text("the results of an earlier run\n")
    real_row = results_index._row
    written = {"rows": 0}

    def row_then_die(*args: Any, **kwargs: Any) -> Any:
        if written["rows"] == rows_before_death:
            raise MemoryError("worker killed mid-join")
        written["rows"] += 1
        return real_row(*args, **kwargs)

    monkeypatch.setattr(results_index, "_row", row_then_die)
    with pytest.raises(MemoryError):
        _fetch(batch_id, source, destination)
    # What was at the final URI is untouched; no temporary is left beside it.
    assert destination.read_text() == "the results of an earlier run\n"
    assert _leftovers(out) == []

    monkeypatch.setattr(results_index, "_row", real_row)
    _fetch(batch_id, source, destination)
    assert sha256(destination) == clean_sha


FETCH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from airflow.sdk.bases.operator import ExecutorSafeguard
    from airflow_provider_llmbatch import results_index
    from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
    from tests.operators.conftest import FakeTI, make_context

    ExecutorSafeguard.test_mode = True
    if {die_in_join!r}:
        real_row, rows = results_index._row, [0]

        def row_then_sigkill(*args, **kwargs):
            rows[0] += 1
            if rows[0] > 150:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_row(*args, **kwargs)

        results_index._row = row_then_sigkill
    print("fetching", flush=True)
    FetchBatchResultsOperator(
        task_id="fetch", conn_id={conn_id!r}, batch_id={batch_id!r}, input_file={source!r},
        destination={destination!r},
    ).execute(make_context(FakeTI(task_id="fetch")))
    print("survived", flush=True)
    """
)


@pytest.mark.parametrize("where", ["download", "join"])
def test_worker_sigkilled_mid_fetch_then_retried(
    where: str, emulator: Emulator, clean_result: Any, tmp_path: Path
) -> None:
    batch_id, source, clean_sha = clean_result("openai")
    out = tmp_path / "out"
    out.mkdir()
    destination = out / "results.jsonl"
    if where == "download":
        # The output file's body stops half way and stays silent: the worker is killed in that download.
        emulator.add_fault(FaultRule("stall_mid_body", vendor="openai", operation="download", delay=60))
    downloads = emulator.stats("openai")["operations"]["download"]
    script = FETCH_CHILD.format(
        root=str(Path(__file__).resolve().parents[2]),
        die_in_join=where == "join",
        conn_id=CONN_ID,
        batch_id=batch_id,
        source=str(source),
        destination=str(destination),
    )
    # The worker's temporary directory is the test's, so what a hard kill leaves there is cleaned up.
    child_tmp = tmp_path / "worker-tmp"
    child_tmp.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, "TMPDIR": str(child_tmp)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if where == "download":
            # Killed once the first half of the body is in the worker's temporary file.
            while not any(p.is_file() and p.stat().st_size for p in child_tmp.rglob("*.part")):
                assert child.poll() is None, "the worker ended before its download was under way"
                time.sleep(0.02)
            assert emulator.stats("openai")["operations"]["download"] > downloads
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stdout is not None
        stdout = child.stdout.read()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert "survived" not in stdout
    # Nothing at the final URI. A hard kill cannot clean up: the join's hidden temporary may stay
    # beside it (never under the final name); the download's temporaries live in a temp directory.
    assert not destination.exists()
    assert all(name.endswith(".tmp") for name in _leftovers(out))

    emulator.clear_faults()
    _fetch(batch_id, source, destination)
    assert sha256(destination) == clean_sha
