"""
``example_llmbatch_typed`` under ``dag.test()``: typed Parquet rows, invalid outputs kept, counts that add up.

The emulator answers every review with JSON built from ``Review``'s schema, except three reviews (chosen
by ``invalid_output_custom_id_pattern``) whose answers do not parse or lack a field: those land as
``invalid_output`` rows with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from airflow_env import REVIEWS_FILE, env_for, failing_tail, load_example, migrated_template, read_jsonl

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig

DAG_ID = "example_llmbatch_typed"
INVALID = {"R-10003", "R-10007", "R-10013"}
REVIEWS = read_jsonl(REVIEWS_FILE)


@pytest.fixture(scope="module")
def typed_emulator() -> Iterator[Emulator]:
    pattern = "^(" + "|".join(sorted(INVALID)) + ")$"
    with Emulator(EmulatorConfig(time_scale=1.0, invalid_output_custom_id_pattern=pattern)) as emulator:
        yield emulator


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_example_typed_lands_a_parquet_file_matching_the_model(
    tmp_path_factory: pytest.TempPathFactory, typed_emulator: Emulator
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    example = load_example(DAG_ID)
    airflow = migrated_template(tmp_path_factory).clone(tmp_path_factory.mktemp("typed") / "airflow-home")

    (run,) = airflow.run_dag_tests([DAG_ID], env=env_for(typed_emulator), timeout=240)

    assert run.succeeded, f"{run.error}\n{failing_tail(run.log_path)}"
    assert run.deferrals, "the task should have deferred while the batch ran"
    manifest, summary = run.xcoms["label_reviews"], run.xcoms["aggregate"]

    # The Parquet file's columns: the model's fields typed from it, beside the row's bookkeeping.
    table = pq.read_table(manifest["result_uri"].removeprefix("file://"))
    fields = {f.name: f.type for f in table.schema}
    assert set(example.Review.model_fields) <= set(fields)
    assert pa.types.is_integer(fields["score"])
    assert pa.types.is_string(fields["summary"]) or pa.types.is_large_string(fields["summary"])
    assert pa.types.is_dictionary(fields["sentiment"]) or pa.types.is_string(fields["sentiment"])
    for column in ("custom_id", "status", "attempts", "error", "prompt_tokens", "completion_tokens"):
        assert column in fields

    rows = table.to_pylist()
    assert [r["custom_id"] for r in rows] == [r["review_id"] for r in REVIEWS]
    invalid = [r for r in rows if r["status"] == "invalid_output"]
    assert {r["custom_id"] for r in invalid} == INVALID
    assert all(r["error"] and r["error"]["message"] for r in invalid)
    assert all(r["sentiment"] is None for r in invalid)
    valid = [r for r in rows if r["status"] == "succeeded"]
    assert all(r["sentiment"] in ("positive", "negative", "neutral", "mixed") for r in valid)

    # Counts add up, in the manifest and in the downstream aggregate.
    counts = manifest["counts"]
    assert counts["total"] == len(REVIEWS) == summary["rows"]
    assert counts["invalid_output"] == len(INVALID) == summary["invalid_output"]
    assert counts["succeeded"] == len(REVIEWS) - len(INVALID) == summary["valid"]
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert sum(summary["sentiment"].values()) == summary["valid"]

    # The estimate was made and guarded before upload; the vendor's usage is reported beside it.
    estimate = manifest["estimate"]
    assert 0 < estimate["input_tokens"] <= example.MAX_INPUT_TOKENS
    assert estimate["cost"]["currency"] == "CNY"
    assert estimate["cost"]["amount"] <= example.MAX_COST
    assert summary["prompt_tokens"] == manifest["usage"]["prompt_tokens"] > 0
    assert len(typed_emulator.batches("zhipu")) == 1
