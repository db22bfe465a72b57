from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    VendorAPIError,
    WrongObjectError,
)
from airflow_provider_llmbatch.retry import NO_RETRY, Action, RetryPolicy, classify, parse_retry_after

CASES: list[tuple[str, VendorAPIError, str | None]] = [
    # Transport failures carry their effect from hooks/errors.py's table (tested in test_errors.py).
    ("connect error", APIConnectionError("refused", effect="not_sent"), "not_sent"),
    ("connect timeout", APITimeoutError("slow", effect="not_sent"), "not_sent"),
    ("read timeout", APITimeoutError("slow", effect="unknown"), "unknown"),
    ("reset mid-response", APIConnectionError("reset", effect="unknown"), "unknown"),
    ("short body (default effect)", APIConnectionError("short body"), "unknown"),
    ("invalid request (no effect)", APIConnectionError("bad url", effect=None), None),
    ("429 rate limit", RateLimitError("slow down", status_code=429), "not_sent"),
    ("429 quota exceeded", QuotaExceededError("pay up", status_code=429), None),
    ("500", ServerError("boom", status_code=500), "unknown"),
    ("503", ServerError("busy", status_code=503), "unknown"),
    ("400", BadRequestError("bad", status_code=400), None),
    ("401", AuthenticationError("key", status_code=401), None),
    ("403", PermissionDeniedError("no", status_code=403), None),
    ("404", NotFoundError("gone", status_code=404), None),
    ("409", ConflictError("state", status_code=409), None),
    ("malformed 200", MalformedResponseError("not json", status_code=200), None),
    ("answer about another object", WrongObjectError("b2, not b1", status_code=200), "unknown"),
    ("not a vendor error", ValueError("bug"), None),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("exc", "expected"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_classify(exc: VendorAPIError, expected: str | None) -> None:
    assert classify(exc) == expected


EXPECTED_ACTION = {
    # (class, idempotent) -> action
    ("not_sent", True): Action.RETRY,
    ("not_sent", False): Action.RETRY,
    ("unknown", True): Action.RETRY,
    ("unknown", False): Action.RECOVER,
    (None, True): Action.RAISE,
    (None, False): Action.RAISE,
}


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "create-or-upload"])
@pytest.mark.parametrize(("exc", "kind"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_decide_by_idempotency(exc: VendorAPIError, kind: str | None, idempotent: bool) -> None:
    policy = RetryPolicy(max_retries=3, rng=random.Random(1))
    decision = policy.decide(exc, attempt=1, idempotent=idempotent)
    assert decision.action is EXPECTED_ACTION[(kind, idempotent)]


def test_never_retries_past_max_retries() -> None:
    policy = RetryPolicy(max_retries=2, rng=random.Random(1))
    exc = ServerError("boom", status_code=500)
    assert policy.decide(exc, attempt=2, idempotent=True).action is Action.RETRY
    assert policy.decide(exc, attempt=3, idempotent=True).action is Action.RAISE


def test_zero_retries_means_one_attempt() -> None:
    policy = RetryPolicy(max_retries=0)
    assert policy.decide(RateLimitError("x"), attempt=1, idempotent=True).action is Action.RAISE


class _FixedRng(random.Random):
    """Return the top of the jitter range, so waits are the ceilings."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 16.0), (7, 30.0), (20, 30.0)],
)
def test_backoff_is_capped_exponential(attempt: int, ceiling: float) -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0, rng=_FixedRng())
    assert policy.backoff(attempt) == pytest.approx(ceiling)


def test_backoff_full_jitter_with_seeded_rng() -> None:
    waits = [RetryPolicy(rng=random.Random(42)).backoff(3) for _ in range(3)]
    expected = random.Random(42).uniform(0.0, 2.0)
    assert waits == [pytest.approx(expected)] * 3
    spread = [RetryPolicy(rng=random.Random(seed)).backoff(5) for seed in range(200)]
    assert all(0.0 <= w <= 8.0 for w in spread)
    assert min(spread) < 1.0
    assert max(spread) > 7.0


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(0.0, 0.0), (3.0, 3.0), (119.0, 119.0), (120.0, 120.0), (3600.0, 120.0)],
)
def test_retry_after_is_honoured_and_capped(retry_after: float, expected: float) -> None:
    policy = RetryPolicy(max_retry_after=120.0, rng=_FixedRng())
    exc = RateLimitError("slow", status_code=429, retry_after=retry_after)
    decision = policy.decide(exc, attempt=1, idempotent=False)
    assert decision.action is Action.RETRY
    assert decision.wait == pytest.approx(expected)


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": " 0 "}, 0.0),
        ({"Retry-After": format_datetime(NOW + timedelta(seconds=30), usegmt=True)}, 30.0),
        ({"Retry-After": format_datetime(NOW - timedelta(seconds=30), usegmt=True)}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "x", "Retry-After": "9"}, 9.0),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    result = parse_retry_after(httpx.Headers(headers), now=NOW)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_with_max_retries_keeps_rng_and_sleeps() -> None:
    slept: list[float] = []
    base = RetryPolicy(max_retries=5, rng=random.Random(3), sleep=slept.append)
    copy = base.with_max_retries(1)
    assert copy.max_retries == 1
    assert copy.rng is base.rng
    copy.sleep(0.1)
    assert slept == [0.1]


@pytest.mark.parametrize("kwargs", [{"max_retries": -1}, {"base_delay": -1.0}, {"max_retry_after": -2.0}])
def test_policy_rejects_negative_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# -- the attempts of one call: what both faces' loops ask after each failure ---------------------------------


class Log:
    """Collect warnings as the hook's logger would format them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, message: str, *args: object) -> None:
        self.lines.append(message % args)


def test_attempts_wait_then_give_up_with_one_line_per_retry() -> None:
    log = Log()
    attempts = RetryPolicy(max_retries=2, rng=_FixedRng()).attempts("get_batch", log)
    assert attempts.failed(ServerError("boom", status_code=500)) == 0.5
    assert attempts.failed(RateLimitError("slow", status_code=429, retry_after=7.0)) == 7.0
    assert attempts.failed(ServerError("boom", status_code=500)) is None
    assert attempts.failures == 3
    assert log.lines == [
        "get_batch failed (ServerError: boom (http_status=500)); retrying in 0.5s (retry 1 of 2)",
        "get_batch failed (RateLimitError: slow (http_status=429)); retrying in 7.0s (retry 2 of 2)",
    ]


@pytest.mark.parametrize(
    ("exc", "idempotent", "retried"),
    [
        (ServerError("boom", status_code=500), True, True),
        (ServerError("boom", status_code=500), False, False),  # may have acted, cannot look: never blind
        (APIConnectionError("refused", effect="not_sent"), False, True),
        (RateLimitError("slow", status_code=429), False, True),
        (AuthenticationError("key", status_code=401), True, False),
    ],
    ids=["unknown-idempotent", "unknown-create", "not-sent-create", "429-create", "401"],
)
def test_attempts_never_repeat_blindly(exc: VendorAPIError, idempotent: bool, retried: bool) -> None:
    log = Log()
    attempts = RetryPolicy(max_retries=3, rng=_FixedRng()).attempts(
        "create_batch", log, idempotent=idempotent
    )
    assert (attempts.failed(exc) is not None) is retried
    assert len(log.lines) == int(retried)


def test_attempts_stop_when_the_call_cannot_be_repeated() -> None:
    readable = [True]
    attempts = RetryPolicy(max_retries=3).attempts("upload_file", Log(), can_repeat=lambda: readable[0])
    assert attempts.failed(ServerError("boom")) is not None
    readable[0] = False
    assert attempts.failed(ServerError("boom")) is None


def test_no_retry_is_one_attempt() -> None:
    assert NO_RETRY.attempts("get_batch", Log()).failed(ServerError("boom")) is None
