from __future__ import annotations

import json

import httpx
import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.testing import VendorClient, request_lines
from airflow_provider_llmbatch.emulator.vendor_dialects import emulator_prefix
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

pytestmark = pytest.mark.integration


@pytest.fixture
def admin(emulator: Emulator) -> httpx.Client:
    with httpx.Client(base_url=f"{emulator.url}/_emulator", timeout=10) as client:
        yield client  # type: ignore[misc]


def test_health_and_vendors_need_no_key(admin: httpx.Client, emulator: Emulator) -> None:
    health = admin.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "vendors": list(REGISTRY)}
    assert admin.get("/vendors").json() == {name: emulator.base_url(name) for name in REGISTRY}


def test_base_urls_use_the_registry_prefixes(emulator: Emulator, spec: VendorSpec) -> None:
    assert emulator.base_url(spec.name) == f"http://127.0.0.1:{emulator.port}{emulator_prefix(spec)}"


def test_stats_and_reset_over_http(admin: httpx.Client, api: VendorClient, spec: VendorSpec) -> None:
    api.batch_from(["a"])
    stats = admin.get("/stats", params={"vendor": spec.name}).json()
    assert stats[spec.name]["files_uploaded"] == 1
    assert stats[spec.name]["batches_created"] == 1
    assert stats[spec.name]["operations"] == {"upload": 1, "create": 1}
    assert admin.get("/stats", params={"vendor": "nobody"}).status_code == 404
    assert admin.post("/reset").status_code == 200
    assert api.emulator.stats(spec.name)["batches"] == 0
    assert api.emulator.batches(spec.name) == []


def test_faults_over_http(admin: httpx.Client, api: VendorClient) -> None:
    rules = [
        {"kind": "503", "operation": "list_batches", "times": 1},
        {"kind": "429_retry_after", "retry_after": 2},
    ]
    assert admin.post("/faults", json=rules).json() == {"faults": 2}
    assert [r["kind"] for r in admin.get("/faults").json()["faults"]] == ["503", "429_retry_after"]
    assert api.http.get("/batches").status_code == 503
    assert api.http.get("/batches").status_code == 429
    assert admin.post("/faults", json={"kind": "teapot"}).status_code == 400
    assert admin.delete("/faults").json() == {"faults": 0}
    assert api.http.get("/batches").status_code == 200


def test_latency_rate_limits_and_clock_over_http(admin: httpx.Client, api: VendorClient) -> None:
    assert admin.post("/latency", json={"seconds": 2}).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        api.http.get("/batches", timeout=0.2)
    assert admin.post("/latency", json={"seconds": -1}).status_code == 400
    assert admin.post("/latency", json={"seconds": 0}).status_code == 200
    assert admin.post("/rate_limits", json={"enabled": True}).json() == {"enabled": True}
    assert admin.post("/rate_limits", json={"enabled": "yes"}).status_code == 400
    created = api.batch_from(["a"])
    assert admin.post("/clock", json={"advance": 30}).json()["offset"] == 30
    assert api.get(created["id"])["status"] == "completed"


def test_force_status_over_http(admin: httpx.Client, api: VendorClient, spec: VendorSpec) -> None:
    created = api.batch_from(["a", "b"])
    response = admin.post(f"/batches/{spec.name}/{created['id']}/status", json={"status": "in_progress"})
    assert response.status_code == 200
    assert response.json()["status"] == "in_progress"
    api.emulator.advance_clock(100)
    assert api.get(created["id"])["status"] == "in_progress"
    listed = admin.get(f"/batches/{spec.name}").json()
    assert [b["id"] for b in listed] == [created["id"]]
    ended = admin.post(f"/batches/{spec.name}/{created['id']}/status", json={"status": "completed"})
    assert ended.json()["request_counts"]["completed"] == 2
    assert (
        admin.post(f"/batches/{spec.name}/batch_nope/status", json={"status": "completed"}).status_code == 404
    )
    assert (
        admin.post(f"/batches/{spec.name}/{created['id']}/status", json={"status": "done"}).status_code == 400
    )
    assert admin.post(f"/batches/nobody/{created['id']}/status", json={"status": "failed"}).status_code == 404


def test_inspection_helpers(emulator: Emulator, api: VendorClient, spec: VendorSpec) -> None:
    content = request_lines(spec, ["a"])
    file_id = api.upload_ok(content)
    assert [f["id"] for f in emulator.files(spec.name)] == [file_id]
    assert emulator.file_path(spec.name, file_id).read_bytes() == content
    created = api.create(file_id).json()
    assert emulator.batch(spec.name, created["id"])["id"] == created["id"]
    with pytest.raises(KeyError):
        emulator.batch(spec.name, "batch_nope")
    with pytest.raises(KeyError):
        emulator.stats("nobody")


def test_airflow_connection_helpers(emulator: Emulator, spec: VendorSpec) -> None:
    from airflow.models.connection import Connection

    env = emulator.airflow_conn_env(spec.name, "my_conn")
    assert list(env) == ["AIRFLOW_CONN_MY_CONN"]
    value = json.loads(env["AIRFLOW_CONN_MY_CONN"])
    assert value == {
        "conn_type": spec.conn_type,
        "host": emulator.base_url(spec.name),
        "password": emulator.api_key,
    }
    conn = Connection(conn_id="x", uri=emulator.connection_uri(spec.name))
    assert conn.conn_type == spec.conn_type
    assert conn.host == emulator.base_url(spec.name)
    assert conn.password == emulator.api_key


def test_connections_fixture_sets_env(emulator_connections: dict[str, str], emulator: Emulator) -> None:
    import os

    assert set(emulator_connections) == set(REGISTRY)
    for vendor, conn_id in emulator_connections.items():
        value = json.loads(os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])
        assert value["host"] == emulator.base_url(vendor)
