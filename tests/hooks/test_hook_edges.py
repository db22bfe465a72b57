"""Single edge cases the emulator cannot produce, through both faces, against ``httpx.MockTransport``."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hookmock import MOCK_KEY, Script, batch_json, ok

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    APITimeoutError,
    InvalidInputError,
    MalformedResponseError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
)
from airflow_provider_llmbatch.hooks import _pool
from airflow_provider_llmbatch.hooks._core import IDEMPOTENCY_KEY
from airflow_provider_llmbatch.hooks.batch import (
    BatchHook,
    DashScopeBatchHook,
    MoonshotBatchHook,
    OpenAIBatchHook,
    ZhipuBatchHook,
)
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _connect_error(request: httpx.Request) -> httpx.ConnectError:
    return httpx.ConnectError("connection refused", request=request)


def _read_timeout(request: httpx.Request) -> httpx.ReadTimeout:
    return httpx.ReadTimeout("timed out", request=request)


class _Broken(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that breaks after ``good`` bytes."""

    def __init__(self, good: bytes) -> None:
        self.good = good

    def __iter__(self) -> Iterator[bytes]:
        yield self.good
        raise httpx.RemoteProtocolError("peer closed connection")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.good
        raise httpx.RemoteProtocolError("peer closed connection")


# -- retries of idempotent calls ---------------------------------------------------------------------


@pytest.mark.parametrize("face", ["sync", "async"])
def test_get_retries_5xx_then_succeeds(
    face: str, mock_hook: Callable[..., BatchHook], script: Script, slept: list[float]
) -> None:
    script.on("GET", "/batches/b1", ok({}, 500), ok({}, 502), ok(batch_json("b1", "in_progress")))
    hook = mock_hook()
    batch = hook.get_batch("b1") if face == "sync" else run(_aget_and_close(hook, "b1"))
    assert batch.status == "in_progress"
    assert script.calls("GET", "/batches/b1") == 3
    assert len(slept) == 2
    assert all(0 <= s <= 1.0 for s in slept)


async def _aget_and_close(hook: BatchHook, batch_id: str) -> Batch:
    try:
        return await hook.aget_batch(batch_id)
    finally:
        await hook.aclose()


def test_gives_up_after_max_retries(
    mock_hook: Callable[..., BatchHook], script: Script, slept: list[float]
) -> None:
    script.on("GET", "/batches/b1", ok({"error": {"message": "down"}}, 503))
    with pytest.raises(ServerError, match="down"):
        mock_hook().get_batch("b1")
    assert script.calls("GET", "/batches/b1") == 4  # 1 + max_retries (3)
    assert len(slept) == 3


