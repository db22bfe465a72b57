"""
An estimate of what a request file will cost, and the guard that refuses a job above the user's budget.

The estimate is made in the pass that checks and splits the input (:func:`~airflow_provider_llmbatch.
parts.split_checked` calls :meth:`TokenEstimator.line` for each line it keeps), so it costs no second
read of the file, and it is judged before anything is uploaded.

**How input tokens are estimated.** Over the texts a request sends the model: each message's ``content``
(a string, or the ``text`` of its parts), ``input`` and ``prompt`` (embeddings and completions), and the
JSON text of a ``response_format`` (a JSON Schema is sent too). In each text, a CJK character (Chinese,
Japanese kana, Korean, full-width forms: three UTF-8 bytes) counts as one token, an ASCII character as a
quarter of one, a two-byte letter (Cyrillic, Greek, accented Latin) as five eighths, rounded up per text
(:func:`text_tokens`: ``ceil((3 * bytes - characters) / 8)``, computed from the text's UTF-8 length);
each message adds :data:`MESSAGE_OVERHEAD` tokens and each request
:data:`REQUEST_OVERHEAD` (the chat template's role markers). It is a rule of thumb, not a tokenizer: no
vendor's tokenizer is bundled, and English prose usually comes out a little high (which errs on the side
of the budget).

**Output.** A request that sets ``max_tokens`` (or ``max_completion_tokens`` / ``max_output_tokens``)
bounds its output; the estimate adds those bounds up. Requests without one have no bound, and the cost
estimate leaves their output out (the log and the error say how many there were).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import msgspec

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.pricing import PriceTable, format_cost

MESSAGE_OVERHEAD = 3
"""Tokens added per chat message (role markers)."""

REQUEST_OVERHEAD = 3
"""Tokens added per request (the start of the reply)."""

CHARS_PER_TOKEN = 4
"""Characters per token outside CJK text."""

_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class _Body(msgspec.Struct):
    messages: Any = None
    input: Any = None
    prompt: Any = None
    response_format: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None


class _Line(msgspec.Struct):
    body: _Body | None = None


_decode_line = msgspec.json.Decoder(_Line).decode


def text_tokens(text: str) -> int:
    """
    Return the estimated tokens of one text: ``ceil((3 * B - N) / 8)`` for N characters in B UTF-8 bytes.

    That is a quarter of a token per ASCII character and one per CJK character (Chinese, kana, Hangul:
    three bytes each), a little over half a token per two-byte letter (Cyrillic, Greek, accented Latin);
    measured in C (the text's UTF-8 length), not character by character.
    """
    if not text:
        return 0
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return -(-(3 * size - len(text)) // 8)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += text_tokens(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += text_tokens(part["text"])
        return total
    return 0


@dataclass(frozen=True)
class TokenEstimate:
    """
    What an input is estimated to use.

    :param requests: the requests estimated.
    :param input_tokens: the estimated prompt tokens of all of them.
    :param max_output_tokens: the sum of the output bounds (``max_tokens``) the requests set.
    :param unbounded_requests: requests that set no output bound.
    """

    requests: int
    input_tokens: int
    max_output_tokens: int
    unbounded_requests: int

    def to_dict(self) -> dict[str, int]:
        """Return the estimate as JSON primitives."""
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "unbounded_requests": self.unbounded_requests,
        }


class TokenEstimator:
    """Add up the estimated tokens of request lines, one line at a time (memory stays flat)."""

    def __init__(self) -> None:
        self.requests = 0
        self.input_tokens = 0
        self.max_output_tokens = 0
        self.unbounded_requests = 0

    def line(self, raw: bytes) -> None:
        """Add one request line; a line that does not parse is left to the checks (it fails them)."""
        try:
            body = _decode_line(raw).body
        except (msgspec.MsgspecError, ValueError, RecursionError):
            return
        self.requests += 1
        if body is None:
            self.unbounded_requests += 1
            return
        self.input_tokens += self.body_tokens(body)
        bound = next(
            (v for v in (getattr(body, name) for name in _OUTPUT_LIMITS) if _is_count(v)),
            None,
        )
        if bound is None:
            self.unbounded_requests += 1
        else:
            self.max_output_tokens += bound

    @staticmethod
    def body_tokens(body: _Body) -> int:
        """Return the estimated prompt tokens of one request body."""
        tokens = REQUEST_OVERHEAD
        if isinstance(body.messages, list):
            for message in body.messages:
                tokens += MESSAGE_OVERHEAD
                if isinstance(message, dict):
                    tokens += _content_tokens(message.get("content"))
        for value in (body.input, body.prompt):
            tokens += _content_tokens(value)
        if isinstance(body.response_format, dict):
            tokens += text_tokens(json.dumps(body.response_format, ensure_ascii=False, separators=(",", ":")))
        return tokens

    def estimate(self) -> TokenEstimate:
        """Return the estimate of the lines added so far."""
        return TokenEstimate(
            self.requests, self.input_tokens, self.max_output_tokens, self.unbounded_requests
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
        if max_input_tokens is not None and not (_is_count(max_input_tokens) and max_input_tokens > 0):
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
