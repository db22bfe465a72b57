"""
The one retry policy of the provider, declared once and tested as a table.

A failed call is sorted into one of three classes (:func:`classify`):

* ``not_sent``: the vendor certainly did nothing (the connection never opened, or a 429 refused the
  call). Every operation may repeat it.
* ``unknown``: the request may have been acted on (a timeout after sending, a reset mid-response,
  a 5xx). Reads, deletes and cancels repeat it; a create or an upload must not, because a blind
  repeat may pay for a second batch or store a second copy. Those operations look their object up
  first (:attr:`Action.RECOVER`) and repeat only when it is not there.
* ``None``: retrying will not help (400, 401, 403, 404, quota, malformed body).

Waits are capped exponential backoff with full jitter, or the vendor's ``Retry-After`` (capped).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    Effect,
    RateLimitError,
    ServerError,
    VendorAPIError,
    WrongObjectError,
)

RetryClass = Effect


def classify(exc: BaseException) -> RetryClass | None:
    """
    Return how a failure may be retried: ``not_sent``, ``unknown`` (effect unknown) or None (never).

    :param exc: an exception raised by a hook call.
    """
    if isinstance(exc, RateLimitError):
        return "not_sent"
    if isinstance(exc, ServerError | WrongObjectError):
        return "unknown"
    if isinstance(exc, APIConnectionError):
        return exc.effect
    return None


class Action(Enum):
    """What to do after a failed attempt."""

    RAISE = "raise"
    RETRY = "retry"
    RECOVER = "recover"
    """Look the object up (it may exist although the call failed); repeat only if it does not."""


@dataclass(frozen=True)
class Decision:
    """
    The outcome of :meth:`RetryPolicy.decide`.

    :param action: raise, retry, or look up then retry.
    :param wait: seconds to wait before the next attempt (or the look-up).
    """

    action: Action
    wait: float = 0.0


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """
    Return the seconds a response asks us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be seconds or an HTTP date; anything unreadable is ignored (None).

    :param headers: the response headers (case-insensitive mapping such as ``httpx.Headers``).
    :param now: the current time, for HTTP dates (default: the wall clock).
    """
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            value = float(millis) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0 and value == value:
            return value
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = now or datetime.now(tz=UTC)
        return max(0.0, (when - current).total_seconds())
    if seconds != seconds or seconds < 0:
        return None
    return seconds


async def _asyncio_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """
    When and how long to wait before repeating a failed call; builds the one retry loop of both faces.

    :param max_retries: retries after the first attempt (default: 5; the connection extra ``max_retries``).
    :param base_delay: the backoff's first ceiling in seconds (default: 0.5).
    :param max_delay: the largest backoff ceiling in seconds (default: 30).
    :param max_retry_after: the longest ``Retry-After`` honoured, in seconds (default: 120).
    :param rng: the random source of the jitter (inject a seeded one in tests).
    :param sleep: how the sync face waits (default: ``time.sleep``).
    :param asleep: how the async face waits (default: ``asyncio.sleep``).
    """

    max_retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    asleep: Callable[[float], Awaitable[None]] = field(default=_asyncio_sleep, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("delays must be >= 0")

    def backoff(self, attempt: int) -> float:
        """
        Return the wait after failed attempt number ``attempt`` (1-based): full jitter under a capped ceiling.

        :param attempt: how many attempts have failed so far.
        """
        ceiling = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        return self.rng.uniform(0.0, ceiling)

    def wait_for(self, exc: BaseException, attempt: int) -> float:
        """
        Return the wait before the next attempt: the vendor's ``Retry-After`` (capped) or the backoff.

        :param exc: the failure.
        :param attempt: how many attempts have failed so far.
        """
        retry_after = exc.retry_after if isinstance(exc, VendorAPIError) else None
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_retry_after)
        return self.backoff(attempt)

    def decide(self, exc: BaseException, *, attempt: int, idempotent: bool) -> Decision:
        """
        Return what to do after attempt number ``attempt`` (1-based) failed with ``exc``.

        :param exc: the failure.
        :param attempt: how many attempts have failed so far.
        :param idempotent: whether repeating the call is harmless (reads, deletes, cancels).
        """
        kind = classify(exc)
        if kind is None or attempt > self.max_retries:
            return Decision(Action.RAISE)
        wait = self.wait_for(exc, attempt)
        if kind == "unknown" and not idempotent:
            return Decision(Action.RECOVER, wait)
        return Decision(Action.RETRY, wait)

    def with_max_retries(self, max_retries: int) -> RetryPolicy:
        """Return a copy with another ``max_retries``, sharing the RNG and sleep functions."""
        return replace(self, max_retries=max_retries)

    def attempts(
        self,
        operation: str,
        log: Any,
        *,
        idempotent: bool = True,
        can_repeat: Callable[[], bool] | None = None,
    ) -> Attempts:
        """
        Return the attempts of one call: the loop of each face asks it, after a failure, what to do.

        :param operation: the call's name, for the log.
        :param log: where each retry is logged.
        :param idempotent: whether an attempt of unknown effect may be repeated as it is (a create or an
            upload that looks its object up first counts as idempotent).
        :param can_repeat: whether another attempt is possible at all (a consumed stream is not).
        """
        return Attempts(self, operation, log, idempotent=idempotent, can_repeat=can_repeat)


class Attempts:
    """
    The attempts of one call, and the one decision after each failure: wait N seconds, or give up.

    Both faces run the same few lines around it (``try`` the call; on a failure, ``failed`` gives the
    wait or None; sleep, or re-raise), with ``time.sleep`` or ``asyncio.sleep``. It is a plain object
    rather than a retry library's loop: a triggerer makes thousands of calls a minute, and each call's
    loop state must be freed at once, not left in reference cycles for the garbage collector.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        operation: str,
        log: Any,
        *,
        idempotent: bool,
        can_repeat: Callable[[], bool] | None,
    ) -> None:
        self.policy = policy
        self.operation = operation
        self.log = log
        self.idempotent = idempotent
        self.can_repeat = can_repeat
        self.failures = 0

    def failed(self, exc: BaseException) -> float | None:
        """Count a failed attempt; return the wait before the next one, or None to give up (re-raise)."""
        self.failures += 1
        if self.can_repeat is not None and not self.can_repeat():
            return None
        decision = self.policy.decide(exc, attempt=self.failures, idempotent=self.idempotent)
        if decision.action is not Action.RETRY:
            # RECOVER included: a call that may have taken effect and cannot look for what it made (it
            # would say idempotent=True) must not be repeated blindly.
            return None
        self.log.warning(
            "%s failed (%s); retrying in %.1fs (retry %d of %d)",
            self.operation,
            exc,
            decision.wait,
            self.failures,
            self.policy.max_retries,
        )
        return decision.wait


NO_RETRY = RetryPolicy(max_retries=0)
"""One attempt only: for callers that own the wait between attempts themselves (polls)."""
