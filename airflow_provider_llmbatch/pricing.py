"""
Prices the user supplies, and what a job costs at them.

There is no built-in price list: vendors change prices and discounts often, and a list shipped in a
wheel goes stale without anyone noticing. The user states the batch prices they pay, per model and per
million tokens, either as an operator argument or in the connection's ``prices`` extra::

    {
        "currency": "CNY",
        "models": {
            "glm-4-flash": {"input_per_million": 0.5, "output_per_million": 0.5},
        },
    }

A model missing from the table is "not priced": its cost is ``None``, never zero.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_llmbatch.exceptions import InvalidInputError

_TABLE_KEYS = frozenset({"currency", "models"})
_PRICE_KEYS = frozenset({"input_per_million", "output_per_million"})


@dataclass(frozen=True)
class ModelPrice:
    """
    Batch prices of one model, per million tokens.

    :param input_per_million: price of a million prompt (input) tokens.
    :param output_per_million: price of a million completion (output) tokens.
    """

    input_per_million: float
    output_per_million: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Return the price of ``prompt_tokens`` in and ``completion_tokens`` out."""
        return (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / 1_000_000


@dataclass(frozen=True)
class PriceTable:
    """
    The user's batch prices: one currency, a price per model.

    :param currency: the currency every price is in, e.g. ``"CNY"`` or ``"USD"``.
    :param models: model name -> its prices.
    """

    currency: str
    models: Mapping[str, ModelPrice]

    @classmethod
    def of(cls, value: PriceTable | Mapping[str, Any] | str, *, source: str = "prices") -> PriceTable:
        """
        Return a checked table from a table, a mapping or its JSON text.

        :param value: the table as given.
        :param source: what to call the value in error messages, e.g. ``"prices"`` or
            ``"connection extra 'prices'"``.
        :raises InvalidInputError: naming the field that is missing or wrong, and what was expected.
        """
        if isinstance(value, PriceTable):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as err:
                raise InvalidInputError(
                    f"{source}: expected a JSON object, got text that is not JSON: {err}"
                ) from None
        if not isinstance(value, Mapping):
            raise InvalidInputError(f"{source}: expected a mapping, got {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in _TABLE_KEYS)
        if unknown:
            raise InvalidInputError(f"{source}: unknown field(s) {unknown}; expected 'currency' and 'models'")
        currency = value.get("currency")
        if not isinstance(currency, str) or not currency.strip():
            raise InvalidInputError(
                f"{source}.currency: expected a non-empty string such as 'USD', got {currency!r}"
            )
        models = value.get("models")
        if not isinstance(models, Mapping) or not models:
            raise InvalidInputError(
                f"{source}.models: expected a non-empty mapping of model name -> "
                f"{{'input_per_million': ..., 'output_per_million': ...}}, got {models!r}"
            )
        return cls(
            currency=currency.strip(),
            models={
                _model_name(name, source): _model_price(price, f"{source}.models[{name!r}]")
                for name, price in models.items()
            },
        )

    def price_of(self, model: str) -> ModelPrice | None:
        """Return the prices of ``model``, or ``None`` if the table does not price it."""
        return self.models.get(model)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Return what the tokens cost at ``model``'s prices, or ``None`` if the model is not priced."""
        price = self.price_of(model)
        return None if price is None else price.cost(prompt_tokens, completion_tokens)

    def as_dict(self) -> dict[str, Any]:
        """Return the table as JSON primitives, in the form :meth:`of` reads."""
        return {
            "currency": self.currency,
            "models": {
                name: {"input_per_million": p.input_per_million, "output_per_million": p.output_per_million}
                for name, p in self.models.items()
            },
        }


def resolve_prices(
    argument: PriceTable | Mapping[str, Any] | str | None,
    connection_extra: Mapping[str, Any] | None,
) -> PriceTable | None:
    """
    Return the price table in force: the operator argument, else the connection's ``prices`` extra.

    :param argument: the operator's ``prices`` argument, if given; it wins over the connection.
    :param connection_extra: the connection's extras (``Connection.extra_dejson``); its ``prices`` may
        be a mapping or JSON text.
    :return: the checked table, or ``None`` when neither gives one.
    """
    if argument is not None and argument != "" and argument != {}:
        return PriceTable.of(argument, source="prices")
    extra = (connection_extra or {}).get("prices")
    if extra is None or extra == "" or extra == {}:
        return None
    return PriceTable.of(extra, source="connection extra 'prices'")


def format_cost(amount: float, currency: str) -> str:
    """Return ``amount`` for a log line or an error, e.g. ``"0.0125 CNY"``."""
    return f"{amount:.6g} {currency}"


def _model_name(name: object, source: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"{source}.models: expected model names as non-empty strings, got {name!r}")
    return name


def _model_price(price: object, where: str) -> ModelPrice:
    if not isinstance(price, Mapping):
        raise InvalidInputError(
            f"{where}: expected {{'input_per_million': ..., 'output_per_million': ...}}, "
            f"got {type(price).__name__}"
        )
    unknown = sorted(str(k) for k in price if k not in _PRICE_KEYS)
    if unknown:
        raise InvalidInputError(
            f"{where}: unknown field(s) {unknown}; expected 'input_per_million' and 'output_per_million'"
        )
    return ModelPrice(
        input_per_million=_amount(price.get("input_per_million"), f"{where}.input_per_million"),
        output_per_million=_amount(price.get("output_per_million"), f"{where}.output_per_million"),
    )


def _amount(value: object, where: str) -> float:
    # bool is an int subclass; True as a price is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{where}: expected a number (price per million tokens), got {value!r}")
    amount = float(value)
    if not math.isfinite(amount) or amount < 0:
        raise InvalidInputError(f"{where}: expected a finite number >= 0, got {value!r}")
    return amount
