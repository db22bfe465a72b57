"""The hook against the emulator over loopback: every operation, every vendor in the registry, both faces."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hookmock import FACES, call_on, get_batch_on

from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.exceptions import InvalidInputError, NotFoundError, ServerError
from airflow_provider_llmbatch.hooks.arguments import IDEMPOTENCY_KEY
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import BatchStatus
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

pytestmark = pytest.mark.integration

VENDORS = list(REGISTRY)
DAY = 24 * 3600.0


def request_file(
    directory: Path, spec: VendorSpec, n: int, *, failing: int = 0, name: str = "requests.jsonl"
) -> Path:
    """Write ``n`` requests; the first ``failing`` carry the custom ids the emulator answers with errors."""
    endpoint = spec.endpoints[0]
    model = endpoint.required_model or "test-model"
    path = directory / name
    with path.open("w") as handle:
        for i in range(n):
            custom_id = f"fail-{i}" if i < failing else f"req-{i}"
            body = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]}
            line = {"custom_id": custom_id, "method": "POST", "url": endpoint.path, "body": body}
            handle.write(json.dumps(line) + "\n")
    return path


def _no_sleep(seconds: float) -> None:
    return None


async def _ano_sleep(seconds: float) -> None:
    return None


def no_sleep_policy(max_retries: int = 3, slept: list[float] | None = None) -> RetryPolicy:
    record = slept.append if slept is not None else _no_sleep

    async def arecord(seconds: float) -> None:
        record(seconds)

    return RetryPolicy(max_retries=max_retries, sleep=record, asleep=arecord)


@pytest.fixture
def batch_of(emulator_hook: Callable[..., BatchHook], tmp_path: Path) -> Callable[..., str]:
    """Upload a small request file to ``vendor`` and create a batch of it (sync face); return its id."""

    def make(vendor: str, requests: int = 2) -> str:
        hook = emulator_hook(vendor)
        uploaded = hook.upload_file(request_file(tmp_path, REGISTRY[vendor], requests))
        return hook.create_batch(input_file_id=uploaded.id).id

    return make


@pytest.mark.parametrize("vendor", VENDORS)
def test_files_and_batch_lifecycle(
    vendor: str, emulator: Emulator, emulator_hook: Callable[..., BatchHook], tmp_path: Path
) -> None:
    spec = REGISTRY[vendor]
    hook = emulator_hook(vendor)
    source = request_file(tmp_path, spec, 6, failing=2)

    uploaded = hook.upload_file(source)
    assert uploaded.bytes == source.stat().st_size
    assert uploaded.filename == "requests.jsonl"
    assert hook.get_file(uploaded.id).id == uploaded.id
    assert uploaded.id in [f.id for f in hook.list_files()]
    assert emulator.file_path(vendor, uploaded.id).read_bytes() == source.read_bytes()

    batch = hook.create_batch(input_file_id=uploaded.id, metadata={"run": "r1"})
    assert batch.input_file_id == uploaded.id
    assert batch.endpoint == spec.default_endpoint
    assert batch.metadata is not None
    assert batch.metadata["run"] == "r1"
    assert len(batch.metadata[IDEMPOTENCY_KEY]) == 32
    found = hook.find_batch(metadata={"run": "r1"})
    assert found is not None
    assert found.id == batch.id
    assert hook.find_batch(metadata={"run": "other"}) is None

    emulator.advance_clock(DAY)
    finished = hook.get_batch(batch.id)
    assert get_batch_on("async", emulator_hook(vendor), batch.id) == finished
    assert finished.state is BatchStatus.COMPLETED
    assert (finished.request_counts.total, finished.request_counts.failed) == (6, 2)
    assert finished.output_file_id
    assert finished.error_file_id

    out = tmp_path / "results" / "output.jsonl"
    written = hook.download_file(finished.output_file_id, out)
    assert written == out.stat().st_size == emulator.file_path(vendor, finished.output_file_id).stat().st_size
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == [
        f"req-{i}" for i in range(2, 6)
    ]
    error_file = hook.get_file(finished.error_file_id)
    with (tmp_path / "errors.jsonl").open("wb") as handle:
        assert hook.download_file(error_file.id, handle, expected_bytes=error_file.bytes) > 0
    errors = (tmp_path / "errors.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in errors) == ["fail-0", "fail-1"]

    # Zhipu deletes the input file itself once the batch is done: delete a file of our own.
    spare = hook.upload_file(source, filename="spare.jsonl")
    hook.delete_file(spare.id)
    with pytest.raises(NotFoundError) as info:
        hook.get_file(spare.id)
    assert (info.value.vendor, info.value.operation) == (vendor, "get_file")
    assert info.value.request_id


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_cancel_on_both_faces(
    vendor: str, face: str, emulator: Emulator, emulator_hook: Callable[..., BatchHook], batch_of: Any
) -> None:
    batch_id = batch_of(vendor)
    emulator.force_status(vendor, batch_id, "in_progress")
    assert call_on(face, emulator_hook(vendor), "cancel_batch", batch_id).status in {
        "cancelling",
        "cancelled",
    }
    emulator.force_status(vendor, batch_id, "cancelled")
    assert get_batch_on(face, emulator_hook(vendor), batch_id).state is BatchStatus.CANCELLED
    # The vendor refuses to cancel a batch that has ended: the answer is the batch as it is.
    again = call_on(face, emulator_hook(vendor), "cancel_batch", batch_id)
    assert (again.id, again.state) == (batch_id, BatchStatus.CANCELLED)
    with pytest.raises(NotFoundError):
        call_on(face, emulator_hook(vendor), "cancel_batch", "batch_does_not_exist")


@pytest.mark.parametrize("vendor", VENDORS)
def test_list_batches_to_the_end(
    vendor: str, emulator: Emulator, emulator_hook: Callable[..., BatchHook], tmp_path: Path
) -> None:
    hook = emulator_hook(vendor)
    uploaded = hook.upload_file(request_file(tmp_path, REGISTRY[vendor], 1))
    created = [hook.create_batch(input_file_id=uploaded.id).id for _ in range(7)]
    listed = [b.id for b in hook.list_batches(page_size=3)]
    assert sorted(listed) == sorted(created)
    assert listed == [b["id"] for b in emulator.batches(vendor)]  # newest first, no duplicates
    assert emulator.stats(vendor)["operations"]["list_batches"] == 3  # 7 batches, pages of 3


@pytest.mark.parametrize("vendor", VENDORS)
def test_list_files_to_the_end(vendor: str, emulator_hook: Callable[..., BatchHook], tmp_path: Path) -> None:
    hook = emulator_hook(vendor)
    spec = REGISTRY[vendor]
    ids = {hook.upload_file(request_file(tmp_path, spec, 1, name=f"f{i}.jsonl")).id for i in range(5)}
    assert {f.id for f in hook.list_files(page_size=2)} == ids
    assert {f.id for f in hook.list_files(purpose="batch")} == ids


@pytest.mark.parametrize("vendor", VENDORS)
def test_list_filters(
    vendor: str, emulator: Emulator, emulator_hook: Callable[..., BatchHook], tmp_path: Path
) -> None:
    spec = REGISTRY[vendor]
    hook = emulator_hook(vendor)
    first = hook.upload_file(request_file(tmp_path, spec, 1, name="a.jsonl"))
    second = hook.upload_file(request_file(tmp_path, spec, 1, name="b.jsonl"))
    named = any(f.name == "ds_name" for f in spec.extra_create_fields)
    one = hook.create_batch(input_file_id=first.id, extra={"ds_name": "nightly run"} if named else None)
    two = hook.create_batch(input_file_id=second.id)
    emulator.force_status(vendor, one.id, "in_progress")
    emulator.force_status(vendor, two.id, "validating")
    filters = spec.batch_list.params - {"after", "limit"}
    if not filters:
        with pytest.raises(InvalidInputError, match="allowed: none"):
            list(hook.list_batches(status="in_progress"))
        return
    if "status" in filters:
        assert [b.id for b in hook.list_batches(status="in_progress")] == [one.id]
        assert {b.id for b in hook.list_batches(status=["in_progress", "validating"])} == {one.id, two.id}
    if "input_file_ids" in filters:
        assert [b.id for b in hook.list_batches(input_file_ids=[second.id])] == [two.id]
    if "ds_name" in filters:
        assert [b.id for b in hook.list_batches(ds_name="nightly")] == [one.id]
    with pytest.raises(InvalidInputError):
        list(hook.list_batches(colour="red"))


@pytest.mark.parametrize("vendor", VENDORS)
def test_test_connection(vendor: str, emulator_hook: Callable[..., BatchHook]) -> None:
    assert emulator_hook(vendor).test_connection()[0] is True
    ok, message = emulator_hook(vendor, password="sk-wrong-key-000000").test_connection()
    assert not ok
    assert "AuthenticationError" in message


@pytest.mark.parametrize("vendor", VENDORS)
def test_vendor_extras_are_sent(vendor: str, emulator_hook: Callable[..., BatchHook], tmp_path: Path) -> None:
    spec = REGISTRY[vendor]
    hook = emulator_hook(vendor)
    uploaded = hook.upload_file(request_file(tmp_path, spec, 1))
    samples = {"string": "x", "boolean": False, "object": {"anchor": "created_at", "seconds": 3600}}
    batch = hook.create_batch(
        input_file_id=uploaded.id, extra={f.name: samples[f.type] for f in spec.extra_create_fields}
    )
    for field in spec.extra_create_fields:
        if field.in_metadata:
            assert batch.metadata is not None
            assert batch.metadata[field.name] == "x"


# -- faults: retried where safe, looked up where the effect is unknown ---------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_transient_faults_are_retried(
    vendor: str, emulator: Emulator, emulator_hook: Callable[..., BatchHook], tmp_path: Path
) -> None:
    slept: list[float] = []
    hook = emulator_hook(vendor, retry_policy=no_sleep_policy(slept=slept))
    faults = [
        ("429", "upload"),
        ("503", "create"),
        ("reset", "get_batch"),
        ("500", "list_batches"),
        ("reset_mid_body", "download"),
    ]
    for kind, operation in faults:
        emulator.add_fault(FaultRule(kind, vendor=vendor, operation=operation, times=1))  # type: ignore[arg-type]
    uploaded = hook.upload_file(request_file(tmp_path, REGISTRY[vendor], 2))
    batch = hook.create_batch(input_file_id=uploaded.id)
    assert hook.get_batch(batch.id).id == batch.id
    assert [b.id for b in hook.list_batches()] == [batch.id]
    finished = emulator.force_status(vendor, batch.id, "completed")
    out = tmp_path / "out.jsonl"
    assert hook.download_file(finished["output_file_id"], out) == out.stat().st_size > 0
    assert out.read_bytes() == emulator.file_path(vendor, finished["output_file_id"]).read_bytes()
    assert len(slept) == len(faults)
    stats = emulator.stats(vendor)
    assert (stats["batches_created"], stats["files_uploaded"]) == (1, 1)


@pytest.mark.parametrize("vendor", VENDORS)
def test_async_face_retries_transient_faults(
    vendor: str, emulator: Emulator, emulator_hook: Callable[..., BatchHook], batch_of: Any
) -> None:
    batch_id = batch_of(vendor)
    slept: list[float] = []
    # Not "reset": aiohttp itself repeats a GET whose connection closed before any answer.
    kinds = ["500", "429", "503", "reset_mid_body", "html"]
    for kind in kinds:
        emulator.add_fault(FaultRule(kind, vendor=vendor, operation="get_batch", times=1))  # type: ignore[arg-type]
    hook = emulator_hook(vendor, retry_policy=no_sleep_policy(max_retries=len(kinds), slept=slept))
    assert get_batch_on("async", hook, batch_id).id == batch_id
    assert len(slept) == len(kinds)
    assert emulator.stats(vendor)["operations"]["get_batch"] == len(kinds) + 1
    emulator.add_fault(FaultRule("500", vendor=vendor, operation="get_batch", times=1))
    with pytest.raises(ServerError):
        get_batch_on("async", hook, batch_id, retry=False)  # a poll loop that owns its schedule
    assert len(slept) == len(kinds)


@pytest.mark.parametrize("fault", ["stall_after", "reset_after", "reset_mid_body"])
@pytest.mark.parametrize("vendor", VENDORS)
def test_create_and_upload_of_unknown_effect_are_found_not_repeated(
    vendor: str, fault: str, emulator: Emulator, emulator_hook: Callable[..., BatchHook], tmp_path: Path
) -> None:
    # The vendor acts, then the answer is lost (a read timeout, a reset, half a body): the hook looks the
    # object up before any repeat, finds it, and the vendor ends up with one file and one batch.
    hook = emulator_hook(vendor, extra={"timeout": 0.5}, retry_policy=no_sleep_policy())
    for operation in ("upload", "create"):
        rule = FaultRule(fault, vendor=vendor, operation=operation, delay=2.0, times=1)  # type: ignore[arg-type]
        emulator.add_fault(rule)
    uploaded = hook.upload_file(request_file(tmp_path, REGISTRY[vendor], 2))
    assert [f["id"] for f in emulator.files(vendor)] == [uploaded.id]
    batch = hook.create_batch(input_file_id=uploaded.id)
    assert [b["id"] for b in emulator.batches(vendor)] == [batch.id]
    stats = emulator.stats(vendor)
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)
    assert stats["operations"]["upload"] == stats["operations"]["create"] == 1
    assert stats["operations"]["list_files"] >= 1
    assert stats["operations"]["list_batches"] >= 1


@pytest.mark.parametrize("vendor", VENDORS)
def test_create_that_never_arrived_is_repeated(
    vendor: str, emulator: Emulator, emulator_hook: Callable[..., BatchHook], batch_of: Any
) -> None:
    first = batch_of(vendor)
    emulator.add_fault(FaultRule("502", vendor=vendor, operation="create", times=1))
    hook = emulator_hook(vendor, retry_policy=no_sleep_policy())
    input_file_id = emulator.batch(vendor, first)["input_file_id"]
    second = hook.create_batch(input_file_id=input_file_id)
    assert second.id != first
    assert emulator.stats(vendor)["batches_created"] == 2


def test_async_face_reads_connections_without_the_sync_lookup(
    emulator_hook: Callable[..., BatchHook], batch_of: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_ids = {vendor: batch_of(vendor) for vendor in VENDORS}
    hooks = {vendor: emulator_hook(vendor) for vendor in VENDORS}

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sync connection lookup")

    monkeypatch.setattr(BatchHook, "get_connection", classmethod(forbidden))

    async def main() -> list[str]:
        results = await asyncio.gather(*(hooks[v].aget_batch(batch_ids[v]) for v in VENDORS))
        for hook in hooks.values():
            await hook.aclose()
        return [b.id for b in results]

    assert asyncio.run(main()) == [batch_ids[v] for v in VENDORS]
