from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.jsonl import build_request_file, validate_request_file
from airflow_provider_llmbatch.schema import SCHEMA_PROMPT, OutputSchema
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec
from tests.structured.conftest import REVIEW_DICT, Review

EXPECTED = {
    # vendor: (what output_schema is sent as, the response_format types it takes, its page)
    "zhipu": ("json_object", {"text", "json_object"}, "https://docs.z.ai/"),
    "moonshot": ("json_object", {"text", "json_object"}, "https://platform.moonshot.ai/"),
    "dashscope": ("json_schema", {"text", "json_object", "json_schema"}, "https://www.alibabacloud.com/"),
    "openai": ("json_schema", {"text", "json_object", "json_schema"}, "https://platform.openai.com/"),
}
SPECS = list(REGISTRY.values())


@pytest.fixture(params=SPECS, ids=[s.name for s in SPECS])
def spec(request: pytest.FixtureRequest) -> VendorSpec:
    return request.param  # type: ignore[no-any-return]


def test_every_vendor_has_a_structured_output_entry_with_its_source(spec: VendorSpec) -> None:
    rules = spec.structured_output
    assert rules is not None
    request_type, accepted, page = EXPECTED[spec.name]
    assert (rules.request_type, set(rules.accepted_types)) == (request_type, accepted)
    assert rules.source.startswith(page)
    assert rules.request_type in rules.accepted_types


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("given", [Review, REVIEW_DICT], ids=["pydantic", "dict"])
def test_requests_built_from_records_ask_as_the_vendor_takes_it(
    spec: VendorSpec, given: Any, tmp_path: Path
) -> None:
    schema = OutputSchema.of(given)
    records = [
        {"custom_id": "a", "prompt": "great shoes"},
        {"custom_id": "b", "prompt": "meh", "system": "Be brief."},
    ]
    path = tmp_path / "requests.jsonl"
    report = build_request_file(records, path, spec, model="m", output_schema=given)
    assert report.lines == 2
    validate_request_file(path, spec)
    first, second = _lines(path)
    if spec.structured_output and spec.structured_output.request_type == "json_schema":
        expected = {"name": schema.name, "schema": schema.json_schema, "strict": schema.strict}
        assert first["body"]["response_format"] == {"type": "json_schema", "json_schema": expected}
        assert first["body"]["messages"] == [{"role": "user", "content": "great shoes"}]
        assert second["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
    else:
        prompt = SCHEMA_PROMPT.format(schema=schema.prompt_text())
        assert first["body"]["response_format"] == {"type": "json_object"}
        assert first["body"]["messages"][0] == {"role": "system", "content": prompt}
        # A system prompt of the record's own is kept, the schema follows it.
        assert second["body"]["messages"][0] == {"role": "system", "content": f"Be brief.\n\n{prompt}"}
        assert json.loads(prompt.rsplit("\n", 1)[1]) == schema.json_schema


def _request(spec: VendorSpec, body_extra: dict[str, Any], content: str = "hello") -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], **body_extra}
    return json.dumps({"custom_id": "x", "method": "POST", "url": spec.default_endpoint, "body": body})


REJECTED = {
    # vendor: (a response_format the vendor rejects, the field named)
    "zhipu": (
        {"type": "json_schema", "json_schema": {"name": "r", "schema": {}}},
        "body.response_format.type",
    ),
    "moonshot": (
        {"type": "json_schema", "json_schema": {"name": "r", "schema": {}}},
        "body.response_format.type",
    ),
    "dashscope": ({"type": "json_object"}, "body.messages"),
    "openai": ({"type": "json_object"}, "body.messages"),
}


def test_a_request_file_with_a_rejected_response_format_is_refused(spec: VendorSpec, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    fmt, field = REJECTED[spec.name]
    path.write_text(
        _request(spec, {}) + "\n" + _request(spec, {"response_format": fmt}).replace('"x"', '"y"') + "\n"
    )
    with pytest.raises(InvalidRequestFileError) as caught:
        validate_request_file(path, spec)
    [problem] = caught.value.problems
    assert problem.startswith(f"line 2: {field}: expected ")
    assert spec.display_name in problem


@pytest.mark.parametrize("vendor", ["openai", "dashscope"])
def test_json_mode_passes_where_the_messages_say_json(vendor: str, tmp_path: Path) -> None:
    spec = REGISTRY[vendor]
    path = tmp_path / "requests.jsonl"
    path.write_text(_request(spec, {"response_format": {"type": "json_object"}}, "Answer in JSON") + "\n")
    assert validate_request_file(path, spec).lines == 1


def test_openai_refuses_strict_with_an_open_schema(tmp_path: Path) -> None:
    spec = REGISTRY["openai"]
    open_schema = {"name": "r", "schema": Review.model_json_schema(), "strict": True}
    path = tmp_path / "requests.jsonl"
    path.write_text(
        _request(spec, {"response_format": {"type": "json_schema", "json_schema": open_schema}}) + "\n"
    )
    with pytest.raises(InvalidRequestFileError, match=r"json_schema\.schema: expected additionalProperties"):
        validate_request_file(path, spec)


def test_a_record_with_its_own_response_format_keeps_it_and_is_checked(tmp_path: Path) -> None:
    own = {"type": "json_schema", "json_schema": {"name": "r", "schema": {}}}
    record = {
        "custom_id": "a",
        "body": {"messages": [{"role": "user", "content": "x"}], "response_format": own},
    }
    with pytest.raises(InvalidRequestFileError, match=r"(record|line) 1: body\.response_format\.type"):
        build_request_file([record], tmp_path / "r.jsonl", "zhipu", model="m", output_schema=Review)
    assert not (tmp_path / "r.jsonl").exists()


def test_output_schema_is_for_chat_endpoints_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"chat endpoints, not /v1/embeddings \(embeddings\)"):
        build_request_file(
            [{"custom_id": "a", "input": "x"}],
            tmp_path / "r.jsonl",
            "openai",
            "/v1/embeddings",
            model="m",
            output_schema=Review,
        )


@pytest.mark.integration
def test_the_operator_refuses_before_anything_is_uploaded(
    connect: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.bases.operator import ExecutorSafeguard

    from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
    from tests.operators.conftest import FakeStateStore, FakeTI, make_context

    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    conn_id = connect("moonshot")
    own = {"type": "json_schema", "json_schema": {"name": "r", "schema": {}}}
    records = [
        {"custom_id": "a", "prompt": "fine"},
        {"custom_id": "b", "body": {"messages": [{"role": "user", "content": "x"}], "response_format": own}},
    ]
    op = CreateBatchOperator(
        task_id="create", conn_id=conn_id, requests=records, model="kimi", output_schema=Review
    )
    with pytest.raises(InvalidRequestFileError, match=r"body\.response_format\.type"):
        op.execute(make_context(FakeTI(), FakeStateStore()))
    assert emulator.stats("moonshot")["operations"] == {}
    assert emulator.files("moonshot") == []
