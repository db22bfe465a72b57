from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from airflow_provider_llmbatch.emulator.testing import VendorClient, assert_error_body, request_lines
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

pytestmark = pytest.mark.integration

BEIJING = timezone(timedelta(hours=8))


def _line(spec: VendorSpec, custom_id: str, **changes: object) -> dict[str, object]:
    line = json.loads(request_lines(spec, [custom_id]))
    line.update(changes)
    return line


def _file(*lines: dict[str, object] | str) -> bytes:
    return ("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n").encode()


def _bad_files(spec: VendorSpec) -> dict[str, tuple[bytes, int | None, str | None]]:
    """Return name -> (content, line at fault, param at fault)."""
    other_body = {"model": "another-model", "messages": [{"role": "user", "content": "x"}]}
    return {
        "duplicate_custom_id": (_file(_line(spec, "a"), _line(spec, "a")), 2, "custom_id"),
        "missing_custom_id": (_file(_line(spec, "a"), _line(spec, "")), 2, "custom_id"),
        "not_json": (_file(_line(spec, "a"), "{not json"), 2, None),
        "wrong_method": (_file(_line(spec, "a", method="GET")), 1, "method"),
        "wrong_url": (_file(_line(spec, "a", url="/v9/nothing")), 1, "url"),
        "two_models": (_file(_line(spec, "a"), _line(spec, "b", body=other_body)), 2, "body.model"),
        "empty": (b"\n", None, None),
    }


@pytest.mark.parametrize("case", list(_bad_files(REGISTRY["openai"])))
def test_invalid_request_file_is_rejected_where_the_vendor_does(
    api: VendorClient, spec: VendorSpec, case: str
) -> None:
    content, line, param = _bad_files(spec)[case]
    stage = dialect_of(spec).validation_stage
    uploaded = api.upload(content)
    if stage == "upload":
        assert_error_body(spec, uploaded, "bad_request")
        assert api.emulator.stats(spec.name)["files"] == 0
        if line is not None:
            assert f"line {line}:" in uploaded.json()["error"]["message"]
        return
    assert uploaded.status_code == 200
    created = api.create(uploaded.json()["id"])
    if stage == "create":
        assert_error_body(spec, created, "bad_request")
        assert api.emulator.stats(spec.name)["batches_created"] == 0
        return
    assert created.status_code == 200
    assert created.json()["status"] == "validating"
    api.emulator.advance_clock(5)
    batch = api.get(created.json()["id"])
    assert batch["status"] == "failed"
    errors = Batch.model_validate(batch).errors
    assert errors
    assert errors[0].line == line
    assert errors[0].param == param
    assert batch["output_file_id"] is None


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if s.forbidden_body_keys], ids=lambda s: s.name
)
def test_forbidden_body_keys_are_rejected(api: VendorClient, spec: VendorSpec) -> None:
    key = sorted(spec.forbidden_body_keys)[0]
    content = request_lines(spec, ["a"], body_extra={key: 0.5})
    response = api.upload(content)
    if dialect_of(spec).validation_stage == "upload":
        assert_error_body(spec, response, "bad_request")
        return
    created = api.create(response.json()["id"])
    if dialect_of(spec).validation_stage == "create":
        assert_error_body(spec, created, "bad_request")
        assert key in created.json()["error"]["message"]
    else:
        api.emulator.advance_clock(5)
        assert api.get(created.json()["id"])["status"] == "failed"


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if any(e.required_model for e in s.endpoints)], ids=lambda s: s.name
)
def test_endpoint_limits_and_required_model(api: VendorClient, spec: VendorSpec) -> None:
    endpoint = next(e for e in spec.endpoints if e.required_model)
    ok = request_lines(spec, ["a"], endpoint=endpoint.path, model=endpoint.required_model or "")
    batch = api.create(api.upload_ok(ok), endpoint=endpoint.path)
    assert batch.status_code == 200
    api.emulator.advance_clock(5)
    assert api.get(batch.json()["id"])["status"] == "completed"
    wrong = request_lines(spec, ["a"], endpoint=endpoint.path, model="qwen-max")
    assert endpoint.max_requests is not None
    too_many = request_lines(
        spec,
        [f"r{i}" for i in range(endpoint.max_requests + 1)],
        endpoint=endpoint.path,
        model=endpoint.required_model or "",
    )
    for content in (wrong, too_many):
        response = api.create(api.upload_ok(content), endpoint=endpoint.path)
        api.emulator.advance_clock(5)
        assert api.get(response.json()["id"])["status"] == "failed"


