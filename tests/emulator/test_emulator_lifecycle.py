from __future__ import annotations

import pytest

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.emulator.testing import VendorClient, assert_error_body
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.result_lines import ResultLine
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

pytestmark = pytest.mark.integration

IDS = ["a1", "fail-2", "a3", "a4"]


def _counts(batch: dict) -> tuple[int, int, int]:  # type: ignore[type-arg]
    c = batch["request_counts"]
    return c["total"], c["completed"], c["failed"]


def test_batch_runs_to_completed_through_every_phase(frozen_api: VendorClient, spec: VendorSpec) -> None:
    emu = frozen_api.emulator
    created = frozen_api.batch_from(IDS)
    assert created["status"] == "validating"
    assert created["object"] == "batch"
    if dialect_of(spec).null_counts_while_validating:
        assert created["request_counts"] == {"total": None, "completed": None, "failed": None}
    else:
        assert _counts(created) == (4, 0, 0)
    assert (
        created["output_file_id"]
        == created["error_file_id"]
        == ("" if dialect_of(spec).empty_file_id == "empty_string" else None)
    )
    assert created["completion_window"] == (
        dialect_of(spec).completion_window_echo or spec.completion_window.default
    )
    assert ("errors" in created) is dialect_of(spec).batch_has_errors
    assert ("expired_at" in created) is dialect_of(spec).batch_has_expired_at
    batch_id = created["id"]

    emu.advance_clock(0.2)
    assert frozen_api.get(batch_id)["status"] == "in_progress"
    emu.advance_clock(0.5)
    half = frozen_api.get(batch_id)
    assert half["status"] == "in_progress"
    assert _counts(half) == (4, 1, 1)
    emu.advance_clock(0.5)
    assert frozen_api.get(batch_id)["status"] == "finalizing"
    emu.advance_clock(0.2)
    done = frozen_api.get(batch_id)
    assert done["status"] == "completed"
    assert _counts(done) == (4, 3, 1)
    parsed = Batch.model_validate(done)
    assert parsed.is_terminal
    assert parsed.created_at is not None
    assert parsed.completed_at is not None
    assert (parsed.completed_at - parsed.created_at).total_seconds() == pytest.approx(
        1.4, abs=1.0
    )  # whole seconds for most vendors
    assert done["error_file_id"].startswith(dialect_of(spec).error_file_id_prefix)

    outputs = frozen_api.lines(done["output_file_id"])
    assert [line["custom_id"] for line in outputs] == ["a1", "a3", "a4"]
    for line in outputs:
        parsed_line = ResultLine.model_validate(line)
        assert parsed_line.succeeded
        assert ("error" in line) is dialect_of(spec).result_format.error_key_on_success
        body = line["response"]["body"]
        assert body["choices"][0]["message"]["content"] == f"echo: say hello to {line['custom_id']}"
        assert (
            body["usage"]["total_tokens"]
            == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        )
        assert body["usage"]["prompt_tokens"] == 4
    errors = frozen_api.lines(done["error_file_id"])
    assert [line["custom_id"] for line in errors] == ["fail-2"]
    failed_line = ResultLine.model_validate(errors[0])
    assert not failed_line.succeeded
    assert failed_line.error_code == "invalid_request"
    assert emu.stats(spec.name)["batches_created"] == 1


def test_result_line_ids_and_request_ids_follow_the_format(
    frozen_api: VendorClient, spec: VendorSpec
) -> None:
    created = frozen_api.batch_from(["x1", "x2"])
    frozen_api.emulator.advance_clock(10)
    done = frozen_api.get(created["id"])
    lines = frozen_api.lines(done["output_file_id"])
    fmt = dialect_of(spec).result_format
    for line in lines:
        response = line["response"]
        if fmt.line_id == "batch_id":
            assert line["id"] == created["id"]
        elif fmt.line_id == "custom_id":
            assert line["id"] == line["custom_id"]
        elif fmt.line_id == "batch_request":
            assert line["id"].startswith("batch_req_")
        else:
            assert len(line["id"]) == 36
        if fmt.request_id == "in_body":
            assert "request_id" not in response
            assert response["body"]["request_id"]
        elif fmt.request_id == "empty":
            assert response["request_id"] == ""
        else:
            assert response["request_id"]
    assert len({line["id"] for line in lines}) == (1 if fmt.line_id == "batch_id" else 2)


@pytest.mark.parametrize(
    "spec",
    [s for s in REGISTRY.values() if any(e.kind == "embeddings" for e in s.endpoints)],
    ids=lambda s: s.name,
)
def test_embeddings_get_deterministic_vectors(frozen_api: VendorClient, spec: VendorSpec) -> None:
    endpoint = next(e.path for e in spec.endpoints if e.kind == "embeddings")
    first = frozen_api.batch_from(["e1", "e2"], endpoint=endpoint)
    second = frozen_api.batch_from(["e1", "e2"], endpoint=endpoint)
    frozen_api.emulator.advance_clock(10)
    vectors = []
    for batch in (first, second):
        lines = frozen_api.lines(frozen_api.get(batch["id"])["output_file_id"])
        vectors.append([line["response"]["body"]["data"][0]["embedding"] for line in lines])
    assert vectors[0] == vectors[1]
    assert vectors[0][0] != vectors[0][1]
    assert len(vectors[0][0]) == 8


