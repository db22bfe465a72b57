"""The hook against the emulator over loopback: every operation, both faces, every vendor in the registry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.exceptions import ConflictError, InvalidInputError, NotFoundError
from airflow_provider_llmbatch.hooks._core import IDEMPOTENCY_KEY
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch, BatchStatus, FileObject
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

pytestmark = pytest.mark.integration

VENDORS = list(REGISTRY)
FACES = ["sync", "async"]


def request_file(
    directory: Path, spec: VendorSpec, n: int, *, failing: int = 0, name: str = "requests.jsonl"
) -> Path:
    endpoint = spec.endpoints[0]
    model = endpoint.required_model or "test-model"
    path = directory / name
    with path.open("w") as handle:
        for i in range(n):
            custom_id = f"fail-{i}" if i < failing else f"req-{i}"
            body = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]}
            handle.write(
                json.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint.path, "body": body})
                + "\n"
            )
    return path


@pytest.fixture
def conn(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Point an env-var connection at the emulator; return its id."""

    def _conn(vendor: str, *, extra: dict[str, Any] | None = None, password: str | None = None) -> str:
        conn_id = f"emu_{vendor}"
        value: dict[str, Any] = {
            "conn_type": REGISTRY[vendor].conn_type,
            "host": emulator.base_url(vendor),
            "password": password or emulator.api_key,
        }
        if extra:
            value["extra"] = extra
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
        return conn_id

    return _conn


class Face:
    """Call the sync or the async face with one spelling, so every scenario runs through both."""

    def __init__(self, hook: BatchHook, face: str) -> None:
        self.hook = hook
        self.face = face
        self.loop = asyncio.new_event_loop() if face == "async" else None

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.loop is None:
            result = getattr(self.hook, name)(*args, **kwargs)
            return list(result) if name in {"list_files", "list_batches", "iter_file_lines"} else result
        if name in {"list_files", "list_batches", "iter_file_lines"}:

            async def collect() -> list[Any]:
                return [item async for item in getattr(self.hook, "a" + name)(*args, **kwargs)]

            return self.loop.run_until_complete(collect())
        return self.loop.run_until_complete(getattr(self.hook, "a" + name)(*args, **kwargs))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.hook.aclose())
            self.loop.close()
        self.hook.close()


@pytest.fixture
def face_factory() -> Any:
    faces: list[Face] = []

    def make(conn_id: str, face: str, **kwargs: Any) -> Face:
        made = Face(BatchHook(conn_id, **kwargs), face)
        faces.append(made)
        return made

    yield make
    for made in faces:
        made.close()


def wait_terminal(call: Face, batch_id: str, timeout: float = 10.0) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch: Batch = call("get_batch", batch_id)
        if batch.is_terminal or time.monotonic() > deadline:
            return batch
        time.sleep(0.02)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_files_and_batch_lifecycle(
    vendor: str, face: str, emulator: Emulator, conn: Callable[..., str], face_factory: Any, tmp_path: Path
) -> None:
    spec = REGISTRY[vendor]
    call = face_factory(conn(vendor), face)
    source = request_file(tmp_path, spec, 6, failing=2)

    uploaded: FileObject = call("upload_file", source)
    assert uploaded.bytes == source.stat().st_size
    assert uploaded.filename == "requests.jsonl"
    assert call("get_file", uploaded.id).id == uploaded.id
    assert uploaded.id in [f.id for f in call("list_files")]
    assert emulator.file_path(vendor, uploaded.id).read_bytes() == source.read_bytes()

    batch: Batch = call("create_batch", input_file_id=uploaded.id, metadata={"run": "r1"})
    assert batch.input_file_id == uploaded.id
    assert batch.endpoint == spec.default_endpoint
    assert batch.metadata is not None
    assert batch.metadata["run"] == "r1"
    assert IDEMPOTENCY_KEY in batch.metadata
    found = call("find_batch", metadata={"run": "r1"})
    assert found is not None
    assert found.id == batch.id
    assert call("find_batch", metadata={"run": "other"}) is None

    finished = wait_terminal(call, batch.id)
    assert finished.state is BatchStatus.COMPLETED
    assert finished.request_counts.total == 6
    assert finished.request_counts.failed == 2
    assert finished.output_file_id
    assert finished.error_file_id

    out = tmp_path / "results" / "output.jsonl"
    written = call("download_file", finished.output_file_id, out)
    assert written == out.stat().st_size == emulator.file_path(vendor, finished.output_file_id).stat().st_size
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == [
        f"req-{i}" for i in range(2, 6)
    ]
    errors = call("iter_file_lines", finished.error_file_id)
    assert sorted(json.loads(line)["custom_id"] for line in errors) == ["fail-0", "fail-1"]
    with (tmp_path / "errors.jsonl").open("wb") as handle:
        assert call("download_file", finished.error_file_id, handle) > 0

    # Zhipu deletes the input file itself once the batch is done: delete a file of our own.
    spare = call("upload_file", source, filename="spare.jsonl")
    call("delete_file", spare.id)
    with pytest.raises(NotFoundError) as info:
        call("get_file", spare.id)
    assert info.value.vendor == vendor
    assert info.value.operation == "get_file"
    assert info.value.request_id


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_list_batches_to_the_end(
    vendor: str, face: str, emulator: Emulator, conn: Callable[..., str], face_factory: Any, tmp_path: Path
) -> None:
    call = face_factory(conn(vendor), face)
    uploaded = call("upload_file", request_file(tmp_path, REGISTRY[vendor], 1))
    created = [call("create_batch", input_file_id=uploaded.id).id for _ in range(7)]
    listed = [b.id for b in call("list_batches", page_size=3)]
    assert sorted(listed) == sorted(created)
    assert listed == [b["id"] for b in emulator.batches(vendor)]  # newest first, no duplicates
    assert emulator.stats(vendor)["operations"]["list_batches"] == 3  # 7 batches, pages of 3


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_list_files_to_the_end(
    vendor: str, face: str, emulator: Emulator, conn: Callable[..., str], face_factory: Any, tmp_path: Path
) -> None:
    call = face_factory(conn(vendor), face)
    ids = {
        call("upload_file", request_file(tmp_path, REGISTRY[vendor], 1, name=f"f{i}.jsonl")).id
        for i in range(5)
    }
    assert {f.id for f in call("list_files", page_size=2)} == ids
    assert {f.id for f in call("list_files", purpose="batch")} == ids


