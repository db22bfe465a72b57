"""The common-ai batch adapters, method by method, against the emulator over loopback."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import pytest
from aikit import JSON_PROMPT
from airflow.providers.common.ai.batch import dispatch, results
from airflow.providers.common.ai.batch.output_schema import build_output_spec
from airflow.providers.common.ai.exceptions import (
    BatchProviderNotYetSupportedError,
    LLMBatchInputError,
    LLMBatchLimitExceededError,
    LLMBatchModelMismatchError,
)
from airflow.sdk import ObjectStoragePath
from pydantic import BaseModel

from airflow_provider_llmbatch.common_ai import ADAPTERS, VendorBatchAdapter, model_prefix
from airflow_provider_llmbatch.common_ai.adapter import orphan_key
from airflow_provider_llmbatch.common_ai.request_lines import (
    chat_endpoint,
)
from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.faults import FaultRule
from airflow_provider_llmbatch.exceptions import AuthenticationError, NotFoundError, ServerError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.uploads import upload_name
from airflow_provider_llmbatch.operators.reattach import KEY_METADATA
from airflow_provider_llmbatch.schema import OutputSchema, schema_name
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

VENDORS = sorted(REGISTRY)
KEY16 = "0123456789abcdef"
FINGERPRINT = "f" * 64
PLAIN = build_output_spec(str)


class Ticket(BaseModel):
    label: Literal["billing", "delivery", "other"]
    urgent: bool


STRUCTURED = build_output_spec(Ticket)
AdapterOn = Callable[[str], VendorBatchAdapter]


def _submit(adapter: VendorBatchAdapter, prompts: list[str], **kwargs: object) -> str:
    requests = [{"prompt": p} for p in prompts]
    spec = kwargs.pop("output_spec", PLAIN)
    common = {"model": "test-model", "idempotency_key": KEY16, "output_spec": spec, **kwargs}
    adapter.validate_requests(requests, **common)  # type: ignore[arg-type]
    return adapter.submit(requests, input_fingerprint=FINGERPRINT, completion_window="24h", **common).batch_id  # type: ignore[arg-type]


def _uploaded_lines(emulator: Emulator, vendor: str, file_id: str) -> list[dict[str, object]]:
    text = emulator.file_path(vendor, file_id).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- what the registry decides -------------------------------------------------------------------------


def test_entry_points_serve_every_registry_vendor() -> None:
    loaded = {ep.name: ep.load() for ep in entry_points(group=dispatch.ENTRY_POINT_GROUP)}
    ours = {
        name: cls for name, cls in loaded.items() if cls.__module__.startswith("airflow_provider_llmbatch")
    }
    assert {cls.vendor.name for cls in ours.values()} == set(REGISTRY)
    for name, cls in ours.items():
        spec = cls.vendor
        assert name == cls.name == model_prefix(spec)
        assert cls.conn_types == frozenset({spec.conn_type})
        assert cls.max_requests == spec.limits.max_requests
        assert cls.max_payload_bytes == spec.limits.max_file_bytes
        assert ADAPTERS[spec.name] is cls


@pytest.mark.parametrize("vendor", VENDORS)
def test_dispatch_picks_the_adapter_by_prefix_and_checks_the_connection_type(vendor: str) -> None:
    cls = ADAPTERS[vendor]
    assert dispatch.get_adapter_class(REGISTRY[vendor].conn_type, f"{cls.name}:some-model") is cls
    other = next(spec for name, spec in REGISTRY.items() if name != vendor)
    with pytest.raises(BatchProviderNotYetSupportedError, match=REGISTRY[vendor].conn_type):
        dispatch.get_adapter_class(other.conn_type, f"{cls.name}:some-model")


def test_the_generic_vendor_does_not_shadow_common_ais_openai_adapter() -> None:
    # common-ai resolves "openai:" to its own adapter, which does not take our connection type.
    with pytest.raises(BatchProviderNotYetSupportedError):
        dispatch.get_adapter_class(REGISTRY["openai"].conn_type, "openai:gpt-4o-mini")


@pytest.mark.parametrize("vendor", VENDORS)
def test_built_from_a_connection_as_common_ai_builds_it(
    vendor: str, instant: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in instant.airflow_conn_env(vendor, "ai_conn").items():
        monkeypatch.setenv(key, value)
    adapter = dispatch.build_adapter(ADAPTERS[vendor].name, llm_conn_id="ai_conn")
    try:
        assert isinstance(adapter, ADAPTERS[vendor])
        # common-ai's operator recognises a vanished batch by status_code 404 and submits afresh.
        with pytest.raises(NotFoundError) as caught:
            adapter.get_batch("batch_does_not_exist")
        assert caught.value.status_code == 404
    finally:
        adapter.close()


def test_a_connection_without_a_key_is_refused_before_any_call() -> None:
    with pytest.raises(LLMBatchInputError, match="password"):
        ADAPTERS["zhipu"](api_key=None, base_url="http://127.0.0.1:9")


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_wrong_key_fails_without_showing_the_key(vendor: str, instant: Emulator) -> None:
    secret = "sk-wrong-0123456789-secret"
    adapter = ADAPTERS[vendor](api_key=secret, base_url=instant.base_url(vendor))
    try:
        with pytest.raises(AuthenticationError) as caught:
            adapter.get_batch("batch_x")
    finally:
        adapter.close()
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value.__dict__)


# -- validate_requests: nothing is sent for a batch the vendor would refuse ---------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_more_requests_than_one_file_takes_are_refused(
    vendor: str, adapter_on: AdapterOn, instant: Emulator
) -> None:
    adapter = adapter_on(vendor)
    prompts = [{"prompt": "x"}] * (adapter.max_requests + 1)
    with pytest.raises(LLMBatchLimitExceededError, match=r"\.expand\(\)"):
        adapter.validate_requests(prompts, model="m", output_spec=PLAIN, idempotency_key=KEY16)  # type: ignore[arg-type]
    assert instant.stats(vendor)["files_uploaded"] == 0


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_file_over_the_byte_limit_is_refused_counting_the_schema(vendor: str, instant: Emulator) -> None:
    small = type("Small", (ADAPTERS[vendor],), {"max_payload_bytes": 2000})
    adapter = small(api_key=instant.api_key, base_url=instant.base_url(vendor))
    requests = [{"prompt": f"ticket {i}"} for i in range(5)]
    # Plain prompts fit; the schema the structured request repeats in every line does not.
    adapter.validate_requests(requests, model="m", output_spec=PLAIN, idempotency_key=KEY16)
    with pytest.raises(LLMBatchLimitExceededError, match="at most 2000 bytes"):
        adapter.validate_requests(requests, model="m", output_spec=STRUCTURED, idempotency_key=KEY16)
    adapter.close()


FORBIDDEN = [(name, key) for name in VENDORS for key in sorted(REGISTRY[name].forbidden_body_keys)]


@pytest.mark.parametrize(("vendor", "key"), FORBIDDEN)
def test_a_body_key_the_vendor_forbids_is_refused_naming_it(
    vendor: str, key: str, adapter_on: AdapterOn
) -> None:
    adapter = adapter_on(vendor)
    requests = [{"prompt": "a"}, {"prompt": "b", "params": {key: 1}}]
    with pytest.raises(LLMBatchInputError, match=rf"line 2: body\.{key}") as caught:
        adapter.validate_requests(requests, model="m", output_spec=PLAIN, idempotency_key=KEY16)  # type: ignore[arg-type]
    assert "request N - 1" in str(caught.value)
    # The same key as a batch-wide parameter is refused for every line.
    with pytest.raises(LLMBatchInputError, match=rf"line 1: body\.{key}"):
        adapter.validate_requests(
            [{"prompt": "a"}], model="m", output_spec=PLAIN, idempotency_key=KEY16, request_params={key: 1}
        )


@pytest.mark.parametrize("vendor", [v for v in VENDORS if not REGISTRY[v].forbidden_body_keys])
def test_sampling_parameters_pass_where_the_vendor_allows_them(vendor: str, adapter_on: AdapterOn) -> None:
    adapter_on(vendor).validate_requests(
        [{"prompt": "a"}],
        model="m",
        output_spec=PLAIN,
        idempotency_key=KEY16,
        request_params={"temperature": 0.2},
    )


@pytest.mark.parametrize("vendor", VENDORS)
def test_one_model_per_batch_and_only_this_vendors_prefix(vendor: str, adapter_on: AdapterOn) -> None:
    adapter = adapter_on(vendor)
    prefix = adapter.name
    same = [{"prompt": "a"}, {"prompt": "b", "model": f"{prefix}:m"}]
    adapter.validate_requests(same, model="m", output_spec=PLAIN, idempotency_key=KEY16)  # type: ignore[arg-type]
    with pytest.raises(LLMBatchModelMismatchError, match="one model per batch"):
        adapter.validate_requests(
            [{"prompt": "a"}, {"prompt": "b", "model": f"{prefix}:other"}],  # type: ignore[list-item]
            model="m",
            output_spec=PLAIN,
            idempotency_key=KEY16,
        )
    with pytest.raises(LLMBatchModelMismatchError, match="does not resolve"):
        adapter.validate_requests(
            [{"prompt": "a", "model": "anthropic:claude"}],  # type: ignore[list-item]
            model="m",
            output_spec=PLAIN,
            idempotency_key=KEY16,
        )


# -- submit: one upload, one batch, tagged for the orphan look-up -------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_submit_uploads_the_lines_and_tags_the_batch(
    vendor: str, adapter_on: AdapterOn, instant: Emulator
) -> None:
    adapter = adapter_on(vendor)
    requests = [{"prompt": "hello"}, {"prompt": "again", "system_prompt": "own", "max_tokens": 7}]
    result = adapter.submit(
        requests,  # type: ignore[arg-type]
        model="test-model",
        idempotency_key=KEY16,
        input_fingerprint=FINGERPRINT,
        output_spec=PLAIN,
        system_prompt="be brief",
        max_tokens=99,
        request_params={"seed": 3},
        completion_window="24h",
    )
    # The request file first: Zhipu deletes it once the batch is done (its auto_delete_input_file default).
    key = orphan_key(KEY16, FINGERPRINT)
    [stored] = [f for f in instant.files(vendor) if f["id"] == result.provider_input_ref]
    assert stored["filename"] == upload_name(key)
    lines = _uploaded_lines(instant, vendor, result.provider_input_ref or "")
    stats = instant.stats(vendor)
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)
    batch = instant.batch(vendor, result.batch_id)
    assert batch["metadata"][KEY_METADATA] == key
    assert batch["input_file_id"] == result.provider_input_ref
    assert batch["endpoint"] == chat_endpoint(REGISTRY[vendor]).path
    assert [line["custom_id"] for line in lines] == [f"{KEY16}-0", f"{KEY16}-1"]
    assert {line["url"] for line in lines} == {chat_endpoint(REGISTRY[vendor]).path}
    first, second = (line["body"] for line in lines)
    assert first == {
        "seed": 3,
        "model": "test-model",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "max_tokens": 99,
    }
    assert second["messages"][0] == {"role": "system", "content": "own"}  # type: ignore[index]
    assert second["max_tokens"] == 7  # type: ignore[index]


@pytest.mark.parametrize("vendor", VENDORS)
def test_structured_output_is_asked_for_as_the_registry_says(
    vendor: str, adapter_on: AdapterOn, instant: Emulator
) -> None:
    adapter = adapter_on(vendor)
    structured = REGISTRY[vendor].structured_output
    assert structured is not None
    directive = adapter.build_output_directive(STRUCTURED)
    assert adapter.build_output_directive(PLAIN) == {}
    assert directive["response_format"]["type"] == structured.request_type
    _submit(adapter, ["hello"], output_spec=STRUCTURED, system_prompt="triage")
    [uploaded] = instant.files(vendor)
    [line] = _uploaded_lines(instant, vendor, uploaded["id"])
    body = line["body"]
    assert body["response_format"] == directive["response_format"]  # type: ignore[index]
    # What the provider's own operators send for the same schema and prompt: one decision, in the registry.
    expected: dict[str, Any] = {"messages": [{"role": "system", "content": "triage"}]}
    schema = OutputSchema.of(STRUCTURED.json_schema)
    named = dataclasses.replace(schema, name=schema_name(STRUCTURED.schema_name), strict=False)
    structured.apply(expected, named)
    assert body["messages"][0] == expected["messages"][0]  # type: ignore[index]
    assert body["response_format"] == expected["response_format"]  # type: ignore[index]
    if structured.request_type == "json_object":
        # JSON mode enforces no schema: the model is told it, after the user's own system prompt.
        assert body["messages"][0]["content"].startswith("triage\n\n")  # type: ignore[index]
    else:
        assert directive["response_format"]["json_schema"]["schema"] == STRUCTURED.json_schema
        assert directive["response_format"]["json_schema"]["strict"] is False


def test_a_window_the_vendor_refuses_is_refused_before_the_upload(
    adapter_on: AdapterOn, instant: Emulator
) -> None:
    adapter = adapter_on("openai")
    with pytest.raises(LLMBatchInputError, match="completion_window"):
        adapter.submit(
            [{"prompt": "a"}],
            model="m",
            idempotency_key=KEY16,
            input_fingerprint=FINGERPRINT,
            output_spec=PLAIN,
            completion_window="7d",
        )
    assert instant.stats("openai")["files_uploaded"] == 0


# -- status, cancel --------------------------------------------------------------------------------------

FORCED = [
    ("validating", "in_progress"),
    ("in_progress", "in_progress"),
    ("finalizing", "in_progress"),
    ("cancelling", "in_progress"),
    ("completed", "completed"),
    ("failed", "failed"),
    ("expired", "expired"),
    ("cancelled", "cancelled"),
]


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("forced", "expected"), FORCED)
def test_status_in_common_ais_words(vendor: str, forced: str, expected: str, emulator: Emulator) -> None:
    adapter = ADAPTERS[vendor](api_key=emulator.api_key, base_url=emulator.base_url(vendor))
    try:
        batch_id = _submit(adapter, ["a", "b", "c"])
        emulator.force_status(vendor, batch_id, forced)
        state = adapter.get_batch(batch_id)
    finally:
        adapter.close()
    assert state.status == expected
    if state.counts is not None:
        assert set(state.counts) == {"succeeded", "errored", "expired", "cancelled"}
        assert sum(state.counts.values()) <= 3


@pytest.mark.parametrize("vendor", VENDORS)
def test_counts_split_what_never_ran_by_how_the_batch_ended(vendor: str, emulator: Emulator) -> None:
    adapter = ADAPTERS[vendor](api_key=emulator.api_key, base_url=emulator.base_url(vendor))
    try:
        batch_id = _submit(adapter, ["a", "b", "c", "d"])
        emulator.force_status(vendor, batch_id, "expired")
        state = adapter.get_batch(batch_id)
        items = list(adapter.iter_results(batch_id))
    finally:
        adapter.close()
    assert state.status == "expired"
    assert state.counts is not None
    assert state.counts["succeeded"] + state.counts["errored"] + state.counts["expired"] == 4
    # A request that never ran is reported as expired, not as an error of the request.
    never_ran = [item for item in items if item.provider_status == "expired"]
    assert len(never_ran) == 4 - state.counts["succeeded"] - state.counts["errored"]
    assert all(item.error and item.error["provider_code"] == "batch_expired" for item in never_ran)


@pytest.mark.parametrize("vendor", VENDORS)
def test_cancel_asks_the_vendor_and_tolerates_a_finished_batch(vendor: str, emulator: Emulator) -> None:
    adapter = ADAPTERS[vendor](api_key=emulator.api_key, base_url=emulator.base_url(vendor))
    try:
        running = _submit(adapter, ["a"])
        emulator.force_status(vendor, running, "in_progress")
        adapter.cancel_batch(running)
        assert emulator.batch(vendor, running)["status"] in ("cancelling", "cancelled")
        done = _submit(adapter, ["b"])
        emulator.force_status(vendor, done, "completed")
        adapter.cancel_batch(done)
        assert emulator.batch(vendor, done)["status"] == "completed"
    finally:
        adapter.close()


# -- results ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_common_ai_lands_every_row_from_the_adapters_results(
    vendor: str, adapter_on: AdapterOn, tmp_path: Path
) -> None:
    adapter = adapter_on(vendor)
    prompts = [f"{JSON_PROMPT} refund", "fails (custom id -1)", f"{JSON_PROMPT} late", "not json"]
    batch_id = _submit(adapter, prompts, output_spec=STRUCTURED)
    assert adapter.get_batch(batch_id).status == "completed"
    destination = ObjectStoragePath(f"file://{tmp_path}/rows.jsonl")
    counts, diagnostics = results.stream_results_to_jsonl(
        adapter=adapter,
        batch_id=batch_id,
        output_spec=STRUCTURED,
        request_count=len(prompts),
        custom_id_prefix=KEY16,
        destination=destination,
    )
    rows = {row["index"]: row for row in map(json.loads, (tmp_path / "rows.jsonl").read_text().splitlines())}
    assert counts == {
        "success": 2,
        "error": 1,
        "invalid_output": 1,
        "expired": 0,
        "cancelled": 0,
        "missing": 0,
    }
    assert diagnostics.duplicate_result_count == diagnostics.out_of_range_result_count == 0
    # The fenced JSON answers were unwrapped and validated against the schema.
    assert rows[0]["output"] == rows[2]["output"] == {"label": "billing", "urgent": True}
    assert rows[0]["usage"]["input_tokens"] > 0
    assert rows[0]["finish_reason"] == "stop"
    assert rows[1]["status"] == "error"
    assert rows[1]["error"]["stage"] == "provider"
    assert rows[1]["error"]["provider_code"]
    assert rows[3]["status"] == "invalid_output"
    assert rows[3]["raw_output"].startswith("echo: not json")


@pytest.mark.parametrize("vendor", VENDORS)
def test_plain_text_answers_come_back_as_text(vendor: str, adapter_on: AdapterOn) -> None:
    adapter = adapter_on(vendor)
    batch_id = _submit(adapter, ["hello there"])
    [item] = list(adapter.iter_results(batch_id))
    assert item.provider_status == "success"
    extracted = adapter.extract_output(item, PLAIN)
    assert (extracted.kind, extracted.text) == ("text", "echo: hello there")


def test_unknown_batch_fails_when_asked_not_when_iterated(adapter_on: AdapterOn) -> None:
    with pytest.raises(NotFoundError):
        adapter_on("zhipu").iter_results("batch_nope")


# -- find_orphaned_batch: the lost answer of a create -----------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_an_orphaned_batch_is_found_by_key_fingerprint_and_time(vendor: str, adapter_on: AdapterOn) -> None:
    adapter = adapter_on(vendor)
    before = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    batch_id = _submit(adapter, ["a", "b"])
    assert adapter.find_orphaned_batch(KEY16, FINGERPRINT, before) == batch_id
    assert adapter.find_orphaned_batch(KEY16, "e" * 64, before) is None
    assert adapter.find_orphaned_batch("fedcba9876543210", FINGERPRINT, before) is None
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert adapter.find_orphaned_batch(KEY16, FINGERPRINT, later) is None


def test_the_newest_of_two_matching_batches_wins(adapter_on: AdapterOn, instant: Emulator) -> None:
    adapter = adapter_on("moonshot")
    first = _submit(adapter, ["a"])
    instant.advance_clock(5)
    second = _submit(adapter, ["a"])
    assert first != second
    assert adapter.find_orphaned_batch(KEY16, FINGERPRINT, "") == second


def test_a_failed_look_up_raises_rather_than_reporting_nothing(
    emulator: Emulator, connect: Callable[..., str]
) -> None:
    hook = BatchHook(connect("dashscope"))  # max_retries 0: the fault is seen at once
    adapter = ADAPTERS["dashscope"](client=hook)
    emulator.add_fault(FaultRule(kind="500", vendor="dashscope", operation="list_batches", times=None))
    try:
        with pytest.raises(ServerError):
            adapter.find_orphaned_batch(KEY16, FINGERPRINT, "")
    finally:
        adapter.close()
