from __future__ import annotations

import httpx
import pytest

from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.emulator.testing import VendorClient, assert_error_body, request_lines
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

pytestmark = pytest.mark.integration


def test_http_error_faults_use_the_vendor_dialect(api: VendorClient, spec: VendorSpec) -> None:
    api.emulator.add_fault(FaultRule(kind="429", vendor=spec.name, operation="list_batches"))
    throttled = api.http.get("/batches")
    assert_error_body(spec, throttled, "rate_limit")
    assert "retry-after" not in throttled.headers
    for status in ("500", "502", "503"):
        api.emulator.add_fault(FaultRule(kind=status, operation="get_file"))  # type: ignore[arg-type]
        assert_error_body(spec, api.http.get("/files/file-x"), "server", status=int(status))
    assert api.http.get("/batches").status_code == 200


def test_retry_after_fault(api: VendorClient, spec: VendorSpec) -> None:
    api.emulator.add_fault(FaultRule(kind="429_retry_after", operation="create", retry_after=3))
    response = api.create(api.upload_ok(request_lines(spec, ["a"])))
    assert_error_body(spec, response, "rate_limit")
    assert response.headers["retry-after"] == "3"
    assert api.emulator.stats(spec.name)["batches_created"] == 0


def test_reset_drops_the_connection(api: VendorClient, spec: VendorSpec) -> None:
    api.emulator.add_fault(FaultRule(kind="reset", operation="get_batch"))
    with pytest.raises(httpx.TransportError):
        api.http.get("/batches/batch_x")
    assert_error_body(spec, api.http.get("/batches/batch_x"), "not_found")


def test_reset_during_upload_stores_nothing(api: VendorClient, spec: VendorSpec) -> None:
    api.emulator.add_fault(FaultRule(kind="reset", operation="upload"))
    with pytest.raises(httpx.TransportError):
        api.upload(request_lines(spec, [f"r{i}" for i in range(2000)]))
    stats = api.emulator.stats(spec.name)
    assert (stats["files_uploaded"], stats["files"]) == (0, 0)


def test_malformed_and_html_faults(api: VendorClient, spec: VendorSpec) -> None:
    api.emulator.add_fault(FaultRule(kind="malformed", operation="get_batch"))
    api.emulator.add_fault(FaultRule(kind="html", operation="get_batch"))
    malformed = api.http.get("/batches/batch_x")
    assert malformed.status_code == 200
    with pytest.raises(ValueError, match=r"Expecting|Unterminated|delimiter"):
        malformed.json()
    html = api.http.get("/batches/batch_x")
    assert html.status_code == 502
    assert html.headers["content-type"].startswith("text/html")
    assert "<html>" in html.text


def test_slow_fault_and_latency_trip_client_timeouts(api: VendorClient, spec: VendorSpec) -> None:
    api.emulator.add_fault(FaultRule(kind="slow", operation="list_files", delay=2.0))
    with pytest.raises(httpx.ReadTimeout):
        api.http.get("/files", timeout=0.2)
    api.emulator.set_latency(2.0)
    with pytest.raises(httpx.ReadTimeout):
        api.http.get("/batches", timeout=0.2)
    api.emulator.set_latency(0)
    assert api.http.get("/files", timeout=5).status_code == 200


def test_times_and_scope_of_a_rule(emulator: Emulator) -> None:
    emulator.add_fault(FaultRule(kind="503", vendor="moonshot", operation="list_batches", times=2))
    clients = {name: VendorClient(emulator, spec) for name, spec in REGISTRY.items()}
    try:
        assert clients["zhipu"].http.get("/batches").status_code == 200
        assert clients["moonshot"].http.get("/files").status_code == 200
        codes = [clients["moonshot"].http.get("/batches").status_code for _ in range(3)]
    finally:
        for client in clients.values():
            client.close()
    assert codes == [503, 503, 200]
    assert emulator.stats()["moonshot"]["requests"] == 4


def test_probability_is_seeded_and_reproducible(emulator: Emulator) -> None:
    client = VendorClient(emulator, REGISTRY["openai"])
    try:
        runs = []
        for _ in range(2):
            emulator.reset()
            emulator.add_fault(FaultRule(kind="500", probability=0.5, times=None))
            runs.append([client.http.get("/batches").status_code for _ in range(20)])
    finally:
        client.close()
    assert runs[0] == runs[1]
    assert 0 < runs[0].count(500) < 20


def test_clear_faults(api: VendorClient) -> None:
    api.emulator.add_fault(FaultRule(kind="500", times=None))
    assert api.http.get("/batches").status_code == 500
    api.emulator.clear_faults()
    assert api.http.get("/batches").status_code == 200


@pytest.mark.parametrize(
    "bad", [{"kind": "teapot"}, {"kind": "500", "operation": "brew"}, {"kind": "500", "probability": 2}]
)
def test_bad_rules_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"must be"):
        FaultRule.from_dict(bad)


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if dialect_of(s).rate_limits_per_minute], ids=lambda s: s.name
)
def test_documented_rate_limits_when_enabled(api: VendorClient, spec: VendorSpec) -> None:
    limit = dialect_of(spec).rate_limits_per_minute["list"]
    for _ in range(limit + 5):
        assert api.http.get("/batches").status_code == 200
    api.emulator.set_rate_limits(True)
    codes = [api.http.get("/batches").status_code for _ in range(limit + 1)]
    assert codes[:limit] == [200] * limit
    assert_error_body(spec, api.http.get("/batches"), "rate_limit")
    assert codes[-1] == 429
    assert api.http.get("/files").status_code == 200
    api.emulator.advance_clock(61)
    assert api.http.get("/batches").status_code == 200
