"""Uploads whose body never completes: a client that goes away mid-body, a form cut before its end."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.testing import VendorClient, assert_error_body, request_lines
from airflow_provider_llmbatch.vendors import VendorSpec

BOUNDARY = "abortboundary"


def _form(content: bytes, *, closed: bool = True) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="requests.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + content + (f"\r\n--{BOUNDARY}--\r\n".encode() if closed else b"")


def _fragments(emulator: Emulator, vendor: str) -> list[Path]:
    """Return the files in the vendor's directory that no file record owns (partial uploads)."""
    state = emulator.runtime.store.vendor(vendor)
    owned = {record.path for record in state.files.values()}
    return [path for path in state.root.iterdir() if path.is_file() and path not in owned]


def _listed(api: VendorClient) -> list[str]:
    """Return the ids of the files the vendor lists (an empty page may say null)."""
    return [f["id"] for f in api.http.get("/files").json()["data"] or []]


def _wait_for_no_fragments(emulator: Emulator, vendor: str) -> None:
    deadline = time.monotonic() + 5
    while _fragments(emulator, vendor) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _fragments(emulator, vendor) == []


def _send_then_hang_up(emulator: Emulator, spec: VendorSpec, body: bytes, declared: int) -> None:
    """Send the request head and ``body`` (shorter than ``declared``), then close the connection."""
    url = urlsplit(emulator.base_url(spec.name) + "/files")
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {emulator.api_key}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(head)
        for start in range(0, len(body), 65536):
            sock.sendall(body[start : start + 65536])
        # Let the server take in what was sent before the connection goes.
        deadline = time.monotonic() + 5
        while emulator.stats(spec.name)["operations"].get("upload", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)


def test_client_gone_mid_body_leaves_no_file(api: VendorClient, spec: VendorSpec) -> None:
    emulator = api.emulator
    content = request_lines(spec, [f"r{i}" for i in range(20_000)])
    whole = _form(content)
    cut = whole[: len(whole) // 2]

    _send_then_hang_up(emulator, spec, cut, len(whole))

    _wait_for_no_fragments(emulator, spec.name)
    stats = emulator.stats(spec.name)
    assert stats["operations"]["upload"] == 1
    assert (stats["files_uploaded"], stats["files"]) == (0, 0)
    assert _listed(api) == []
    # The server goes on serving as before.
    file_id = api.upload_ok(request_lines(spec, ["after"]))
    assert _listed(api) == [file_id]


def test_client_gone_before_the_closing_boundary_leaves_no_file(api: VendorClient, spec: VendorSpec) -> None:
    emulator = api.emulator
    content = request_lines(spec, ["a", "b"])
    whole = _form(content)

    # Everything but the closing boundary: the file part may look whole, the body is not.
    _send_then_hang_up(emulator, spec, _form(content, closed=False), len(whole))

    _wait_for_no_fragments(emulator, spec.name)
    assert emulator.stats(spec.name)["files"] == 0
    assert _listed(api) == []


def test_form_without_its_closing_boundary_is_refused(api: VendorClient, spec: VendorSpec) -> None:
    body = _form(request_lines(spec, ["a", "b"]), closed=False)

    response = api.http.post(
        "/files", content=body, headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    )

    assert_error_body(spec, response, "bad_request")
    assert "closing boundary" in response.text
    _wait_for_no_fragments(api.emulator, spec.name)
    assert api.emulator.stats(spec.name)["files"] == 0


def test_repeated_hang_ups_do_not_disturb_other_uploads(api: VendorClient, spec: VendorSpec) -> None:
    hang_ups = 3
    emulator = api.emulator
    whole = _form(request_lines(spec, [f"r{i}" for i in range(5_000)]))
    kept = [api.upload_ok(request_lines(spec, ["before"]))]
    for n in range(hang_ups):
        _send_then_hang_up(emulator, spec, whole[: len(whole) // (n + 2)], len(whole))
        kept.append(api.upload_ok(request_lines(spec, [f"between-{n}"])))

    _wait_for_no_fragments(emulator, spec.name)
    assert sorted(_listed(api)) == sorted(kept)
    assert emulator.stats(spec.name)["files_uploaded"] == len(kept)
