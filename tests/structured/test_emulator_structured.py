from __future__ import annotations

import dataclasses
import json
from datetime import date, datetime
from typing import Any
from uuid import UUID

import pytest
from pydantic import BaseModel, Field

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.emulator.structured import NOT_JSON_ANSWER, json_answer
from airflow_provider_llmbatch.emulator.testing import VendorClient, assert_error_body
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.jsonl import build_request_file
from airflow_provider_llmbatch.schema import OutputSchema
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec
from tests.structured.conftest import REVIEW_DICT, Review
from tests.structured.test_registry_requests import REJECTED

pytestmark = pytest.mark.integration
SPECS = list(REGISTRY.values())


@pytest.fixture(params=SPECS, ids=[s.name for s in SPECS])
def spec(request: pytest.FixtureRequest) -> VendorSpec:
    return request.param  # type: ignore[no-any-return]


def _run(emu: Emulator, spec: VendorSpec, content: bytes) -> tuple[dict[str, Any], VendorClient]:
    client = VendorClient(emu, spec)
    created = client.create(client.upload_ok(content))
    assert created.status_code == 200, created.text
    batch = client.get(created.json()["id"])
    assert batch["status"] == "completed", batch
    return batch, client


def _answers(client: VendorClient, batch: dict[str, Any]) -> dict[str, str]:
    return {
        line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
        for line in client.lines(batch["output_file_id"])
    }


def _built(spec: VendorSpec, tmp_path: Any, ids: list[str], given: Any) -> bytes:
    path = tmp_path / "requests.jsonl"
    records = [{"custom_id": cid, "prompt": f"review {cid}"} for cid in ids]
    build_request_file(records, path, spec, model="m", output_schema=given)
    return bytes(path.read_bytes())


@pytest.mark.parametrize("given", [Review, REVIEW_DICT], ids=["pydantic", "dict"])
def test_answers_to_a_schema_are_valid_except_the_invalid_pattern(
    emu: Emulator, spec: VendorSpec, given: Any, tmp_path: Any
) -> None:
    ids = [f"ok-{i}" for i in range(6)] + ["badjson-1", "badjson-2", "badjson-3", "badjson-4"]
    batch, client = _run(emu, spec, _built(spec, tmp_path, ids, given))
    answers = _answers(client, batch)
    schema = OutputSchema.of(given)
    parsed = {cid: schema.parse(text) for cid, text in answers.items()}
    assert all(parsed[f"ok-{i}"][1] is None for i in range(6))
    assert len({parsed[f"ok-{i}"][0]["label"] for i in range(6)}) > 1  # answers vary by custom_id
    bad = {cid: parsed[cid][1] for cid in ids if cid.startswith("badjson")}
    assert all(error is not None for error in bad.values())
    # Both kinds of invalid answer: prose, and JSON missing a required field.
    assert any(answers[cid] == NOT_JSON_ANSWER for cid in bad)
    assert any(answers[cid].startswith("{") for cid in bad)
    client.close()


def test_a_canned_reply_wins_over_the_schema(emu: Emulator, tmp_path: Any) -> None:
    spec = REGISTRY["openai"]
    path = tmp_path / "requests.jsonl"
    records = [
        {"custom_id": "badjson-x", "prompt": "canned please"},
        {"custom_id": "c", "prompt": "canned too"},
    ]
    build_request_file(records, path, spec, model="m", output_schema=REVIEW_DICT)
    batch, client = _run(emu, spec, path.read_bytes())
    assert set(_answers(client, batch).values()) == {'{"label": "negative", "score": 2}'}
    client.close()


def test_the_rejected_response_format_fails_the_request_like_the_vendor(
    emu: Emulator, spec: VendorSpec
) -> None:
    fmt, param = REJECTED[spec.name]
    lines = []
    for cid, extra in (("plain", {}), ("asks", {"response_format": fmt})):
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], **extra}
        lines.append(
            json.dumps({"custom_id": cid, "method": "POST", "url": spec.default_endpoint, "body": body})
        )
    batch, client = _run(emu, spec, ("\n".join(lines) + "\n").encode())
    assert batch["request_counts"]["completed"] == 1
    assert batch["request_counts"]["failed"] == 1
    [error] = client.lines(batch["error_file_id"])
    status, code = spec.errors.codes["bad_request"]
    assert error["custom_id"] == "asks"
    assert (error["response"]["status_code"], error["error"]["code"]) == (status, code)
    if param == "body.messages":
        assert "must contain the word 'json'" in error["error"]["message"]
    else:
        assert error["error"]["message"].startswith(f"{param}: expected one of 'json_object', 'text'")
    assert set(_answers(client, batch)) == {"plain"}
    client.close()


def test_a_vendor_that_refuses_it_in_the_file_refuses_the_upload(tmp_path: Any) -> None:
    zhipu = REGISTRY["zhipu"]
    assert zhipu.structured_output is not None
    at_upload = dataclasses.replace(
        zhipu, structured_output=dataclasses.replace(zhipu.structured_output, rejected_at="file")
    )
    assert dialect_of(at_upload).validation_stage == "upload"
    fmt, _ = REJECTED["zhipu"]
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    line = json.dumps({"custom_id": "a", "method": "POST", "url": zhipu.default_endpoint, "body": body})
    with Emulator(EmulatorConfig(time_scale=0.0, vendors={"zhipu": at_upload})) as server:
        client = VendorClient(server, at_upload)
        response = client.upload((line + "\n").encode())
        assert_error_body(at_upload, response, "bad_request")
        assert response.json()["error"]["message"].startswith("line 1: body.response_format.type")
        assert server.stats("zhipu")["files"] == 0
        client.close()


def test_plain_requests_are_still_echoed() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert json_answer(body, "badjson-1", invalid=True) is None
    assert json_answer({**body, "response_format": {"type": "text"}}, "a", invalid=False) is None
    assert json_answer({**body, "response_format": {"type": "json_object"}}, "a", invalid=False) == "{}"


class Dated(BaseModel):
    when: date
    at: datetime
    id: UUID
    count: int = Field(gt=0, lt=2)
    code: str = Field(min_length=12)


def test_answers_to_formatted_and_bounded_fields_are_valid(
    emu: Emulator, spec: VendorSpec, tmp_path: Any
) -> None:
    ids = [f"ok-{i}" for i in range(6)]
    batch, client = _run(emu, spec, _built(spec, tmp_path, ids, Dated))
    schema = OutputSchema.of(Dated)
    problems = {cid: schema.parse(text)[1] for cid, text in _answers(client, batch).items()}
    assert problems == dict.fromkeys(ids)
    client.close()
