"""Where the answer text is, per response shape; rows judged with invalid outputs; usage per batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.exceptions import TooManyFailedRequestsError
from airflow_provider_llmbatch.outcomes import judge_rows, row_failures
from airflow_provider_llmbatch.pricing import PriceTable
from airflow_provider_llmbatch.results import BatchFiles, join_results
from airflow_provider_llmbatch.schema import OutputSchema
from airflow_provider_llmbatch.typed_output import answer_text, typed_output
from airflow_provider_llmbatch.usage import job_cost
from tests.typed.conftest import GOOD, Review

CHAT = {"choices": [{"message": {"role": "assistant", "content": GOOD}, "finish_reason": "stop"}]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (CHAT, (GOOD, None)),
        (
            {
                "choices": [
                    {
                        "message": {
                            "content": [{"type": "text", "text": '{"a":'}, {"type": "text", "text": "1}"}]
                        }
                    }
                ]
            },
            ('{"a":1}', None),
        ),
        ({"choices": [{"text": GOOD}]}, (GOOD, None)),
        (
            {
                "output": [
                    {"type": "reasoning"},
                    {"type": "message", "content": [{"type": "output_text", "text": GOOD}]},
                ]
            },
            (GOOD, None),
        ),
        ({"choices": [{"message": {"content": None, "refusal": "no"}}]}, (None, "the model refused: no")),
        (
            {"output": [{"type": "message", "content": [{"type": "refusal", "refusal": "no"}]}]},
            (None, "the model refused: no"),
        ),
        ({"choices": [{"message": {"content": None}}]}, (None, "the answer has no text content")),
        ({"choices": []}, (None, "the response has no choices")),
        ({"object": "list", "data": [{"embedding": [0.1]}]}, (None, "the response has no answer text")),
        (None, (None, "the response has no body")),
    ],
)
def test_answer_text_by_response_shape(body: Any, expected: tuple[str | None, str | None]) -> None:
    assert answer_text(body) == expected


def test_an_answer_cut_off_says_so() -> None:
    body = {"choices": [{"message": {"content": '{"label": "pos'}, "finish_reason": "length"}]}
    value, error = typed_output(body, OutputSchema.of(Review))
    assert value is None
    assert error is not None
    assert error.startswith(
        "the answer was cut off at the token limit (finish_reason length); the answer is not JSON"
    )


def test_a_valid_answer_is_the_validated_value() -> None:
    assert typed_output(CHAT, OutputSchema.of(Review)) == ({"label": "positive", "score": 0.9}, None)


COUNTS = {
    "succeeded": 6,
    "invalid_output": 3,
    "failed": 1,
    "expired": 0,
    "cancelled": 0,
    "missing": 0,
    "total": 10,
}


@pytest.mark.parametrize(("fails", "failed"), [(True, 4), (False, 1)])
def test_row_failures(fails: bool, failed: int) -> None:
    assert row_failures(COUNTS, invalid_output_fails=fails) == (failed, 10)


@pytest.mark.parametrize(
    ("fraction", "fails", "raises"),
    [(0.3, True, True), (0.4, True, False), (0.0, False, True), (0.1, False, False)],
)
def test_judge_rows(fraction: float, fails: bool, raises: bool) -> None:
    if raises:
        with pytest.raises(TooManyFailedRequestsError, match="landed rows of batch b1") as info:
            judge_rows(COUNTS, batch_id="b1", max_failed_fraction=fraction, invalid_output_fails=fails)
        assert info.value.batch_id == "b1"
    else:
        judge_rows(COUNTS, batch_id="b1", max_failed_fraction=fraction, invalid_output_fails=fails)


def _line(custom_id: str, prompt: int, content: str = GOOD) -> str:
    usage = {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1}
    body = {"choices": [{"message": {"content": content}}], "usage": usage}
    return json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": body}}) + "\n"


def test_usage_per_part_and_round_adds_up(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d"]
    body = {"model": "m", "messages": []}
    lines = [{"custom_id": i, "method": "POST", "url": "/v1/chat/completions", "body": body} for i in ids]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "p1.jsonl").write_text(_line("a", 10) + _line("b", 20))
    (tmp_path / "p2.jsonl").write_text(_line("c", 30))
    error = {"custom_id": "d", "response": None, "error": {"code": "rate_limit", "message": "slow down"}}
    (tmp_path / "p2.err.jsonl").write_text(json.dumps(error) + "\n")
    (tmp_path / "sent.jsonl").write_text(json.dumps(lines[3]) + "\n")
    (tmp_path / "r1.jsonl").write_text(_line("d", 40, "not json"))

    report = join_results(
        requests,
        tmp_path / "results.jsonl",
        batches=[
            BatchFiles("completed", tmp_path / "p1.jsonl", requests=2),
            BatchFiles("completed", tmp_path / "p2.jsonl", tmp_path / "p2.err.jsonl", requests=2),
            BatchFiles("completed", tmp_path / "r1.jsonl", round=1, sent=tmp_path / "sent.jsonl"),
        ],
        output_schema=OutputSchema.of(Review),
    )

    prompts = [u["prompt_tokens"] for u in report.batch_usage]
    assert prompts == [30, 30, 40]
    assert sum(prompts) == report.usage["prompt_tokens"] == 100
    assert report.counts["succeeded"] == 3
    assert report.counts["invalid_output"] == 1
    rows = [json.loads(r) for r in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows[3]["attempts"] == 2
    assert rows[3]["status"] == "invalid_output"

    prices = PriceTable.of(
        {"currency": "USD", "models": {"m": {"input_per_million": 1e6, "output_per_million": 0}}}
    )
    cost = job_cost(prices, "m", report.usage, report.batch_usage[:2], [report.batch_usage[2:]])
    assert cost == {
        "currency": "USD",
        "model": "m",
        "total": 100.0,
        "parts": [30.0, 30.0],
        "rounds": [[40.0]],
        "reason": None,
    }