def test_create_checks_its_parameters(api: VendorClient, spec: VendorSpec) -> None:
    file_id = api.upload_ok(request_lines(spec, ["a"]))
    assert_error_body(spec, api.create("file-nope"), "not_found")
    assert_error_body(spec, api.create(file_id, endpoint="/v9/nothing"), "bad_request")
    assert_error_body(spec, api.create(file_id, metadata={f"k{i}": "v" for i in range(17)}), "bad_request")
    assert_error_body(spec, api.create(file_id, metadata={"k": "v" * 513}), "bad_request")
    assert_error_body(spec, api.http.post("/batches", content=b"not json"), "bad_request")
    bad_window = api.create(file_id, completion_window="forever")
    assert_error_body(spec, bad_window, "bad_request")
    if spec.completion_window.ignored:
        assert api.create(file_id, completion_window=None).status_code == 200
    else:
        assert_error_body(spec, api.create(file_id, completion_window="1000d"), "bad_request")
    assert api.emulator.stats(spec.name)["batches_created"] == int(spec.completion_window.ignored)


def test_metadata_is_echoed(api: VendorClient, spec: VendorSpec) -> None:
    created = api.batch_from(["a"], metadata={"run": "r1"})
    assert created["metadata"] == {"run": "r1"}
    assert api.get(created["id"])["metadata"] == {"run": "r1"}


def test_auto_delete_input_file_follows_the_vendor_default(
    frozen_api: VendorClient, spec: VendorSpec
) -> None:
    created = frozen_api.batch_from(["a"])
    frozen_api.emulator.advance_clock(5)
    assert frozen_api.get(created["id"])["status"] == "completed"
    field = next((f for f in spec.extra_create_fields if f.name == "auto_delete_input_file"), None)
    response = frozen_api.http.get(f"/files/{created['input_file_id']}")
    if field is not None and dialect_of(spec).create_field_defaults.get(field.name):
        assert_error_body(spec, response, "not_found")
        kept = frozen_api.batch_from(["a"], auto_delete_input_file=False)
        frozen_api.emulator.advance_clock(5)
        frozen_api.get(kept["id"])
        assert frozen_api.http.get(f"/files/{kept['input_file_id']}").status_code == 200
    else:
        assert response.status_code == 200


def test_input_deleted_while_running_still_completes(frozen_api: VendorClient, spec: VendorSpec) -> None:
    created = frozen_api.batch_from(["a", "b"])
    assert frozen_api.http.delete(f"/files/{created['input_file_id']}").status_code == 200
    frozen_api.emulator.advance_clock(5)
    done = frozen_api.get(created["id"])
    assert done["status"] == "completed"
    assert len(frozen_api.lines(done["output_file_id"])) == 2


def test_batch_list_pages(api: VendorClient, spec: VendorSpec) -> None:
    empty = api.http.get("/batches").json()
    assert empty["data"] == (None if dialect_of(spec).batch_pages.data_null_when_empty else [])
    ids = [api.batch_from([f"c{i}"])["id"] for i in range(3)]
    newest_first = list(reversed(ids))
    page = api.http.get("/batches", params={"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == newest_first[:2]
    assert page["has_more"] is True
    if dialect_of(spec).batch_pages.has_first_last_ids:
        assert (page["first_id"], page["last_id"]) == (newest_first[0], newest_first[1])
    else:
        assert "first_id" not in page
        assert "last_id" not in page
    rest = api.http.get("/batches", params={"limit": 2, "after": newest_first[1]}).json()
    assert [b["id"] for b in rest["data"]] == newest_first[2:]
    assert rest["has_more"] is False
    assert_error_body(spec, api.http.get("/batches", params={"limit": 0}), "bad_request")
    assert_error_body(spec, api.http.get("/batches", params={"limit": "many"}), "bad_request")


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if "ds_name" in s.batch_list.params], ids=lambda s: s.name
)
def test_batch_list_filters(api: VendorClient, spec: VendorSpec) -> None:
    first = api.batch_from(["a"], metadata={"ds_name": "nightly-run"})
    second = api.batch_from(["b"], metadata={"ds_name": "adhoc"})
    api.emulator.force_status(spec.name, second["id"], "completed")

    def ids(**params: str) -> list[str]:
        data = api.http.get("/batches", params=params).json()["data"] or []
        return [b["id"] for b in data]

    assert ids(ds_name="nightly") == [first["id"]]
    assert ids(input_file_ids=f"{second['input_file_id']},file-other") == [second["id"]]
    assert ids(status="completed,failed") == [second["id"]]
    now = datetime.now(BEIJING)
    assert ids(create_after=(now + timedelta(hours=1)).strftime("%Y%m%d%H%M%S")) == []
    assert set(ids(create_before=(now + timedelta(hours=1)).strftime("%Y%m%d%H%M%S"))) == {
        first["id"],
        second["id"],
    }
    assert_error_body(spec, api.http.get("/batches", params={"create_after": "yesterday"}), "bad_request")
    many = ",".join(f"file-{i}" for i in range(21))
    assert_error_body(spec, api.http.get("/batches", params={"input_file_ids": many}), "bad_request")


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if "ds_name" not in s.batch_list.params], ids=lambda s: s.name
)
def test_undeclared_list_filters_are_ignored(api: VendorClient, spec: VendorSpec) -> None:
    created = api.batch_from(["a"])
    data = api.http.get("/batches", params={"status": "failed", "ds_name": "zzz"}).json()["data"]
    assert [b["id"] for b in data] == [created["id"]]
