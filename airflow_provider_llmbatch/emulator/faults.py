"""Fault injection: rules that make matching requests fail, stall or break, and per-minute rate limits."""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

Operation = Literal[
    "upload",
    "create",
    "get_batch",
    "list_batches",
    "cancel",
    "get_file",
    "list_files",
    "download",
    "delete_file",
]
FaultKind = Literal[
    "429",
    "429_retry_after",
    "500",
    "502",
    "503",
    "reset",
    "slow",
    "malformed",
    "html",
    "reset_after",
    "stall_after",
    "reset_mid_body",
    "stall_mid_body",
]

OPERATIONS: frozenset[str] = frozenset(get_args(Operation))
FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))

AFTER_EFFECT_KINDS: frozenset[str] = frozenset(
    {"reset_after", "stall_after", "reset_mid_body", "stall_mid_body"}
)
"""Kinds that let the request take effect (a file stored, a batch created) and then break the answer."""

# Which documented rate-limit bucket (EmulatorDialect.rate_limits_per_minute) an operation counts against.
RATE_BUCKETS: Mapping[str, str] = {
    "create": "create",
    "get_batch": "retrieve",
    "cancel": "cancel",
    "list_batches": "list",
}


MAX_SECONDS = 3600.0
"""The longest delay or latency the emulator takes: longer only ever hangs a test."""

MAX_CLOCK_STEP = 1e9
"""The longest step the emulator's clock moves at once: a step is data, not a wait, but it must be finite."""


def check_number(name: str, value: Any, *, high: float) -> float:
    """Return ``value`` as a float from 0 to ``high``; raise ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise ValueError(f"{name} must be a number from 0 to {high:g}, got {value!r}")
    return float(value)


@dataclass
class FaultRule:
    """
    A fault to inject into matching requests.

    :param kind: what happens: an HTTP error status (``429``, ``429_retry_after``, ``500``, ``502``, ``503``),
        ``reset`` (the connection drops without a response), ``slow`` (the answer comes ``delay`` seconds
        late), ``malformed`` (a 200 with a truncated, non-JSON body) or ``html`` (a gateway's HTML page, 502).
        The following kinds let the request take effect first and then lose the answer: ``reset_after``
        (the connection drops instead of the response), ``stall_after`` (no response for ``delay`` seconds,
        then the connection drops: the client's read timeout), ``reset_mid_body`` (the status, headers and
        the first ``after_bytes`` bytes of the body, then the connection drops) and ``stall_mid_body``
        (the same start, then ``delay`` seconds of silence, then the drop).
    :param vendor: the vendor it applies to (None: all).
    :param operation: the operation it applies to (None: all).
    :param times: how many matching requests it hits before it is spent (None: unlimited).
    :param probability: the chance a matching request is hit (seeded, reproducible).
    :param delay: seconds of delay for ``slow``.
    :param retry_after: the ``Retry-After`` seconds sent by ``429_retry_after``.
    :param after_bytes: body bytes sent before ``reset_mid_body``/``stall_mid_body`` break the answer
        (None: half the body).
    """

    kind: FaultKind
    vendor: str | None = None
    operation: Operation | None = None
    times: int | None = 1
    probability: float | None = None
    delay: float = 1.0
    retry_after: float = 1.0
    after_bytes: int | None = None

    def __post_init__(self) -> None:
        # isinstance first: a list is not hashable, and the message must still name the field.
        if not isinstance(self.kind, str) or self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {sorted(FAULT_KINDS)}, got {self.kind!r}")
        if self.vendor is not None and not isinstance(self.vendor, str):
            raise ValueError(f"vendor must be a vendor name or None, got {self.vendor!r}")
        if self.operation is not None and (
            not isinstance(self.operation, str) or self.operation not in OPERATIONS
        ):
            raise ValueError(f"operation must be one of {sorted(OPERATIONS)} or None, got {self.operation!r}")
        if self.probability is not None:
            check_number("probability", self.probability, high=1.0)
        for name in ("times", "after_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a whole number >= 0 or None, got {value!r}")
        check_number("delay", self.delay, high=MAX_SECONDS)
        check_number("retry_after", self.retry_after, high=MAX_SECONDS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultRule:
        """Build a rule from its JSON form; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault rule fields: {sorted(unknown)}")
        values = dict(data)
        if "kind" in values:
            values["kind"] = str(values["kind"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Return the rule as JSON primitives."""
        return asdict(self)

    def matches(self, vendor: str, operation: str) -> bool:
        """Return True when the rule applies to this vendor and operation and is not spent."""
        if self.times is not None and self.times <= 0:
            return False
        return (self.vendor in (None, vendor)) and (self.operation in (None, operation))


class FaultSet:
    """
    The active fault rules, a global latency and the rate limiter, safe to use from any thread.

    :param seed: seed of the generator deciding probabilistic faults.
    """

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._rng = random.Random(seed)
        self._rules: list[FaultRule] = []
        self.latency = 0.0
        self.hits = 0

    def add(self, rule: FaultRule) -> None:
        """Activate a rule (rules are tried in the order added)."""
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        """Drop every rule and the latency; reseed the generator."""
        with self._lock:
            self._rules.clear()
            self.latency = 0.0
            self.hits = 0
            self._rng = random.Random(self._seed)

    def rules(self) -> list[FaultRule]:
        """Return the active rules (spent ones included, with ``times`` at 0)."""
        with self._lock:
            return list(self._rules)

    def pick(self, vendor: str, operation: str) -> FaultRule | None:
        """Return the fault this request suffers, if any, spending one use of the rule."""
        with self._lock:
            for rule in self._rules:
                if not rule.matches(vendor, operation):
                    continue
                if rule.probability is not None and self._rng.random() >= rule.probability:
                    continue
                if rule.times is not None:
                    rule.times -= 1
                self.hits += 1
                return rule
        return None


class RateLimiter:
    """
    A sliding one-minute window per vendor and bucket.

    :param enabled: whether limits are enforced.
    """

    def __init__(self, enabled: bool = False) -> None:
        self._lock = threading.Lock()
        self.enabled = enabled
        self._hits: dict[tuple[str, str], deque[float]] = {}

    def reset(self, enabled: bool) -> None:
        """Forget every hit and set whether limits are enforced."""
        with self._lock:
            self.enabled = enabled
            self._hits.clear()

    def check(self, vendor: str, limits: Mapping[str, int], operation: str, now: float) -> float | None:
        """Count a request; return seconds until a slot frees when it is over the limit, else None."""
        bucket = RATE_BUCKETS.get(operation)
        if not self.enabled or bucket is None or bucket not in limits:
            return None
        with self._lock:
            window = self._hits.setdefault((vendor, bucket), deque())
            while window and window[0] <= now - 60.0:
                window.popleft()
            if len(window) >= limits[bucket]:
                return max(0.0, window[0] + 60.0 - now)
            window.append(now)
            return None
