"""The user's price table: read and checked, costs computed, the argument winning over the connection."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.pricing import ModelPrice, PriceTable, resolve_prices

TABLE = {
    "currency": "CNY",
    "models": {"glm-4-flash": {"input_per_million": 0.5, "output_per_million": 2}},
}


def test_a_table_prices_tokens_per_million() -> None:
    table = PriceTable.of(TABLE)

    assert table.currency == "CNY"
    assert table.price_of("glm-4-flash") == ModelPrice(0.5, 2.0)
    assert table.cost("glm-4-flash", 2_000_000, 500_000) == pytest.approx(2.0)
    assert table.cost("glm-4-flash", 0, 0) == 0.0


def test_an_unpriced_model_has_no_cost_not_zero() -> None:
    assert PriceTable.of(TABLE).cost("glm-4-plus", 1000, 1000) is None


def test_json_text_and_a_table_read_the_same() -> None:
    table = PriceTable.of(TABLE)

    assert PriceTable.of(json.dumps(TABLE)) == table
    assert PriceTable.of(table) is table
    assert PriceTable.of(table.as_dict()) == table


# value -> the field the error must name
BAD_TABLES: dict[str, tuple[Any, str]] = {
    "not a mapping": ([1, 2], "expected a mapping"),
    "not json": ("{currency", "not JSON"),
    "no currency": ({"models": TABLE["models"]}, "prices.currency"),
    "empty currency": ({**TABLE, "currency": " "}, "prices.currency"),
    "no models": ({"currency": "USD"}, "prices.models"),
    "unknown top-level field": ({**TABLE, "model": {}}, "unknown field(s) ['model']"),
    "misspelt price": (
        {"currency": "USD", "models": {"m": {"input_per_milion": 1, "output_per_million": 1}}},
        "prices.models['m']: unknown field(s) ['input_per_milion']",
    ),
    "missing price": (
        {"currency": "USD", "models": {"m": {"input_per_million": 1}}},
        "prices.models['m'].output_per_million",
    ),
    "negative": (
        {"currency": "USD", "models": {"m": {"input_per_million": -1, "output_per_million": 1}}},
        "prices.models['m'].input_per_million: expected a finite number >= 0",
    ),
    "text price": (
        {"currency": "USD", "models": {"m": {"input_per_million": "1", "output_per_million": 1}}},
        "prices.models['m'].input_per_million: expected a number",
    ),
    "boolean price": (
        {"currency": "USD", "models": {"m": {"input_per_million": True, "output_per_million": 1}}},
        "input_per_million",
    ),
    "infinite": (
        {"currency": "USD", "models": {"m": {"input_per_million": float("inf"), "output_per_million": 1}}},
        "input_per_million",
    ),
    "price not a mapping": ({"currency": "USD", "models": {"m": 1.0}}, "prices.models['m']"),
}


@pytest.mark.parametrize(("value", "names"), BAD_TABLES.values(), ids=BAD_TABLES)
def test_a_bad_table_is_refused_naming_the_field(value: Any, names: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        PriceTable.of(value)
    assert names in str(caught.value)


def test_the_argument_wins_over_the_connection_extra() -> None:
    other = {
        "currency": "USD",
        "models": {"gpt-4o-mini": {"input_per_million": 0.075, "output_per_million": 0.3}},
    }

    chosen = resolve_prices(TABLE, {"prices": other})

    assert chosen == PriceTable.of(TABLE)


@pytest.mark.parametrize("extra", [TABLE, json.dumps(TABLE)], ids=["mapping", "json"])
def test_the_connection_extra_is_read_as_a_mapping_or_json(extra: Any) -> None:
    assert resolve_prices(None, {"prices": extra}) == PriceTable.of(TABLE)


@pytest.mark.parametrize("extra", [None, {}, {"prices": ""}, {"other": 1}])
def test_no_table_anywhere_is_none(extra: Any) -> None:
    assert resolve_prices(None, extra) is None


def test_a_bad_connection_extra_is_named_as_such() -> None:
    with pytest.raises(InvalidInputError, match=r"connection extra 'prices'\.currency"):
        resolve_prices(None, {"prices": {"models": TABLE["models"]}})
