"""
What a landed job used and cost: tokens per batch (parts and rounds) and in total, and their price.

Tokens are the vendor's own counts, from the ``usage`` of each response that became a row: a part's
(or a round's) are those of the rows whose line came from its files, so the batches add up to the total.
The cost is computed only from a price table the user supplies (the ``prices`` argument, or the
connection extra ``prices``; see :mod:`~airflow_provider_llmbatch.pricing`), never from a built-in list:
without a table, or for a model the table does not price, the manifest says why there is no cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_llmbatch import codec
from airflow_provider_llmbatch.locations import Location, open_read
from airflow_provider_llmbatch.pricing import PriceTable, format_cost

if TYPE_CHECKING:
    from airflow_provider_llmbatch.results import JoinReport

NO_TABLE = "no price table: pass prices= or set the connection extra 'prices'"
"""Why a manifest has no cost when no price table was given."""

_DIGITS = 10


def job_model(requests: Location) -> str | None:
    """Return the model the request file names (its first request's; a file holds one model)."""
    with open_read(requests) as handle:
        for raw in handle:
            if raw.isspace():
                continue
            request = codec.read_request(raw, True)
            body = request[1] if request is not None else None
            model = body.get("model") if isinstance(body, dict) else None
            return model if isinstance(model, str) and model else None
    return None


def _cost(prices: PriceTable, model: str, usage: dict[str, int]) -> float:
    cost = prices.cost(model, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
    return round(cost or 0.0, _DIGITS)


def job_cost(
    prices: PriceTable | None,
    model: str | None,
    total: dict[str, int],
    parts: Sequence[dict[str, int]],
    rounds: Sequence[Sequence[dict[str, int]]],
) -> dict[str, Any]:
    """
    Return the manifest's ``cost``: the total and each batch's, in the table's currency, or why not.

    :param prices: the user's price table, or None when none was given.
    :param model: the job's model.
    :param total: the job's token usage.
    :param parts: each part's token usage, in input order.
    :param rounds: each resubmission round's batches' token usage.
    :return: ``{"currency", "model", "total", "parts", "rounds", "reason": None}`` when priced, else
        ``{"total": None, "reason": ...}``.
    """
    if prices is None:
        return {"total": None, "reason": NO_TABLE}
    if model is None:
        return {"total": None, "reason": "the request file names no model"}
    if prices.price_of(model) is None:
        priced = ", ".join(sorted(prices.models))
        return {"total": None, "reason": f"model {model!r} is not in the price table (it prices {priced})"}
    return {
        "currency": prices.currency,
        "model": model,
        "total": _cost(prices, model, total),
        "parts": [_cost(prices, model, u) for u in parts],
        "rounds": [[_cost(prices, model, u) for u in r] for r in rounds],
        "reason": None,
    }


def _tokens(usage: dict[str, int]) -> str:
    return (
        f"{usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion"
        f" = {usage.get('total_tokens', 0)} tokens"
    )


def log_usage(log: logging.Logger | Any, manifest: dict[str, Any]) -> None:
    """Log the job's tokens per batch and in total, and its cost or why there is none: one line each."""
    cost = manifest.get("cost") or {}
    parts = manifest.get("parts") or []
    batches = [(f"part {n} of {len(parts)}", p) for n, p in enumerate(parts, 1)] if len(parts) > 1 else []
    batches += [(f"round {r['round']}", b) for r in manifest.get("rounds") or [] for b in r["batches"]]
    for name, batch in batches:
        log.info("Tokens of %s (batch %s): %s", name, batch["batch_id"], _tokens(batch.get("usage") or {}))
    log.info("Tokens in total: %s", _tokens(manifest.get("usage") or {}))
    if cost.get("total") is None:
        log.info("Cost: not computed: %s", cost.get("reason"))
    else:
        log.info(
            "Cost: %s (%s at the given batch prices)",
            format_cost(cost["total"], cost["currency"]),
            cost["model"],
        )


def log_landing(log: logging.Logger | Any, batch_ids: str, report: JoinReport) -> None:
    """Log a landing's line (rows per status, tokens) and one per kind of anomaly in the vendor files."""
    counts, usage = report.counts, report.usage
    log.info(
        "Landed %d rows of batch %s at %s: %s; tokens %d prompt + %d completion = %d",
        counts.get("total", 0),
        batch_ids,
        report.result_uri,
        ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total" and v),
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        usage.get("total_tokens", 0),
    )
    for kind, count in report.anomalies.items():
        if count:
            log.warning(
                "Vendor files of batch %s: %d %s (e.g. %s)",
                batch_ids,
                count,
                kind.replace("_", " "),
                ", ".join(report.samples.get(kind, [])),
            )
