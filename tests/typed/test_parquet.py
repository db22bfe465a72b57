"""Parquet results: typed columns from the output schema, row groups, a bounded buffer, resubmission."""

from __future__ import annotations

import io
import json
import math
import sys
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, Field

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.parquet_out import ParquetSink, output_columns, pyarrow_modules
from airflow_provider_llmbatch.resubmit import retryable_ids
from airflow_provider_llmbatch.results import BatchFiles, join_results
from airflow_provider_llmbatch.schema import OutputSchema
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import FakeTI, make_context
from tests.typed.conftest import CONN_ID, Review

VENDORS = list(REGISTRY)


class Author(BaseModel):
    name: str
    karma: int | None = None


class Rich(BaseModel):
    label: Literal["positive", "negative"]
    score: float
    stars: int
    verified: bool
    note: str | None = None
    author: Author
    tags: list[str]
    aspects: list[Author]
    counts: dict[str, int]
    when: datetime
    either: int | str
    anything: Any = None


RICH_TYPES = {
    "label": pa.dictionary(pa.int32(), pa.string()),
    "score": pa.float64(),
    "stars": pa.int64(),
    "verified": pa.bool_(),
    "note": pa.string(),
    "author": pa.struct([pa.field("name", pa.string()), pa.field("karma", pa.int64())]),
    "tags": pa.list_(pa.string()),
    "aspects": pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("karma", pa.int64())])),
    "counts": pa.map_(pa.string(), pa.int64()),
    "when": pa.string(),
    "either": pa.string(),  # a union of several types: kept as JSON text
    "anything": pa.string(),
}
"""What the pydantic model implies, column by column."""

BASE = {
    "custom_id": pa.string(),
    "status": pa.string(),
    "attempts": pa.int32(),
    "error": pa.struct([pa.field("code", pa.string()), pa.field("message", pa.string())]),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "total_tokens": pa.int64(),
}

GOOD_RICH = {
    "label": "negative",
    "score": 0.25,
    "stars": 2,
    "verified": False,
    "author": {"name": "ann", "karma": 7},
    "tags": ["late", "cold"],
    "aspects": [{"name": "food"}],
    "counts": {"a": 1},
    "when": "2026-12-04T10:00:00Z",
    "either": 3,
    "anything": {"k": [1, 2]},
}