@pytest.mark.parametrize("outcome", ["completed", "failed", "expired", "cancelled"])
def test_emulator_outcome_metadata_forces_the_end(
    frozen_api: VendorClient, spec: VendorSpec, outcome: str
) -> None:
    created = frozen_api.batch_from(["a1", "a2", "a3", "a4"], metadata={"emulator_outcome": outcome})
    frozen_api.emulator.advance_clock(10)
    done = frozen_api.get(created["id"])
    assert done["status"] == outcome
    _, completed, failed = _counts(done)
    if outcome == "completed":
        assert (completed, failed) == (4, 0)
    elif outcome == "failed":
        assert done["output_file_id"] in (None, "")
        if dialect_of(spec).batch_has_errors:
            assert done["errors"]["data"][0]["code"] == "emulator_outcome"
    elif outcome == "expired":
        assert completed == 2
        expired_lines = frozen_api.lines(done["error_file_id"])
        assert [line["error"]["code"] for line in expired_lines] == ["batch_expired", "batch_expired"]
        assert len(frozen_api.lines(done["output_file_id"])) == 2
    else:
        assert completed == 2
        assert done["cancelling_at"] is not None
        assert failed == (2 if dialect_of(spec).cancel_counts_unfinished_as_failed else 0)


def test_cancel_moves_through_cancelling(frozen_api: VendorClient, spec: VendorSpec) -> None:
    created = frozen_api.batch_from(IDS)
    frozen_api.emulator.advance_clock(0.7)
    response = frozen_api.http.post(f"/batches/{created['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelling"
    again = frozen_api.http.post(f"/batches/{created['id']}/cancel")
    assert again.json()["status"] == "cancelling"
    frozen_api.emulator.advance_clock(0.2)
    cancelled = frozen_api.get(created["id"])
    assert cancelled["status"] == "cancelled"
    total, completed, failed = _counts(cancelled)
    assert (total, completed) == (4, 1)
    assert failed == (3 if dialect_of(spec).cancel_counts_unfinished_as_failed else 1)
    assert frozen_api.emulator.stats(spec.name)["cancels"] == 1


def test_cancel_of_a_finished_batch_is_refused_in_dialect(frozen_api: VendorClient, spec: VendorSpec) -> None:
    created = frozen_api.batch_from(["a"])
    frozen_api.emulator.advance_clock(10)
    response = frozen_api.http.post(f"/batches/{created['id']}/cancel")
    assert_error_body(spec, response, "conflict", status=spec.cancel_terminal_status)
    assert frozen_api.get(created["id"])["status"] == "completed"


def test_unknown_batch_is_404_in_dialect(frozen_api: VendorClient, spec: VendorSpec) -> None:
    assert_error_body(spec, frozen_api.http.get("/batches/batch_nope"), "not_found")
    assert_error_body(spec, frozen_api.http.post("/batches/batch_nope/cancel"), "not_found")


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing", "cancelling"])
def test_force_status_holds_a_running_status(frozen_api: VendorClient, spec: VendorSpec, status: str) -> None:
    created = frozen_api.batch_from(["a"])
    forced = frozen_api.emulator.force_status(spec.name, created["id"], status)
    assert forced["status"] == status
    frozen_api.emulator.advance_clock(100)
    assert frozen_api.get(created["id"])["status"] == status


@pytest.mark.parametrize("status", ["completed", "failed", "expired", "cancelled"])
def test_force_status_ends_a_batch(frozen_api: VendorClient, spec: VendorSpec, status: str) -> None:
    created = frozen_api.batch_from(["a", "b"])
    frozen_api.emulator.force_status(spec.name, created["id"], status)
    batch = frozen_api.get(created["id"])
    assert batch["status"] == status
    assert batch.get(f"{status}_at", "absent") is not None
    if status == "completed":
        assert len(frozen_api.lines(batch["output_file_id"])) == 2
    if status == "expired":
        assert len(frozen_api.lines(batch["error_file_id"])) == 2


def test_force_status_without_hold_moves_on(frozen_api: VendorClient, spec: VendorSpec) -> None:
    created = frozen_api.batch_from(["a"])
    frozen_api.emulator.force_status(spec.name, created["id"], "finalizing", hold=False)
    frozen_api.emulator.advance_clock(0.2)
    assert frozen_api.get(created["id"])["status"] == "completed"


def test_force_status_rejects_unknowns(frozen: Emulator, spec: VendorSpec) -> None:
    with pytest.raises(KeyError):
        frozen.force_status(spec.name, "batch_nope", "completed")
    client = VendorClient(frozen, spec)
    try:
        created = client.batch_from(["a"])
    finally:
        client.close()
    with pytest.raises(ValueError, match="status must be one of"):
        frozen.force_status(spec.name, created["id"], "done")


def test_window_runs_out_and_the_batch_expires(spec: VendorSpec) -> None:
    config = EmulatorConfig(window_seconds_per_hour=0.01, vendors={spec.name: spec})
    with Emulator(config, clock=lambda: 1_800_000_000.0) as emulator:
        client = VendorClient(emulator, spec)
        try:
            created = client.batch_from(["a", "b"])
            emulator.advance_clock(10)
            batch = client.get(created["id"])
        finally:
            client.close()
    assert batch["status"] == "expired"
    assert batch["request_counts"]["completed"] < 2


def test_batches_advance_with_real_time(api: VendorClient, spec: VendorSpec) -> None:
    created = api.batch_from(["a"])
    api.emulator.advance_clock(5)
    assert api.get(created["id"])["status"] == "completed"