@pytest.mark.parametrize("vendor", VENDORS)
def test_list_filters(
    vendor: str, emulator: Emulator, conn: Callable[..., str], face_factory: Any, tmp_path: Path
) -> None:
    spec = REGISTRY[vendor]
    call = face_factory(conn(vendor), "sync")
    names = [f.name for f in spec.extra_create_fields if f.name == "ds_name"]
    first = call("upload_file", request_file(tmp_path, spec, 1, name="a.jsonl"))
    second = call("upload_file", request_file(tmp_path, spec, 1, name="b.jsonl"))
    extra = {"ds_name": "nightly run"} if names else None
    one = call("create_batch", input_file_id=first.id, extra=extra)
    two = call("create_batch", input_file_id=second.id)
    emulator.force_status(vendor, one.id, "in_progress")
    emulator.force_status(vendor, two.id, "validating")
    filters = spec.batch_list.params - {"after", "limit"}
    if not filters:
        with pytest.raises(InvalidInputError, match="allowed: none"):
            call("list_batches", status="in_progress")
        return
    if "status" in filters:
        assert [b.id for b in call("list_batches", status="in_progress")] == [one.id]
        assert {b.id for b in call("list_batches", status=["in_progress", "validating"])} == {one.id, two.id}
    if "input_file_ids" in filters:
        assert [b.id for b in call("list_batches", input_file_ids=[second.id])] == [two.id]
    if "ds_name" in filters:
        assert [b.id for b in call("list_batches", ds_name="nightly")] == [one.id]
    with pytest.raises(InvalidInputError):
        call("list_batches", colour="red")


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_cancel(
    vendor: str, face: str, emulator: Emulator, conn: Callable[..., str], face_factory: Any, tmp_path: Path
) -> None:
    call = face_factory(conn(vendor), face)
    uploaded = call("upload_file", request_file(tmp_path, REGISTRY[vendor], 2))
    batch = call("create_batch", input_file_id=uploaded.id)
    emulator.force_status(vendor, batch.id, "in_progress")
    cancelled = call("cancel_batch", batch.id)
    assert cancelled.status in {"cancelling", "cancelled"}
    emulator.force_status(vendor, batch.id, "cancelled")
    assert call("get_batch", batch.id).state is BatchStatus.CANCELLED
    with pytest.raises(ConflictError):
        call("cancel_batch", batch.id)
    with pytest.raises(NotFoundError):
        call("cancel_batch", "batch_does_not_exist")


@pytest.mark.parametrize("vendor", VENDORS)
def test_test_connection(vendor: str, conn: Callable[..., str]) -> None:
    assert BatchHook(conn(vendor)).test_connection()[0] is True
    ok, message = BatchHook(conn(vendor, password="sk-wrong-key-000000")).test_connection()
    assert not ok
    assert "AuthenticationError" in message


@pytest.mark.parametrize("vendor", VENDORS)
def test_vendor_extras_are_sent(
    vendor: str, emulator: Emulator, conn: Callable[..., str], tmp_path: Path
) -> None:
    spec = REGISTRY[vendor]
    hook = BatchHook(conn(vendor))
    uploaded = hook.upload_file(request_file(tmp_path, spec, 1))
    extra = {
        f.name: (
            "x"
            if f.type == "string"
            else False
            if f.type == "boolean"
            else {"anchor": "created_at", "seconds": 3600}
        )
        for f in spec.extra_create_fields
    }
    batch = hook.create_batch(input_file_id=uploaded.id, extra=extra)
    for field in spec.extra_create_fields:
        if field.in_metadata:
            assert batch.metadata is not None
            assert batch.metadata[field.name] == "x"
    hook.close()