def _request(custom_id: str) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": custom_id}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def _answer(custom_id: str, content: str, tokens: int = 3) -> str:
    usage = {"prompt_tokens": tokens, "completion_tokens": 2 * tokens, "total_tokens": 3 * tokens}
    body = {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": usage}
    return json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": body}})


def _files(
    tmp_path: Path, answers: dict[str, str], errors: dict[str, str] | None = None
) -> tuple[Path, Path]:
    requests, output = tmp_path / "requests.jsonl", tmp_path / "output.jsonl"
    ids = [*answers, *(errors or {})]
    requests.write_text("".join(_request(i) + "\n" for i in ids))
    output.write_text("".join(_answer(i, text) + "\n" for i, text in answers.items()))
    if errors:
        lines = [
            {"custom_id": i, "response": None, "error": {"code": c, "message": "x"}}
            for i, c in errors.items()
        ]
        (tmp_path / "errors.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return requests, output


def test_parquet_schema_is_what_the_pydantic_model_implies(tmp_path: Path) -> None:
    requests, output = _files(tmp_path, {"ok": json.dumps(GOOD_RICH), "bad": '{"label": "positive"}'})
    destination = tmp_path / "results.parquet"

    report = join_results(
        requests, destination, output_file=output, output_schema=OutputSchema.of(Rich), format="parquet"
    )

    schema = pq.read_schema(destination)
    assert {f.name: f.type for f in schema} == {**BASE, **RICH_TYPES}
    assert schema.names[:3] == ["custom_id", "status", "attempts"]
    assert schema.names[3 : 3 + len(Rich.model_fields)] == list(Rich.model_fields)
    rows = pq.read_table(destination).to_pylist()
    ok, bad = rows
    assert ok["status"] == "succeeded"
    assert ok["label"] == "negative"
    assert ok["author"] == {"name": "ann", "karma": 7}
    assert ok["aspects"] == [{"name": "food", "karma": None}]
    assert ok["counts"] == [("a", 1)]
    assert json.loads(ok["either"]) == 3
    assert json.loads(ok["anything"]) == {"k": [1, 2]}
    assert ok["total_tokens"] == 9
    assert bad["status"] == "invalid_output"
    assert bad["error"]["code"] == "invalid_output"
    assert bad["label"] is None
    assert report.counts["invalid_output"] == 1
    assert report.counts["succeeded"] + report.counts["invalid_output"] == report.counts["total"] == 2


def test_without_a_schema_parquet_keeps_the_response(tmp_path: Path) -> None:
    requests, output = _files(tmp_path, {"a": "hello"}, {"b": "rate_limit"})

    join_results(
        requests,
        tmp_path / "r.parquet",
        output_file=output,
        error_file=tmp_path / "errors.jsonl",
        format="parquet",
    )

    table = pq.read_table(tmp_path / "r.parquet")
    assert table.schema.names == [*BASE, "response"]
    a, b = table.to_pylist()
    assert json.loads(a["response"])["choices"][0]["message"]["content"] == "hello"
    assert b["status"] == "failed"
    assert b["response"] is None
    assert b["prompt_tokens"] is None


def test_a_root_that_is_not_an_object_is_one_output_column(tmp_path: Path) -> None:
    requests, output = _files(tmp_path, {"a": '["x", "y"]', "b": "[1]"})
    schema = OutputSchema.of({"type": "array", "items": {"type": "string"}})

    join_results(requests, tmp_path / "r.parquet", output_file=output, output_schema=schema, format="parquet")

    table = pq.read_table(tmp_path / "r.parquet")
    assert table.schema.field("output").type == pa.list_(pa.string())
    assert table.column("output").to_pylist() == [["x", "y"], None]
    assert table.column("status").to_pylist() == ["succeeded", "invalid_output"]


def test_rows_land_in_row_groups_and_the_buffer_stays_bounded(tmp_path: Path) -> None:
    count, group = 2_500, 1_000
    answers = {f"r{i:05d}": json.dumps({"label": "positive", "score": i / count}) for i in range(count)}
    requests, output = _files(tmp_path, answers)

    join_results(
        requests,
        tmp_path / "r.parquet",
        output_file=output,
        output_schema=OutputSchema.of(Review),
        format="parquet",
        row_group_rows=group,
    )

    meta = pq.ParquetFile(tmp_path / "r.parquet").metadata
    assert meta.num_rows == count
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1_000, 1_000, 500]
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.column("custom_id").to_pylist() == list(answers)


def test_the_sink_never_holds_more_than_a_row_group() -> None:
    out = io.BytesIO()
    sink = ParquetSink(out, OutputSchema.of(Review), row_group_rows=64)
    row = b'{"custom_id":"x","status":"succeeded","response":null,"error":null,"usage":{},'
    lines = [row + b'"output":{"label":"neutral","score":%d},"attempts":1}\n' % i for i in range(1_000)]
    blob = b"".join(lines)
    # Fed in pieces that cut rows in half, as a writer may.
    for start in range(0, len(blob), 777):
        sink.write(blob[start : start + 777])
        assert sink.buffered_rows <= 64
    sink.close()

    assert sink.peak_buffered_rows == 64
    assert sink.row_groups == math.ceil(1_000 / 64)
    table = pq.read_table(io.BytesIO(out.getvalue()))
    assert table.column("score").to_pylist() == [float(i) for i in range(1_000)]


def test_a_row_group_is_cut_by_bytes_too() -> None:
    sink = ParquetSink(io.BytesIO(), None, row_group_rows=10_000, row_group_bytes=4_096)
    line = b'{"custom_id":"x","status":"succeeded","response":{"t":"' + b"y" * 1_000 + b'"},"usage":{}}\n'
    for _ in range(100):
        sink.write(line)
        assert sink.buffered_bytes < 4_096
    sink.close()
    assert sink.row_groups == math.ceil(100 / 4)


def test_a_field_named_like_a_column_is_refused() -> None:
    schema = OutputSchema.of({"type": "object", "properties": {"status": {"type": "string"}}})
    with pytest.raises(InvalidInputError, match=r"\['status'\] have the name of a results column"):
        output_columns(pa, schema)


def test_without_pyarrow_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(InvalidInputError, match=r"pip install 'airflow-provider-llmbatch\[parquet\]'"):
        pyarrow_modules()


def test_resubmission_reads_parquet_and_never_resends_invalid_output(tmp_path: Path) -> None:
    spec = REGISTRY["moonshot"]
    code = sorted(spec.errors.retryable_codes)[0]
    requests, output = _files(
        tmp_path, {"ok": '{"label": "positive", "score": 1}', "prose": "hmm"}, {"limited": code, "bad": "x1"}
    )
    destination = tmp_path / "r.parquet"
    join_results(
        requests,
        destination,
        batches=[BatchFiles("completed", output, tmp_path / "errors.jsonl")],
        output_schema=OutputSchema.of(Review),
        format="parquet",
    )

    assert list(retryable_ids(destination, spec, "parquet")) == ["limited"]


@pytest.mark.parametrize("vendor", VENDORS)
def test_structured_requests_land_as_parquet(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    records = [{"custom_id": f"r{i}", "prompt": f"review {i}"} for i in range(4)]
    records += [{"custom_id": f"badjson-{i}", "prompt": f"review {i}"} for i in range(2)]
    created = CreateBatchOperator(
        task_id="create", conn_id=CONN_ID, requests=records, model="test-model", output_schema=Review
    ).execute(make_context(FakeTI()))
    emu.force_status(vendor, created["batch_id"], "completed")
    destination = tmp_path / "results.parquet"

    manifest = FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=CONN_ID,
        batch_id=created["batch_id"],
        input_file=created["input_uri"],
        destination=str(destination),
        output_schema=Review,
        invalid_output_fails=False,
        format="parquet",
    ).execute(make_context(FakeTI(task_id="fetch")))

    table = pq.read_table(destination)
    assert table.schema.field("label").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("score").type == pa.float64()
    statuses = dict(
        zip(table.column("custom_id").to_pylist(), table.column("status").to_pylist(), strict=True)
    )
    assert statuses == {
        **{f"r{i}": "succeeded" for i in range(4)},
        "badjson-0": "invalid_output",
        "badjson-1": "invalid_output",
    }
    assert set(table.column("label").to_pylist()[:4]) <= {"positive", "negative", "neutral"}
    assert manifest["format"] == "parquet"
    assert manifest["counts"]["invalid_output"] == 2
    assert manifest["counts"]["total"] == 6


class Aliased(BaseModel):
    label: str = Field(alias="Label")
    größe: int = Field(alias="Größe")
    when: date
    price: Decimal


def test_aliased_fields_land_in_their_columns(tmp_path: Path) -> None:
    answer = {"Label": "good", "Größe": 3, "when": "2026-01-02", "price": "1.50"}
    requests, output = _files(tmp_path, {"a": json.dumps(answer, ensure_ascii=False)})
    destination = tmp_path / "results.parquet"

    join_results(
        requests, destination, output_file=output, output_schema=OutputSchema.of(Aliased), format="parquet"
    )

    schema = pq.read_schema(destination)
    assert schema.names[3:7] == ["Label", "Größe", "when", "price"]
    assert schema.field("price").type == pa.string()
    (row,) = pq.read_table(destination).to_pylist()
    assert (row["Label"], row["Größe"], row["when"], row["price"]) == ("good", 3, "2026-01-02", "1.50")


def test_numbers_arrow_cannot_hold_are_null_not_a_failed_landing(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "f": {"type": "number"},
            "e": {"enum": [1, 2**70]},
            "ns": {"type": "array", "items": {"type": "integer"}},
        },
    }
    answers = {
        "big": json.dumps({"n": 2**70, "f": 2**70, "e": 2**70, "ns": [1, 2**64]}),
        "huge": json.dumps({"n": 1, "f": 10**400, "e": 1, "ns": []}),
    }
    requests, output = _files(tmp_path, answers)
    destination = tmp_path / "results.parquet"

    report = join_results(
        requests, destination, output_file=output, output_schema=OutputSchema.of(schema), format="parquet"
    )

    big, huge = pq.read_table(destination).to_pylist()
    assert report.counts["succeeded"] == 2
    assert (big["n"], big["f"], big["e"], big["ns"]) == (None, float(2**70), None, [1, None])
    assert (huge["n"], huge["f"], huge["e"]) == (1, None, 1)
