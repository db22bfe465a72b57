"""
The input-token estimate and the budget guard: an over-budget job is refused before anything is sent.

The estimate is a rule (see :mod:`airflow_provider_llmbatch.budget`); these tests pin the rule and show
that the guard acts on it before the first request to the vendor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch.budget import (
    MESSAGE_OVERHEAD,
    REQUEST_OVERHEAD,
    Budget,
    BudgetExceededError,
    TokenEstimator,
    check_budget,
    text_tokens,
)
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.jsonl_lines import RequestChecker, resolve_endpoint
from airflow_provider_llmbatch.parts import split_checked
from airflow_provider_llmbatch.pricing import PriceTable
from airflow_provider_llmbatch.request_blocks import BlockPath
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import FakeTI, create_op, make_context

PRICES = {
    "currency": "CNY",
    "models": {"test-model": {"input_per_million": 1000, "output_per_million": 4000}},
}


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("abcd", 1),
        ("abcde", 2),
        ("你好世界", 4),  # one token per CJK character
        ("こんにちは", 5),
        ("안녕", 2),
        ("你好 ok", 2 + 1),  # two CJK + ceil(3 / 4)
        ("ＡＢ", 2),  # full-width forms count as CJK
        ("привет", 4),  # two-byte letters: 6 of them in 12 bytes -> ceil(30 / 8)
        ("👍", 2),  # four bytes, one character -> ceil(11 / 8)
        ("“ok”", 3),  # curly quotes are three bytes: 4 characters in 8 bytes -> ceil(20 / 8)
        ("\ud800", 1),  # a lone surrogate (JSON can carry one) is measured, not an error
    ],
)
def test_text_tokens_rule(text: str, tokens: int) -> None:
    assert text_tokens(text) == tokens


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    ).encode()


def test_a_request_adds_its_texts_and_overheads() -> None:
    estimator = TokenEstimator()
    estimator.line(
        _line(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "abcdabcd"},
                    {"role": "user", "content": [{"type": "text", "text": "你好"}, {"type": "image_url"}]},
                ],
                "max_tokens": 50,
            }
        )
    )
    estimator.line(_line({"model": "m", "input": "abcd"}))

    estimate = estimator.estimate()
    assert estimate.requests == 2
    assert estimate.input_tokens == (REQUEST_OVERHEAD + 2 * MESSAGE_OVERHEAD + 2 + 2) + (REQUEST_OVERHEAD + 1)
    assert estimate.max_output_tokens == 50
    assert estimate.unbounded_requests == 1


def test_a_schema_sent_with_the_request_is_counted() -> None:
    plain, with_schema = TokenEstimator(), TokenEstimator()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    plain.line(_line(body))
    with_schema.line(
        _line({**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    )

    assert with_schema.estimate().input_tokens > plain.estimate().input_tokens


def test_the_estimate_is_made_in_the_split_pass(tmp_path: Path) -> None:
    spec = REGISTRY["openai"]
    path = tmp_path / "requests.jsonl"
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": spec.default_endpoint,
            "body": {"model": "test-model", "messages": [{"role": "user", "content": "x" * 40}]},
        }
        for i in range(5)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    estimator = TokenEstimator()

    split_checked(path, spec, folder=tmp_path / "parts", estimator=estimator)

    assert estimator.estimate().requests == 5
    assert estimator.estimate().input_tokens == 5 * (REQUEST_OVERHEAD + MESSAGE_OVERHEAD + 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_input_tokens": 0}, "max_input_tokens"),
        ({"max_input_tokens": 1.5}, "max_input_tokens"),
        ({"max_input_tokens": True}, "max_input_tokens"),
        ({"max_cost": -1}, "max_cost"),
        ({"max_cost": 0}, "max_cost"),
        ({"max_cost": 0.0}, "max_cost"),
        ({"max_cost": float("nan")}, "max_cost"),
        ({"max_cost": "1"}, "max_cost"),
    ],
)
def test_bad_limits_are_refused_when_the_task_is_made(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Budget.checked(**kwargs)


def test_max_cost_without_a_price_for_the_model_is_refused() -> None:
    estimator = TokenEstimator()
    estimator.line(_line({"model": "m", "input": "abcd"}))
    budget = Budget.checked(max_cost=1.0)

    with pytest.raises(InvalidInputError, match="no price table"):
        check_budget(budget, estimator.estimate(), "m", None)
    with pytest.raises(InvalidInputError, match="does not price model 'm'"):
        check_budget(budget, estimator.estimate(), "m", PriceTable.of(PRICES))


def test_cost_counts_the_output_bounds_at_the_output_price() -> None:
    estimator = TokenEstimator()
    estimator.line(_line({"model": "test-model", "input": "abcd", "max_tokens": 1000}))
    estimate = estimator.estimate()

    cost = check_budget(Budget(), estimate, "test-model", PriceTable.of(PRICES))

    assert cost is not None
    assert cost.amount == pytest.approx((estimate.input_tokens * 1000 + 1000 * 4000) / 1e6)


# -- the operator: refused before anything reaches the vendor ----------------------------------------

RECORDS = [{"custom_id": f"r{i}", "prompt": "a review of a product, " * 10} for i in range(20)]


@pytest.mark.integration
@pytest.mark.parametrize("vendor", list(REGISTRY))
@pytest.mark.parametrize(
    ("limits", "figures"),
    [
        ({"max_input_tokens": 100}, ("max_input_tokens=100", "input tokens")),
        ({"max_cost": 0.01, "prices": PRICES}, ("max_cost=0.01 CNY", "estimated to cost")),
    ],
    ids=["tokens", "cost"],
)
def test_an_over_budget_job_is_refused_before_any_request(
    connect: Any, emulator: Any, vendor: str, limits: dict[str, Any], figures: tuple[str, str]
) -> None:
    conn_id = connect(vendor, "llmbatch_test")
    op = create_op(conn_id=conn_id, requests=RECORDS, model="test-model", **limits)

    with pytest.raises(BudgetExceededError) as caught:
        op.execute(make_context(FakeTI()))

    message = str(caught.value)
    for figure in figures:
        assert figure in message
    assert "nothing was uploaded" in message
    stats = emulator.stats(vendor)
    assert (stats["files_uploaded"], stats["batches_created"]) == (0, 0)
    assert not stats["operations"], stats["operations"]
    assert emulator.api_key not in message


@pytest.mark.integration
def test_prices_from_the_connection_extra_guard_the_job(connect: Any, emulator: Any) -> None:
    conn_id = connect("zhipu", "llmbatch_test", prices=json.dumps(PRICES))
    op = create_op(conn_id=conn_id, requests=RECORDS, model="test-model", max_cost=0.01)

    with pytest.raises(BudgetExceededError, match="CNY"):
        op.execute(make_context(FakeTI()))
    assert emulator.stats("zhipu")["files_uploaded"] == 0


@pytest.mark.integration
def test_a_job_within_budget_is_sent_with_its_estimate(connect: Any, emulator: Any) -> None:
    conn_id = connect("zhipu", "llmbatch_test")
    op = create_op(
        conn_id=conn_id,
        requests=RECORDS,
        model="test-model",
        max_input_tokens=10_000,
        max_cost=10,
        prices=PRICES,
    )

    result = op.execute(make_context(FakeTI()))

    estimate = result["estimate"]
    assert estimate["requests"] == len(RECORDS)
    assert 0 < estimate["input_tokens"] <= 10_000
    assert estimate["cost"]["currency"] == "CNY"
    assert estimate["cost"]["amount"] == pytest.approx(estimate["input_tokens"] * 1000 / 1e6)
    assert emulator.stats("zhipu")["batches_created"] == 1


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=4), ascii_only=st.booleans())
def test_a_text_counts_by_the_rule_whether_written_plain_or_escaped(
    texts: list[str], ascii_only: bool
) -> None:
    # Plain UTF-8 is counted from the JSON text without building the string; escapes are decoded first.
    body = {"model": "m", "messages": [{"role": "user", "content": text} for text in texts]}
    line = json.dumps(
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body},
        ensure_ascii=ascii_only,
    ).encode()
    one, block = TokenEstimator(), TokenEstimator()
    one.line(line)
    spec = REGISTRY["openai"]
    checker = RequestChecker(spec, resolve_endpoint(spec, None), None, whole_input=True)
    checker.line(line.replace(b'"a"', b'"first"', 1), len(line))
    # The same texts written the other way on the next line: a block of plain and escaped texts.
    other = json.dumps(
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": body},
        ensure_ascii=not ascii_only,
    ).encode()
    assert BlockPath(checker, block).take(line + b"\n" + other + b"\n") == 2

    expected = REQUEST_OVERHEAD + len(texts) * MESSAGE_OVERHEAD + sum(map(text_tokens, texts))
    assert one.estimate().input_tokens == expected
    assert block.estimate().input_tokens == 2 * expected