@pytest.mark.parametrize("vendor", VENDORS)
def test_transient_faults_are_retried(
    vendor: str, emulator: Emulator, conn: Callable[..., str], tmp_path: Path
) -> None:
    slept: list[float] = []
    hook = BatchHook(conn(vendor), retry_policy=RetryPolicy(max_retries=3, sleep=slept.append))
    for kind, operation in [
        ("429", "upload"),
        ("503", "create"),
        ("reset", "get_batch"),
        ("500", "list_batches"),
        ("reset", "download"),
    ]:
        emulator.add_fault(FaultRule(kind, vendor=vendor, operation=operation, times=1))  # type: ignore[arg-type]
    uploaded = hook.upload_file(request_file(tmp_path, REGISTRY[vendor], 2))
    batch = hook.create_batch(input_file_id=uploaded.id)
    assert hook.get_batch(batch.id).id == batch.id
    assert [b.id for b in hook.list_batches()] == [batch.id]
    finished = emulator.force_status(vendor, batch.id, "completed")
    assert hook.download_file(finished["output_file_id"], tmp_path / "out.jsonl") > 0
    assert len(slept) == 5
    stats = emulator.stats(vendor)
    assert stats["batches_created"] == 1
    assert stats["files_uploaded"] == 1
    hook.close()


@pytest.mark.parametrize("vendor", VENDORS)
def test_create_and_upload_that_time_out_are_looked_up_before_any_repeat(
    vendor: str, emulator: Emulator, conn: Callable[..., str], tmp_path: Path
) -> None:
    # The answer comes after our read timeout: the effect is unknown, so the hook looks the object up
    # (list) before it repeats the call, and the vendor ends up with exactly one file and one batch.
    # (The "found it" branch needs a vendor that acts and then fails; the MockTransport tests cover it.)
    hook = BatchHook(
        conn(vendor, extra={"timeout": 0.15}),
        retry_policy=RetryPolicy(max_retries=2, sleep=lambda seconds: time.sleep(0.5)),
    )
    emulator.add_fault(FaultRule("slow", vendor=vendor, operation="upload", delay=0.3, times=1))
    emulator.add_fault(FaultRule("slow", vendor=vendor, operation="create", delay=0.3, times=1))
    uploaded = hook.upload_file(request_file(tmp_path, REGISTRY[vendor], 2))
    batch = hook.create_batch(input_file_id=uploaded.id)
    stats = emulator.stats(vendor)
    assert stats["files_uploaded"] == 1
    assert stats["batches_created"] == 1
    assert [b["id"] for b in emulator.batches(vendor)] == [batch.id]
    assert stats["operations"]["list_files"] >= 1
    assert stats["operations"]["list_batches"] >= 1
    hook.close()


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_unknown_effect_finds_what_the_vendor_already_has(
    vendor: str, face: str, emulator: Emulator, conn: Callable[..., str], face_factory: Any, tmp_path: Path
) -> None:
    # Stand-ins for "the vendor acted, then the answer was lost": the object exists before the 5xx.
    call = face_factory(
        conn(vendor), face, retry_policy=RetryPolicy(max_retries=2, sleep=_no_sleep, asleep=_ano_sleep)
    )
    source = request_file(tmp_path, REGISTRY[vendor], 3)
    existing_file = call("upload_file", source)
    existing = call("create_batch", input_file_id=existing_file.id, metadata={IDEMPOTENCY_KEY: "key-1"})
    emulator.add_fault(FaultRule("500", vendor=vendor, operation="upload", times=1))
    emulator.add_fault(FaultRule("502", vendor=vendor, operation="create", times=1))
    assert call("upload_file", source).id == existing_file.id
    again = call("create_batch", input_file_id=existing_file.id, metadata={IDEMPOTENCY_KEY: "key-1"})
    assert again.id == existing.id
    stats = emulator.stats(vendor)
    assert stats["files_uploaded"] == 1
    assert stats["batches_created"] == 1


def _no_sleep(seconds: float) -> None:
    return None


async def _ano_sleep(seconds: float) -> None:
    return None


def test_async_face_reads_env_connections_without_the_sync_lookup(
    emulator: Emulator, conn: Callable[..., str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    conn_ids = {vendor: conn(vendor) for vendor in VENDORS}

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sync connection lookup")

    monkeypatch.setattr(BatchHook, "get_connection", classmethod(forbidden))

    async def main() -> list[bool]:
        hooks = [BatchHook(conn_id) for conn_id in conn_ids.values()]
        results = await asyncio.gather(*(h.atest_connection() for h in hooks))
        for hook in hooks:
            await hook.aclose()
        return [ok for ok, _ in results]

    assert asyncio.run(main()) == [True] * len(VENDORS)
