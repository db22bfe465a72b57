"""Helpers for tests that talk to the emulator: request files, a per-vendor client, error-body checks."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import httpx

from airflow_provider_llmbatch.emulator.server import Emulator
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.vendors import ErrorKind, VendorSpec


def request_lines(
    spec: VendorSpec,
    custom_ids: Iterable[str],
    *,
    endpoint: str | None = None,
    model: str = "test-model",
    body_extra: dict[str, Any] | None = None,
) -> bytes:
    """Return a valid request file for ``spec``: one chat (or embeddings) request per custom id."""
    url = endpoint or spec.default_endpoint
    lines = []
    for cid in custom_ids:
        if "embeddings" in url:
            body: dict[str, Any] = {"model": model, "input": f"text of {cid}"}
        else:
            body = {"model": model, "messages": [{"role": "user", "content": f"say hello to {cid}"}]}
        body.update(body_extra or {})
        lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}))
    return ("\n".join(lines) + "\n").encode()


class VendorClient:
    """A thin httpx client for one vendor on the emulator, with the test's own shortcuts."""

    def __init__(self, emulator: Emulator, spec: VendorSpec) -> None:
        """
        Open a client.

        :param emulator: a started emulator.
        :param spec: the vendor to talk to.
        """
        self.emulator = emulator
        self.spec = spec
        self.http = httpx.Client(
            base_url=emulator.base_url(spec.name),
            headers={"Authorization": f"Bearer {emulator.api_key}"},
            timeout=10,
        )

    def upload(
        self, content: bytes, filename: str = "requests.jsonl", purpose: str = "batch"
    ) -> httpx.Response:
        """Upload request-file bytes."""
        return self.http.post("/files", files={"file": (filename, content)}, data={"purpose": purpose})

    def upload_ok(self, content: bytes) -> str:
        """Upload and return the new file id."""
        response = self.upload(content)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def create(self, file_id: str, **overrides: Any) -> httpx.Response:
        """Create a batch with the vendor's defaults, overridden by ``overrides``."""
        body: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": self.spec.default_endpoint,
            "completion_window": self.spec.completion_window.default or "24h",
        }
        body.update(overrides)
        return self.http.post("/batches", json=body)

    def batch_from(self, custom_ids: Iterable[str], **overrides: Any) -> dict[str, Any]:
        """Upload a request file for ``custom_ids`` and create a batch from it."""
        endpoint = overrides.get("endpoint")
        file_id = self.upload_ok(request_lines(self.spec, custom_ids, endpoint=endpoint))
        response = self.create(file_id, **overrides)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def get(self, batch_id: str) -> dict[str, Any]:
        """Return a batch."""
        response = self.http.get(f"/batches/{batch_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def lines(self, file_id: str) -> list[dict[str, Any]]:
        """Download a file and return its JSON lines."""
        response = self.http.get(f"/files/{file_id}/content")
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()


def assert_error_body(
    spec: VendorSpec, response: httpx.Response, kind: ErrorKind, status: int | None = None
) -> None:
    """Assert ``response`` is an error of ``kind`` in the vendor's dialect, request id included."""
    expected_status, code = spec.errors.codes[kind]
    shape = dialect_of(spec).errors
    assert response.status_code == (status or expected_status), response.text
    body = response.json()
    error = body["error"]
    assert set(error) == set(shape.fields)
    assert code in (error.get("code"), error.get("type"))
    assert ("request_id" in body) is shape.request_id_in_body
    request_id = response.headers.get(spec.errors.request_id_headers[0])
    assert request_id
    if shape.request_id_in_body:
        assert body["request_id"] == request_id
