"""Settings of the emulator: time scale, phase durations, which requests fail, which vendors are served."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

Clock = Callable[[], float]
"""A clock: seconds since the epoch, like :func:`time.time`."""

DEFAULT_API_KEY = "emulator-key"

DEFAULT_TIME_SCALE = 15.0
"""The time scale of ``EmulatorConfig()`` and ``llmbatch-emulator``: a batch lasts about 21 s, 15 s of it
``in_progress``, so a sensor defers and its trigger polls for real. Tests pass a small scale (the pytest
fixtures use 0.1: about 0.14 s a batch)."""


@dataclass(frozen=True)
class EmulatorConfig:
    """
    How the emulator behaves; every duration is multiplied by ``time_scale``.

    A batch spends ``validating_seconds + in_progress_seconds + finalizing_seconds`` (1.4 s) times
    ``time_scale`` before it completes.

    :param time_scale: multiplier of every phase duration and completion window (0 makes batches instant).
        (default: 15, about 21 s a batch)
    :param validating_seconds: time a batch spends ``validating``.
    :param in_progress_seconds: time a batch spends ``in_progress``; request counts grow during it.
    :param finalizing_seconds: time a batch spends ``finalizing``.
    :param cancelling_seconds: time a batch spends ``cancelling``.
    :param window_seconds_per_hour: emulated seconds per hour of ``completion_window`` (real: 3600).
    :param fail_custom_id_pattern: requests whose ``custom_id`` matches end in the error file.
    :param transient_custom_id_pattern: requests whose ``custom_id`` matches fail once, rate limited (the
        vendor's 429 code): the first batch that runs them writes them to the error file, a later batch
        (a resubmission) answers them.
    :param rate_limits: whether the vendors' documented per-minute rate limits are enforced.
    :param seed: seed of the random generator used by probabilistic faults.
    :param max_problems: validation problems reported per file.
    :param vendors: the vendor specs served, by name (default: the registry).
    :param replies: canned chat answers as ``(regex, reply)`` pairs, tried in order on the last user
        message (first match wins); a request that matches none gets an echo of its prompt, or, when it
        asks for JSON (``response_format``), a JSON object built from its schema
        (:mod:`~airflow_provider_llmbatch.emulator.structured`).
    :param invalid_output_custom_id_pattern: requests asking for JSON whose ``custom_id`` matches get an
        invalid answer (not JSON, or JSON missing a required field) unless a canned reply matches.
    :param echo_credentials: answer a wrong key with a 401 that quotes the ``Authorization`` header it got,
        as careless gateways do (to prove clients redact it; default: off).
    :param upload_bytes_per_second: take upload bodies in no faster than this, as a link to the vendor
        does (TCP flow control slows the client down to it); None takes them as fast as loopback allows.
    """

    time_scale: float = DEFAULT_TIME_SCALE
    validating_seconds: float = 0.2
    in_progress_seconds: float = 1.0
    finalizing_seconds: float = 0.2
    cancelling_seconds: float = 0.2
    window_seconds_per_hour: float = 3600.0
    fail_custom_id_pattern: str = "^fail"
    transient_custom_id_pattern: str = "^retry"
    rate_limits: bool = False
    seed: int = 0
    max_problems: int = 20
    vendors: Mapping[str, VendorSpec] = field(default_factory=lambda: dict(REGISTRY))
    replies: tuple[tuple[str, str], ...] = ()
    invalid_output_custom_id_pattern: str = "^badjson"
    echo_credentials: bool = False
    upload_bytes_per_second: float | None = None

    def __post_init__(self) -> None:
        if self.time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {self.time_scale}")
        if self.upload_bytes_per_second is not None and self.upload_bytes_per_second <= 0:
            raise ValueError(f"upload_bytes_per_second must be > 0, got {self.upload_bytes_per_second}")
        re.compile(self.fail_custom_id_pattern)
        re.compile(self.transient_custom_id_pattern)
        re.compile(self.invalid_output_custom_id_pattern)
        for pattern, _ in self.replies:
            re.compile(pattern)

    def reply_to(self, text: str) -> str | None:
        """Return the canned reply for a prompt, or None when no pattern matches."""
        return next((reply for pattern, reply in self.replies if re.search(pattern, text)), None)

    def invalid_output(self, custom_id: str) -> bool:
        """Return whether a request asking for JSON gets an invalid answer (no canned reply matching)."""
        return re.search(self.invalid_output_custom_id_pattern, custom_id) is not None

    def scaled(self, seconds: float) -> float:
        """Return a duration on the emulator's time scale."""
        return seconds * self.time_scale

    def phase_seconds(self, status: str) -> float:
        """Return how long a batch stays in ``status`` before moving on (scaled)."""
        base = {
            "validating": self.validating_seconds,
            "in_progress": self.in_progress_seconds,
            "finalizing": self.finalizing_seconds,
            "cancelling": self.cancelling_seconds,
        }.get(status, 0.0)
        return self.scaled(base)


class OffsetClock:
    """
    A clock that can be moved forward, on top of a base clock.

    :param base: the underlying clock (default: :func:`time.time`).
    """

    def __init__(self, base: Clock | None = None) -> None:
        self._base: Clock = base or time.time
        self.offset = 0.0

    def __call__(self) -> float:
        """Return the time: the base clock plus the offset."""
        return self._base() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.offset += seconds
