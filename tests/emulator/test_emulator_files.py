from __future__ import annotations

import dataclasses

import httpx
import pytest

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.emulator.testing import VendorClient, assert_error_body, request_lines
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.vendors import REGISTRY, Limits, VendorSpec

pytestmark = pytest.mark.integration


def test_upload_get_list_download_delete(api: VendorClient, spec: VendorSpec) -> None:
    content = request_lines(spec, ["a", "b"])
    response = api.upload(content)
    assert response.status_code == 200, response.text
    uploaded = response.json()
    assert uploaded["bytes"] == len(content)
    assert uploaded["purpose"] == "batch"
    assert uploaded["filename"] == "requests.jsonl"
    assert isinstance(uploaded["created_at"], int)
    assert (uploaded["created_at"] > 10**11) is dialect_of(spec).timestamps_in_ms

    got = api.http.get(f"/files/{uploaded['id']}")
    assert got.status_code == 200
    assert got.json() == uploaded

    listed = api.http.get("/files").json()
    assert [f["id"] for f in listed["data"]] == [uploaded["id"]]

    download = api.http.get(f"/files/{uploaded['id']}/content")
    if spec.input_content_downloadable:
        assert download.status_code == 200
        assert download.content == content
    else:
        assert_error_body(spec, download, "permission_denied")

    deleted = api.http.delete(f"/files/{uploaded['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": uploaded["id"], "object": "file", "deleted": True}
    assert_error_body(spec, api.http.get(f"/files/{uploaded['id']}"), "not_found")
    stats = api.emulator.stats(spec.name)
    assert stats["files_uploaded"] == 1
    assert stats["files"] == 0
    assert stats["files_deleted"] == 1


def test_unknown_file_is_404_in_dialect(api: VendorClient, spec: VendorSpec) -> None:
    assert_error_body(spec, api.http.get("/files/file-nope"), "not_found")
    assert_error_body(spec, api.http.get("/files/file-nope/content"), "not_found")
    assert_error_body(spec, api.http.delete("/files/file-nope"), "not_found")


@pytest.mark.parametrize(
    ("filename", "purpose", "param"),
    [("requests.jsonl", "fine-tune", "purpose"), ("requests.csv", "batch", "file")],
)
def test_upload_rejects_bad_purpose_and_name(
    api: VendorClient, spec: VendorSpec, filename: str, purpose: str, param: str
) -> None:
    response = api.upload(request_lines(spec, ["a"]), filename=filename, purpose=purpose)
    assert_error_body(spec, response, "bad_request")
    if "param" in dialect_of(spec).errors.fields:
        assert response.json()["error"]["param"] == param
    assert api.emulator.stats(spec.name)["files_uploaded"] == 0


def test_upload_without_multipart_is_400(api: VendorClient, spec: VendorSpec) -> None:
    response = api.http.post("/files", content=b"{}", headers={"content-type": "application/json"})
    assert_error_body(spec, response, "bad_request")


def test_upload_streams_a_chunked_body_to_disk(api: VendorClient, spec: VendorSpec) -> None:
    line = request_lines(spec, ["x"]).decode().strip()
    body_lines = [line.replace('"x"', f'"r{i}"') for i in range(2000)]
    content = ("\n".join(body_lines) + "\n").encode()
    boundary = "emulatorboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # type: ignore[no-untyped-def]
        yield head
        for start in range(0, len(content), 7919):
            yield content[start : start + 7919]
        yield tail

    response = api.http.post(
        "/files", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    assert response.json()["bytes"] == len(content)
    assert api.emulator.file_path(spec.name, file_id).read_bytes() == content


@pytest.mark.parametrize("spec_name", list(REGISTRY))
def test_file_over_the_vendor_limit_is_refused(spec_name: str) -> None:
    spec = REGISTRY[spec_name]
    small = dataclasses.replace(spec, limits=Limits(max_requests=10, max_file_bytes=100))
    with Emulator(EmulatorConfig(vendors={spec_name: small})) as emulator:
        client = VendorClient(emulator, small)
        try:
            response = client.upload(request_lines(small, ["a", "b", "c"]))
            assert_error_body(small, response, "file_too_large")
            assert emulator.stats(spec_name)["files"] == 0
        finally:
            client.close()


def test_file_list_paging_follows_the_spec(api: VendorClient, spec: VendorSpec) -> None:
    ids = [api.upload_ok(request_lines(spec, [f"c{i}"])) for i in range(3)]
    newest_first = list(reversed(ids))
    list_spec = spec.file_list
    if "limit" in list_spec.params and list_spec.max_limit:
        page = api.http.get("/files", params={"limit": 2}).json()
        assert [f["id"] for f in page["data"]] == newest_first[:2]
        assert page["has_more"] is True
        rest = api.http.get("/files", params={"limit": 2, "after": newest_first[1]}).json()
        assert [f["id"] for f in rest["data"]] == newest_first[2:]
        assert rest["has_more"] is False
        too_big = api.http.get("/files", params={"limit": list_spec.max_limit + 1})
        assert_error_body(spec, too_big, "bad_request")
    else:
        page = api.http.get("/files", params={"limit": 1, "after": newest_first[0]}).json()
        assert [f["id"] for f in page["data"]] == newest_first
        assert "has_more" not in page
    assert ("first_id" in page) is dialect_of(spec).file_pages.has_first_last_ids


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if {"purpose", "order"} <= s.file_list.params], ids=lambda s: s.name
)
def test_file_list_filters_by_purpose_and_order(api: VendorClient, spec: VendorSpec) -> None:
    first = api.upload_ok(request_lines(spec, ["a"]))
    second = api.upload_ok(request_lines(spec, ["b"]))
    assert api.http.get("/files", params={"purpose": "batch_output"}).json()["data"] == []
    ascending = api.http.get("/files", params={"order": "asc"}).json()["data"]
    assert [f["id"] for f in ascending] == [first, second]


def test_empty_file_list_uses_the_vendor_shape(api: VendorClient, spec: VendorSpec) -> None:
    page = api.http.get("/files").json()
    assert page["data"] == (None if dialect_of(spec).file_pages.data_null_when_empty else [])


def test_wrong_or_missing_key_gets_401_in_dialect(emulator: Emulator, spec: VendorSpec) -> None:
    base = emulator.base_url(spec.name)
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": emulator.api_key}):
        response = httpx.get(f"{base}/files", headers=headers)
        assert_error_body(spec, response, "authentication")
        assert emulator.api_key not in response.text
    assert emulator.stats(spec.name)["operations"]["list_files"] == 3


def test_unknown_route_is_404_in_dialect(api: VendorClient, spec: VendorSpec) -> None:
    assert_error_body(spec, api.http.get("/nothing/here"), "not_found")
