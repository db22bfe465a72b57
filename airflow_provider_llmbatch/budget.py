"""
The guard that refuses a job above the user's budget, before anything is uploaded.

The input's tokens are estimated in the pass that checks and splits it
(:mod:`~airflow_provider_llmbatch.token_estimate`, whose rule is described there); a cost is estimated
only from the user's price table. ``max_input_tokens`` and ``max_cost`` refuse a job whose estimate is
above them with :class:`BudgetExceededError`, giving the estimate and the limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.pricing import PriceTable, format_cost
from airflow_provider_llmbatch.token_estimate import (
    MESSAGE_OVERHEAD,
    REQUEST_OVERHEAD,
    TokenEstimate,
    TokenEstimator,
    is_count,
    text_tokens,
)

__all__ = [
    "MESSAGE_OVERHEAD",
    "REQUEST_OVERHEAD",
    "Budget",
    "BudgetExceededError",
    "CostEstimate",
    "TokenEstimate",
    "TokenEstimator",
    "as_record",
    "check_budget",
    "describe",
    "estimate_cost",
    "text_tokens",
]


class BudgetExceededError(InvalidInputError):
    """Raise when a job's estimate is above ``max_input_tokens`` or ``max_cost``; nothing was uploaded."""


@dataclass(frozen=True)
class Budget:
    """
    The most a job may use, checked before upload; ``None`` leaves a limit out.

    :param max_input_tokens: the most estimated input tokens.
    :param max_cost: the most estimated cost, in the price table's currency.
    """

    max_input_tokens: int | None = None
    max_cost: float | None = None

    @classmethod
    def checked(cls, *, max_input_tokens: Any = None, max_cost: Any = None) -> Budget:
        """Return the budget after checking each limit; raise :class:`InvalidInputError` naming it."""
        if max_input_tokens is not None and not (is_count(max_input_tokens) and max_input_tokens > 0):
            raise InvalidInputError(f"max_input_tokens must be a whole number > 0, got {max_input_tokens!r}")
        if max_cost is not None and (
            isinstance(max_cost, bool)
            or not isinstance(max_cost, int | float)
            or not math.isfinite(max_cost)
            or max_cost <= 0
        ):
            raise InvalidInputError(f"max_cost must be a finite number > 0, got {max_cost!r}")
        return cls(max_input_tokens, None if max_cost is None else float(max_cost))

    @property
    def limited(self) -> bool:
        """Return whether any limit is set."""
        return self.max_input_tokens is not None or self.max_cost is not None


@dataclass(frozen=True)
class CostEstimate:
    """
    The estimated cost of a job at the user's prices.

    :param amount: input tokens at the input price plus the output bounds at the output price.
    :param currency: the price table's currency.
    :param model: the model priced.
    """

    amount: float
    currency: str
    model: str


def estimate_cost(
    estimate: TokenEstimate, model: str | None, prices: PriceTable | None
) -> CostEstimate | None:
    """Return the estimated cost, or ``None`` without a price table or a price for the model."""
    if prices is None or not model:
        return None
    amount = prices.cost(model, estimate.input_tokens, estimate.max_output_tokens)
    return None if amount is None else CostEstimate(amount, prices.currency, model)


def describe(estimate: TokenEstimate, cost: CostEstimate | None) -> str:
    """Return the estimate in words, for the task log and the guard's errors."""
    words = f"{estimate.input_tokens:,} input tokens over {estimate.requests:,} request(s)"
    if estimate.max_output_tokens:
        words += f", up to {estimate.max_output_tokens:,} output tokens (max_tokens)"
    if estimate.unbounded_requests:
        words += f", {estimate.unbounded_requests:,} request(s) without max_tokens (output not bounded)"
    if cost is not None:
        words += f"; estimated cost {format_cost(cost.amount, cost.currency)} ({cost.model})"
    return words


def check_budget(
    budget: Budget, estimate: TokenEstimate, model: str | None, prices: PriceTable | None
) -> CostEstimate | None:
    """
    Refuse a job whose estimate is above a limit; return its cost estimate (None when not priced).

    :raises BudgetExceededError: the estimate is above ``max_input_tokens`` or ``max_cost``, with both
        figures in the message.
    :raises InvalidInputError: ``max_cost`` is set, but no price table prices the model.
    """
    cost = estimate_cost(estimate, model, prices)
    if budget.max_input_tokens is not None and estimate.input_tokens > budget.max_input_tokens:
        raise BudgetExceededError(
            f"the input is estimated at {estimate.input_tokens:,} input tokens, more than "
            f"max_input_tokens={budget.max_input_tokens:,}; nothing was uploaded "
            f"(estimate: {describe(estimate, cost)})"
        )
    if budget.max_cost is None:
        return cost
    if cost is None:
        why = "no price table is given (prices= or the connection extra 'prices')"
        if prices is not None:
            why = f"the price table does not price model {model!r}"
        raise InvalidInputError(f"max_cost is set but {why}; nothing was uploaded")
    if cost.amount > budget.max_cost:
        raise BudgetExceededError(
            f"the job is estimated to cost {format_cost(cost.amount, cost.currency)}, more than "
            f"max_cost={format_cost(budget.max_cost, cost.currency)}; nothing was uploaded "
            f"(estimate: {describe(estimate, cost)})"
        )
    return cost


def as_record(estimate: TokenEstimate, cost: CostEstimate | None) -> dict[str, Any]:
    """Return the estimate as the create result carries it (JSON primitives; cost ``None`` if not priced)."""
    record: dict[str, Any] = estimate.to_dict()
    record["cost"] = None if cost is None else {"amount": cost.amount, "currency": cost.currency}
    return record
