"""A scripted vendor for sync-face edge cases (``httpx.MockTransport``) and helpers the hook tests share."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx

from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch

MOCK_KEY = "sk-mock-key-9f8e7d6c5b4a3210"
MOCK_BASE = "http://vendor.test/api/v1"
FACES = ["sync", "async"]


class Script:
    """
    A scripted vendor: (method, path) -> queue of answers; records every request with its full body.

    An answer is an ``httpx.Response``, an exception to raise, or a callable ``(request) -> answer``.
    The last answer of a queue repeats.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Any]] = {}
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def on(self, method: str, path: str, *answers: Any) -> Script:
        self.routes[(method, path)] = list(answers)
        return self

    def calls(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.url.path == "/api/v1" + path)

    def sent(self, method: str) -> list[bytes]:
        """Return the bodies of the requests with ``method``, in order."""
        return [b for b, r in zip(self.bodies, self.requests, strict=True) if r.method == method]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        self.requests.append(request)
        key = (request.method, request.url.path.removeprefix("/api/v1"))
        queue = self.routes.get(key)
        if not queue:
            return httpx.Response(404, json={"error": {"message": f"no route {key}"}})
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(answer) and not isinstance(answer, httpx.Response):
            answer = answer(request)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, httpx.Response)
        return answer


class Broken(httpx.SyncByteStream):
    """A body that breaks after ``good`` bytes."""

    def __init__(self, good: bytes) -> None:
        self.good = good

    def __iter__(self) -> Iterator[bytes]:
        yield self.good
        raise httpx.RemoteProtocolError("peer closed connection")


def batch_json(batch_id: str = "batch_1", status: str = "validating", **fields: Any) -> dict[str, Any]:
    return {"id": batch_id, "object": "batch", "status": status, "created_at": 1_800_000_000, **fields}


def file_json(file_id: str, name: str, size: int, created: float = 1_800_000_000) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "filename": name,
        "purpose": "batch",
        "created_at": created,
    }


def ok(data: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(data).encode(), headers={"content-type": "application/json"}
    )


def call_on(face: str, hook: BatchHook, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``name`` on the sync face, or ``a<name>`` on the async face in a fresh loop (then release it)."""
    if face == "sync":
        return getattr(hook, name)(*args, **kwargs)

    async def main() -> Any:
        try:
            return await getattr(hook, "a" + name)(*args, **kwargs)
        finally:
            await hook.aclose()

    return asyncio.run(main())


def get_batch_on(face: str, hook: BatchHook, batch_id: str = "b1", **kwargs: Any) -> Batch:
    """Read a batch on the sync face, or on the async face in a fresh event loop."""
    return call_on(face, hook, "get_batch", batch_id, **kwargs)  # type: ignore[no-any-return]
