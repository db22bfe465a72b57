"""A scripted vendor for hook tests: answers from queues, records every request."""

from __future__ import annotations

import json
from typing import Any

import httpx

MOCK_KEY = "sk-mock-key-9f8e7d6c5b4a3210"
MOCK_BASE = "http://vendor.test/api/v1"


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

    def _answer(self, request: httpx.Request) -> httpx.Response:
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

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        return self._answer(request)

    async def ahandler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(await request.aread())
        return self._answer(request)


def batch_json(batch_id: str = "batch_1", status: str = "validating", **fields: Any) -> dict[str, Any]:
    return {"id": batch_id, "object": "batch", "status": status, "created_at": 1_800_000_000, **fields}


def ok(data: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(data).encode(), headers={"content-type": "application/json"}
    )