def test_max_retries_comes_from_the_connection(
    connect: Callable[..., str], script: Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    script.on("GET", "/batches/b1", ok({}, 500))
    hook = BatchHook(connect(extra={"max_retries": 1}))
    assert hook.retry_policy.max_retries == 1
    hook._client = httpx.Client(transport=httpx.MockTransport(script.handler))
    object.__setattr__(hook.retry_policy, "sleep", lambda seconds: None)  # frozen policy: no real sleeps
    with pytest.raises(ServerError):
        hook.get_batch("b1")
    assert script.calls("GET", "/batches/b1") == 2


def test_429_honours_retry_after(
    mock_hook: Callable[..., BatchHook], script: Script, slept: list[float]
) -> None:
    limited = httpx.Response(
        429, json={"error": {"code": "rate_limit_exceeded", "message": "slow"}}, headers={"Retry-After": "7"}
    )
    script.on("GET", "/batches/b1", limited, ok(batch_json("b1")))
    assert mock_hook().get_batch("b1").id == "b1"
    assert slept == [7.0]


@pytest.mark.parametrize("face", ["sync", "async"])
def test_quota_429_is_never_retried(
    face: str, mock_hook: Callable[..., BatchHook], script: Script, slept: list[float]
) -> None:
    quota = httpx.Response(429, json={"error": {"code": "insufficient_quota", "message": "pay"}})
    script.on("POST", "/batches", quota)
    hook = mock_hook()
    create = hook.create_batch if face == "sync" else lambda **kw: run(hook.acreate_batch(**kw))
    with pytest.raises(QuotaExceededError):
        create(input_file_id="f1")
    assert script.calls("POST", "/batches") == 1
    assert slept == []


def test_malformed_success_is_not_retried(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    truncated = httpx.Response(200, content=b'{"id": "b1", "stat', headers={"x-request-id": "rid-7"})
    script.on("GET", "/batches/b1", truncated)
    with pytest.raises(MalformedResponseError, match="not JSON") as info:
        mock_hook().get_batch("b1")
    assert info.value.status_code == 200
    assert info.value.request_id == "rid-7"
    assert info.value.operation == "get_batch"
    script.on("GET", "/batches/b2", ok({"object": "batch"}))
    with pytest.raises(MalformedResponseError, match="not a Batch: id: Field required"):
        mock_hook().get_batch("b2")
    assert script.calls("GET", "/batches/b1") == 1


# -- create: never blindly repeated -------------------------------------------------------------------


def _created_from_request(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return ok(batch_json("b-new", metadata=body["metadata"]))


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("failure", ["500", "read-timeout", "reset"])
def test_create_of_unknown_effect_is_found_not_repeated(
    face: str, failure: str, mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    created: dict[str, Any] = {}

    def accept_then_fail(request: httpx.Request) -> Any:
        created.update(json.loads(request.content))
        if failure == "500":
            return ok({"error": {"message": "oops"}}, 500)
        if failure == "read-timeout":
            return _read_timeout(request)
        return httpx.Response(200, stream=_Broken(b'{"id": "b-'))

    def listing(request: httpx.Request) -> httpx.Response:
        mine = batch_json("b-created", metadata=created["metadata"])
        other = batch_json("b-other", metadata={IDEMPOTENCY_KEY: "someone-else"})
        return ok({"data": [other, mine], "has_more": False})

    script.on("POST", "/batches", accept_then_fail)
    script.on("GET", "/batches", listing)
    hook = mock_hook()
    batch = (
        hook.create_batch(input_file_id="f1")
        if face == "sync"
        else run(hook.acreate_batch(input_file_id="f1"))
    )
    assert batch.id == "b-created"
    assert script.calls("POST", "/batches") == 1


@pytest.mark.parametrize("face", ["sync", "async"])
def test_create_of_unknown_effect_is_repeated_when_not_found(
    face: str, mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("POST", "/batches", ok({}, 502), _created_from_request)
    script.on("GET", "/batches", ok({"data": [], "has_more": False}))
    hook = mock_hook()
    metadata = {"owner": "me", IDEMPOTENCY_KEY: "fixed-key"}
    if face == "sync":
        batch = hook.create_batch(input_file_id="f1", metadata=metadata)
    else:
        batch = run(hook.acreate_batch(input_file_id="f1", metadata=metadata))
    assert batch.id == "b-new"
    assert script.calls("POST", "/batches") == 2
    sent = [json.loads(b) for b, r in zip(script.bodies, script.requests, strict=True) if r.method == "POST"]
    assert sent[0] == sent[1]  # same idempotency key both times
    assert sent[0]["metadata"] == metadata


def test_create_connect_error_is_repeated_without_lookup(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("POST", "/batches", _connect_error, _created_from_request)
    batch = mock_hook().create_batch(input_file_id="f1")
    assert batch.id == "b-new"
    assert script.calls("POST", "/batches") == 2
    assert script.calls("GET", "/batches") == 0


def test_untagged_create_of_unknown_effect_raises(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("POST", "/batches", ok({}, 500), _created_from_request)
    full = {f"k{i}": "v" for i in range(REGISTRY["openai"].limits.metadata_pairs)}
    with pytest.raises(ServerError):
        mock_hook().create_batch(input_file_id="f1", metadata=full)
    assert script.calls("POST", "/batches") == 1


def test_failed_lookup_raises_the_original_error(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    script.on("POST", "/batches", ok({"error": {"message": "create broke"}}, 500))
    script.on("GET", "/batches", httpx.Response(401, json={"error": {"message": "no"}}))
    with pytest.raises(ServerError, match="create broke"):
        mock_hook().create_batch(input_file_id="f1")
    assert script.calls("POST", "/batches") == 1


# -- upload -----------------------------------------------------------------------------------------


def _file_json(file_id: str, name: str, size: int, created: float = 1_800_000_000) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "filename": name,
        "purpose": "batch",
        "created_at": created,
    }


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(b'{"custom_id": "r%d"}\n' % i for i in range(1000)))
    return path


def _form_file(body: bytes) -> bytes:
    marker = b"Content-Type: application/octet-stream\r\n\r\n"
    start = body.index(marker) + len(marker)
    end = body.rindex(b"\r\n--")
    return body[start:end]


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("kind", ["path", "fileobj", "storage"])
def test_upload_streams_each_source_kind(
    face: str, kind: str, mock_hook: Callable[..., BatchHook], script: Script, request_file: Path
) -> None:
    size = request_file.stat().st_size
    script.on("POST", "/files", lambda r: ok(_file_json("file-1", "requests.jsonl", size)))
    hook = mock_hook()
    if kind == "path":
        source: Any = str(request_file)
    elif kind == "fileobj":
        source = request_file.open("rb")
    else:
        from airflow.sdk import ObjectStoragePath

        source = ObjectStoragePath(f"file://{request_file}")
    result = (
        hook.upload_file(source, filename="requests.jsonl")
        if face == "sync"
        else run(hook.aupload_file(source, filename="requests.jsonl"))
    )
    assert result.id == "file-1"
    request = script.requests[0]
    assert request.headers["content-length"] == str(len(script.bodies[0]))
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert _form_file(script.bodies[0]) == request_file.read_bytes()
    assert b'name="purpose"\r\n\r\nbatch\r\n' in script.bodies[0]
    if kind == "fileobj":
        source.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_upload_of_unknown_effect_is_found_not_repeated(
    face: str, mock_hook: Callable[..., BatchHook], script: Script, request_file: Path
) -> None:
    import time

    size = request_file.stat().st_size
    now = time.time()
    script.on("POST", "/files", ok({}, 502))
    script.on(
        "GET",
        "/files",
        ok(
            {
                "data": [
                    _file_json("file-old", "requests.jsonl", size, created=now - 3600),
                    _file_json("file-other-size", "requests.jsonl", size + 1, created=now),
                    _file_json("file-mine", "requests.jsonl", size, created=now),
                ],
                "has_more": False,
            }
        ),
    )
    hook = mock_hook()
    result = hook.upload_file(request_file) if face == "sync" else run(hook.aupload_file(request_file))
    assert result.id == "file-mine"
    assert script.calls("POST", "/files") == 1


@pytest.mark.parametrize("face", ["sync", "async"])
def test_upload_repeated_when_not_found_rewinds_the_source(
    face: str, mock_hook: Callable[..., BatchHook], script: Script, request_file: Path
) -> None:
    size = request_file.stat().st_size
    script.on("POST", "/files", _read_timeout, lambda r: ok(_file_json("file-2", "requests.jsonl", size)))
    script.on("GET", "/files", ok({"data": None}))
    hook = mock_hook()
    with request_file.open("rb") as handle:
        handle.read(10)  # uploads read from the current position
        result = (
            hook.upload_file(handle, filename="x.jsonl")
            if face == "sync"
            else run(hook.aupload_file(handle, filename="x.jsonl"))
        )
    assert result.id == "file-2"
    uploads = [b for b, r in zip(script.bodies, script.requests, strict=True) if r.method == "POST"]
    assert len(uploads) == 2
    assert _form_file(uploads[0]) == _form_file(uploads[1]) == request_file.read_bytes()[10:]


class _Pipe(io.RawIOBase):
    """A non-seekable binary stream."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_non_seekable_upload_is_not_repeated(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    script.on("POST", "/files", _connect_error, ok(_file_json("f", "x", 3)))
    with pytest.raises(APIConnectionError):
        mock_hook().upload_file(_Pipe(b"abc"), filename="x.jsonl")  # type: ignore[arg-type]
    assert script.calls("POST", "/files") == 1


def test_text_mode_files_are_refused(mock_hook: Callable[..., BatchHook], request_file: Path) -> None:
    with request_file.open("r") as handle, pytest.raises(InvalidInputError, match="binary mode"):
        mock_hook().upload_file(handle)  # type: ignore[arg-type]


# -- download ---------------------------------------------------------------------------------------


CONTENT = b"".join(b'{"custom_id": "r%d", "response": {}}\n' % i for i in range(2000))


@pytest.mark.parametrize("face", ["sync", "async"])
def test_short_body_raises_and_leaves_no_file(
    face: str, mock_hook: Callable[..., BatchHook], script: Script, tmp_path: Path
) -> None:
    def short(request: httpx.Request) -> httpx.Response:
        headers = {"content-length": str(len(CONTENT))}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(CONTENT[:100]))

    script.on("GET", "/files/f1/content", short)
    target = tmp_path / "out.jsonl"
    hook = mock_hook()
    download = hook.download_file if face == "sync" else lambda *a: run(hook.adownload_file(*a))
    with pytest.raises(APIConnectionError, match=f"100 of {len(CONTENT)} bytes"):
        download("f1", target)
    assert list(tmp_path.iterdir()) == []
    assert script.calls("GET", "/files/f1/content") == 4


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("kind", ["path", "fileobj", "storage"])
def test_download_restarts_after_a_reset(
    face: str, kind: str, mock_hook: Callable[..., BatchHook], script: Script, tmp_path: Path
) -> None:
    script.on(
        "GET",
        "/files/f1/content",
        httpx.Response(200, stream=_Broken(CONTENT[:5000])),
        httpx.Response(200, content=CONTENT),
    )
    target = tmp_path / "sub" / "out.jsonl"
    hook = mock_hook()
    handle = None
    if kind == "path":
        destination: Any = target
    elif kind == "fileobj":
        target.parent.mkdir()
        handle = target.open("wb")
        handle.write(b"HEADER\n")
        destination = handle
    else:
        from airflow.sdk import ObjectStoragePath

        destination = ObjectStoragePath(f"file://{target}")
    written = (
        hook.download_file("f1", destination)
        if face == "sync"
        else run(hook.adownload_file("f1", destination))
    )
    if handle is not None:
        handle.close()
        assert target.read_bytes() == b"HEADER\n" + CONTENT
    else:
        assert target.read_bytes() == CONTENT
        assert sorted(p.name for p in target.parent.iterdir()) == ["out.jsonl"]
    assert written == len(CONTENT)


def test_download_replaces_an_existing_file_only_on_success(
    mock_hook: Callable[..., BatchHook], script: Script, tmp_path: Path
) -> None:
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"previous")
    script.on("GET", "/files/f1/content", lambda r: httpx.Response(200, stream=_Broken(b"partial")))
    with pytest.raises(APIConnectionError):
        mock_hook().download_file("f1", target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize("face", ["sync", "async"])
def test_iter_lines_resumes_without_repeating(
    face: str, mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    cut = CONTENT.index(b"\n", 3000) + 5  # mid-line
    script.on(
        "GET",
        "/files/f1/content",
        httpx.Response(200, stream=_Broken(CONTENT[:cut])),
        httpx.Response(200, content=CONTENT),
    )
    hook = mock_hook()

    async def collect() -> list[bytes]:
        return [line async for line in hook.aiter_file_lines("f1")]

    lines = list(hook.iter_file_lines("f1")) if face == "sync" else run(collect())
    assert lines == CONTENT.splitlines()


# -- lists and idempotent repeats ------------------------------------------------------------------------


@pytest.mark.parametrize("face", ["sync", "async"])
def test_list_that_ignores_after_terminates(
    face: str, mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    page = ok({"data": [batch_json("b2"), batch_json("b1")], "has_more": True, "last_id": "b1"})
    script.on("GET", "/batches", page)
    hook = mock_hook()

    async def collect() -> list[str]:
        return [b.id async for b in hook.alist_batches(page_size=2)]

    ids = [b.id for b in hook.list_batches(page_size=2)] if face == "sync" else run(collect())
    assert ids == ["b2", "b1"]
    assert script.calls("GET", "/batches") == 2
    assert script.requests[1].url.params["after"] == "b1"


def test_moonshot_file_list_is_one_request(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    script.on(
        "GET",
        "/files",
        ok({"data": [_file_json("f1", "a", 1), {**_file_json("f2", "b", 1), "purpose": "other"}]}),
    )
    hook = mock_hook("moonshot")
    assert [f.id for f in hook.list_files(purpose="batch")] == ["f1"]
    assert script.calls("GET", "/files") == 1
    assert dict(script.requests[0].url.params) == {}


def test_unknown_filter_fails_before_any_request(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    with pytest.raises(InvalidInputError, match="status"):
        mock_hook("openai").list_batches(status="completed")
    with pytest.raises(
        InvalidInputError, match="allowed: create_after, create_before, ds_name, input_file_ids, status"
    ):
        mock_hook("dashscope").list_batches(colour="red")
    assert script.requests == []


def test_delete_repeat_that_finds_it_gone_is_done(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("DELETE", "/files/f1", _read_timeout, httpx.Response(404, json={"error": {"message": "gone"}}))
    mock_hook().delete_file("f1")
    assert script.calls("DELETE", "/files/f1") == 2


def test_cancel_repeat_that_meets_a_conflict_returns_the_batch(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on(
        "POST", "/batches/b1/cancel", ok({}, 500), httpx.Response(409, json={"error": {"message": "already"}})
    )
    script.on("GET", "/batches/b1", ok(batch_json("b1", "cancelling")))
    assert mock_hook().cancel_batch("b1").status == "cancelling"


def test_find_batch_stops_at_the_first_matching_page(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    older = batch_json("b-old", metadata={"k": "v"}, created_at=1_700_000_000)
    newer = batch_json("b-new", metadata={"k": "v", "x": "y"}, created_at=1_800_000_000)
    script.on(
        "GET",
        "/batches",
        ok({"data": [batch_json("b0"), older, newer], "has_more": True, "last_id": "b-new"}),
        ok({"data": [batch_json("b9", metadata={"k": "v"})], "has_more": False}),
    )
    hook = mock_hook()
    found = hook.find_batch(metadata={"k": "v"})
    assert found is not None
    assert found.id == "b-new"
    assert script.calls("GET", "/batches") == 1
    assert hook.find_batch(metadata={"k": "nope"}) is None


# -- connection handling and the shared async pool -------------------------------------------------------


@pytest.mark.parametrize(
    ("hook_class", "vendor"),
    [
        (ZhipuBatchHook, "zhipu"),
        (MoonshotBatchHook, "moonshot"),
        (DashScopeBatchHook, "dashscope"),
        (OpenAIBatchHook, "openai"),
    ],
)
def test_vendor_hooks_take_conn_type_and_name_from_the_registry(
    hook_class: type[BatchHook], vendor: str
) -> None:
    spec = REGISTRY[vendor]
    assert hook_class.conn_type == spec.conn_type == f"llmbatch_{vendor}"
    assert spec.display_name in hook_class.hook_name
    assert hook_class.conn_name_attr == "llmbatch_conn_id"
    assert hook_class.default_conn_name == "llmbatch_default"
    assert issubclass(hook_class, BatchHook)


def test_batch_hook_defaults() -> None:
    assert BatchHook.conn_type == "llmbatch_openai"
    assert BatchHook.hook_name == "LLM Batch (OpenAI-compatible)"


@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_connection_decides_the_vendor(vendor: str, connect: Callable[..., str]) -> None:
    assert OpenAIBatchHook(connect(vendor)).vendor is REGISTRY[vendor]


def test_empty_key_error_names_the_connection(connect: Callable[..., str]) -> None:
    conn_id = connect(password="")
    with pytest.raises(InvalidInputError, match=conn_id):
        BatchHook(conn_id).get_batch("b1")
    ok_, message = BatchHook(conn_id).test_connection()
    assert not ok_
    assert conn_id in message


def test_key_is_masked(connect: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    import airflow.sdk.log as sdk_log

    masked: list[Any] = []
    monkeypatch.setattr(sdk_log, "mask_secret", lambda value, name=None: masked.append(value))
    BatchHook(connect(password="sk-to-be-masked-123456")).vendor  # noqa: B018
    assert "sk-to-be-masked-123456" in masked


def test_async_face_uses_the_async_connection_lookup(
    connect: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn_id = connect("dashscope")

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sync connection lookup on the event loop")

    monkeypatch.setattr(BatchHook, "get_connection", classmethod(forbidden))

    async def main() -> str:
        hook = BatchHook(conn_id)
        vendor = await hook.aget_vendor()
        await hook.aclose()
        return vendor.name

    assert run(main()) == "dashscope"


def test_one_shared_async_client_per_loop_and_origin(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("GET", "/batches/b1", ok(batch_json("b1")))
    hooks = [mock_hook() for _ in range(50)] + [mock_hook(password="sk-another-key-0000000000")]

    async def main() -> tuple[dict[Any, int], dict[Any, int], set[int]]:
        results = await asyncio.gather(*(h.aget_batch("b1") for h in hooks))
        assert all(b.id == "b1" for b in results)
        during = _pool.shared_clients()
        clients = {id(h._lease[2]) for h in hooks if h._lease}
        for hook in hooks:
            await hook.aclose()
        return during, _pool.shared_clients(), clients

    during, after, clients = run(main())
    assert list(during.values()) == [51]
    assert len(clients) == 1
    assert after == {}
    auth = {r.headers["authorization"] for r in script.requests}
    assert auth == {f"Bearer {MOCK_KEY}", "Bearer sk-another-key-0000000000"}


def test_shared_client_holds_no_credentials(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    script.on("GET", "/batches/b1", ok(batch_json("b1")))
    hook = mock_hook()

    async def main() -> httpx.AsyncClient:
        await hook.aget_batch("b1")
        assert hook._lease is not None
        client = hook._lease[2].http
        assert "authorization" not in client.headers
        await hook.aclose()
        return client

    assert run(main()).is_closed


def test_shared_client_closes_only_after_the_last_release(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("GET", "/batches/b1", ok(batch_json("b1")))
    first, second = mock_hook(), mock_hook()

    async def main() -> None:
        await first.aget_batch("b1")
        await second.aget_batch("b1")
        assert first._lease is not None
        client = first._lease[2].http
        await first.aclose()
        assert not client.is_closed
        assert await second.aget_batch("b1")
        await second.aclose()
        assert client.is_closed

    run(main())


# -- memory stays flat ----------------------------------------------------------------------------------


class _CountingTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Consume uploads chunk by chunk (MockTransport would read them whole) and serve a large download."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.received = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            for chunk in request.stream:  # type: ignore[union-attr]
                self.received += len(chunk)
            return ok(_file_json("big", "big.jsonl", 0))
        return httpx.Response(200, headers={"content-length": str(self.size)}, stream=_Zeros(self.size))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            async for chunk in request.stream:  # type: ignore[union-attr]
                self.received += len(chunk)
            return ok(_file_json("big", "big.jsonl", 0))
        return httpx.Response(200, headers={"content-length": str(self.size)}, stream=_Zeros(self.size))


class _Zeros(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[bytes]:
        chunk = b"0" * 65536
        for _ in range(self.size // len(chunk)):
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = b"0" * 65536
        for _ in range(self.size // len(chunk)):
            yield chunk


@pytest.mark.parametrize("face", ["sync", "async"])
def test_large_transfers_stream(
    face: str,
    connect: Callable[..., str],
    policy: RetryPolicy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = 64 * 1024 * 1024
    big = tmp_path / "big.jsonl"
    with big.open("wb") as handle:
        handle.truncate(size)  # sparse: fast to make, 64 MB to read
    transport = _CountingTransport(size)
    monkeypatch.setattr(_pool, "_new_client", lambda timeout: httpx.AsyncClient(transport=transport))
    monkeypatch.setattr(_pool, "_new_lean", lambda origin, timeout: None)
    hook = BatchHook(connect(), retry_policy=policy)
    hook._sync_core()
    hook._client = httpx.Client(transport=transport)
    out = tmp_path / "out.jsonl"
    tracemalloc.start()
    try:
        if face == "sync":
            hook.upload_file(big)
            written = hook.download_file("big", out)
        else:

            async def both() -> int:
                await hook.aupload_file(big)
                result = await hook.adownload_file("big", out)
                await hook.aclose()
                return int(result)

            written = run(both())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        hook.close()
    assert transport.received > size
    assert written == size == os.path.getsize(out)
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak} bytes for a {size}-byte transfer"


def test_policy_fixture_never_really_sleeps(policy: RetryPolicy) -> None:
    assert policy.sleep is not __import__("time").sleep


def test_retry_policy_argument_wins_over_the_connection(connect: Callable[..., str]) -> None:
    policy = RetryPolicy(max_retries=9)
    assert BatchHook(connect(extra={"max_retries": 1}), retry_policy=policy).retry_policy is policy


def test_rate_limit_error_is_raised_when_retries_run_out(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on(
        "GET",
        "/batches/b1",
        httpx.Response(429, json={"error": {"code": "rate_limit_exceeded", "message": "x"}}),
    )
    with pytest.raises(RateLimitError):
        mock_hook().get_batch("b1")


def test_timeouts_are_typed(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    script.on("GET", "/batches/b1", _read_timeout)
    with pytest.raises(APITimeoutError):
        mock_hook().get_batch("b1")


class _OffLoopOnly(io.BytesIO):
    """A file whose every read, write and seek fails when it runs on an event loop's thread."""

    def _check(self) -> None:
        assert asyncio._get_running_loop() is None, "file I/O on the event loop"

    def read(self, size: int | None = -1, /) -> bytes:
        self._check()
        return super().read(size)

    def write(self, data: Any, /) -> int:
        self._check()
        return super().write(data)

    def seek(self, offset: int, whence: int = 0, /) -> int:
        self._check()
        return super().seek(offset, whence)


def test_async_transfers_keep_file_io_off_the_loop(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("POST", "/files", lambda r: ok(_file_json("f1", "x.jsonl", len(CONTENT))))
    script.on("GET", "/files/f1/content", lambda r: httpx.Response(200, content=CONTENT))
    hook = mock_hook()
    source = _OffLoopOnly(CONTENT)
    sink = _OffLoopOnly()

    async def main() -> int:
        await hook.aupload_file(source, filename="x.jsonl")
        written = await hook.adownload_file("f1", sink)
        await hook.aclose()
        return int(written)

    assert run(main()) == len(CONTENT)
    assert sink.getvalue() == CONTENT
    assert _form_file(script.bodies[0]) == CONTENT
