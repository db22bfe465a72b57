from __future__ import annotations

import random

import pytest

from airflow_provider_llmbatch.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    JITTER,
    WARMUP_FRACTION,
    error_delay,
    next_poll_delay,
)


class Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


NO_JITTER = Fixed(0.0)
MAX_JITTER = Fixed(0.999999)


def progress(total: int, completed: int, failed: int = 0, status: str = "in_progress"):
    return {"status": status, "request_counts": {"total": total, "completed": completed, "failed": failed}}


# (elapsed, summary, poll_interval, max_poll_interval) -> expected delay without jitter
TABLE = [
    (0.0, None, 30.0, 300.0, 7.5),  # first poll comes back quickly
    (60.0, None, 30.0, 300.0, 22.5),  # ramping up
    (90.0, None, 30.0, 300.0, 30.0),  # ramp done
    (300.0, None, 30.0, 300.0, 30.0),  # poll_interval
    (1000.0, None, 30.0, 300.0, 50.0),  # grows with elapsed time
    (10_000.0, None, 30.0, 300.0, 300.0),  # capped
    (10_000.0, None, 30.0, 120.0, 120.0),  # capped lower
    (0.0, None, 30.0, 5.0, 5.0),  # cap below poll_interval wins
    (10_000.0, progress(100, 99), 30.0, 300.0, 101.0101),  # near the end: come back around the ETA
    (10_000.0, progress(100, 1), 30.0, 300.0, 300.0),  # far from the end: ETA does not lengthen
    (1000.0, progress(100, 100), 30.0, 300.0, 7.5),  # all done but not terminal yet: floor
    (1000.0, {"status": "finalizing"}, 30.0, 300.0, 30.0),  # short phase: poll_interval at most
    (1000.0, progress(0, 0, status="validating"), 30.0, 300.0, 50.0),  # no progress: no ETA
    (1000.0, {"status": "in_progress", "request_counts": {"total": None}}, 30.0, 300.0, 50.0),
    (-5.0, None, 30.0, 300.0, 7.5),  # a clock step backwards reads as 0
]


@pytest.mark.parametrize(("elapsed", "summary", "interval", "cap", "expected"), TABLE)
def test_delay_table(elapsed, summary, interval, cap, expected):
    delay = next_poll_delay(elapsed, summary, poll_interval=interval, max_poll_interval=cap, rng=NO_JITTER)
    assert delay == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(("elapsed", "summary", "interval", "cap", "expected"), TABLE)
def test_jitter_only_shortens(elapsed, summary, interval, cap, expected):
    delay = next_poll_delay(elapsed, summary, poll_interval=interval, max_poll_interval=cap, rng=MAX_JITTER)
    assert delay == pytest.approx(expected * (1 - JITTER), rel=1e-4)


def test_never_above_cap_and_always_positive():
    rng = random.Random(7)
    for elapsed in [0, 1, 10, 100, 1000, 10_000, 1e6]:
        for interval, cap in [(0.01, 0.05), (1, 10), (30, 300), (600, 60)]:
            for summary in [None, progress(10, 5), progress(10, 0), {"status": "weird"}]:
                delay = next_poll_delay(
                    elapsed, summary, poll_interval=interval, max_poll_interval=cap, rng=rng
                )
                assert 0 < delay <= cap


def test_jitter_spreads_waiters():
    rng = random.Random(1)
    delays = [
        next_poll_delay(300, None, poll_interval=30, max_poll_interval=300, rng=rng) for _ in range(500)
    ]
    assert min(delays) >= 30 * (1 - JITTER)
    assert max(delays) <= 30
    assert max(delays) - min(delays) > 30 * JITTER * 0.8
    assert len({round(d, 6) for d in delays}) > 400


def test_first_poll_is_prompt():
    first = next_poll_delay(0, None, poll_interval=30, max_poll_interval=300, rng=NO_JITTER)
    assert first == pytest.approx(30 * WARMUP_FRACTION)


def test_delays_grow_monotonically_without_progress():
    delays = [
        next_poll_delay(t, None, poll_interval=30, max_poll_interval=300, rng=NO_JITTER)
        for t in range(0, 5000, 50)
    ]
    assert delays == sorted(delays)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_rejects_non_positive_intervals(bad):
    with pytest.raises(ValueError, match="must be positive"):
        next_poll_delay(0, None, poll_interval=bad, max_poll_interval=10)
    with pytest.raises(ValueError, match="must be positive"):
        next_poll_delay(0, None, poll_interval=10, max_poll_interval=bad)


ERROR_TABLE = [
    (1, None, 7.5),
    (2, None, 15.0),
    (3, None, 30.0),
    (5, None, 120.0),
    (6, None, 240.0),
    (7, None, 300.0),
    (1000, None, 300.0),
    (1, 60.0, 60.0),  # Retry-After honoured
    (1, 1000.0, 300.0),  # but capped
    (3, 1.0, 30.0),  # and never shortens the backoff
]


@pytest.mark.parametrize(("errors", "retry_after", "expected"), ERROR_TABLE)
def test_error_delay_table(errors, retry_after, expected):
    delay = error_delay(
        errors, poll_interval=30, max_poll_interval=300, retry_after=retry_after, rng=NO_JITTER
    )
    assert delay == pytest.approx(expected)


def _simulate(duration: float, rng: random.Random) -> tuple[int, float]:
    """Return (polls, seconds the end was seen late) for a batch reporting no progress, with the defaults."""
    elapsed, polls = 0.0, 0
    while True:
        polls += 1
        if elapsed >= duration:
            return polls, elapsed - duration
        elapsed += next_poll_delay(
            elapsed,
            {"status": "in_progress"},
            poll_interval=DEFAULT_POLL_INTERVAL,
            max_poll_interval=DEFAULT_MAX_POLL_INTERVAL,
            rng=rng,
        )


@pytest.mark.parametrize("hours", [2, 20])
def test_defaults_bound_the_resume_latency(hours):
    duration = hours * 3600.0
    for seed in range(20):
        _, late = _simulate(duration, random.Random(seed))
        assert late <= 0.05 * duration


def test_defaults_poll_a_20_hour_batch_5x_less_than_every_minute():
    duration = 20 * 3600.0
    polls, _ = _simulate(duration, random.Random(0))
    assert polls * 5 <= duration / 60


def test_delay_after_poll_backs_off_after_errors_and_adapts_otherwise() -> None:
    from airflow_provider_llmbatch.polling import delay_after_poll

    backoff = delay_after_poll(
        100.0, None, errors=3, retry_after=7.0, poll_interval=30.0, max_poll_interval=600.0
    )
    assert 7.0 <= backoff <= 600.0  # the vendor's Retry-After is honoured, within the cap
    adaptive = delay_after_poll(
        10.0, None, errors=0, retry_after=None, poll_interval=30.0, max_poll_interval=600.0
    )
    assert 0 < adaptive <= 30.0


@pytest.mark.parametrize(
    ("poll_seconds", "expected"),
    [
        (0.0, 30.0),  # steady state, no jitter: the interval itself
        (0.25, 29.5),  # twice the round trip comes off, so the next answer lands within the interval
        (5.0, 20.0),
        (20.0, 15.0),  # never more than half: a slow vendor is not polled in a tight loop
        (-1.0, 30.0),  # a clock step backwards changes nothing
    ],
)
def test_delay_after_a_poll_is_shortened_by_its_round_trip(
    poll_seconds: float, expected: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_llmbatch import polling

    monkeypatch.setattr(polling.random, "random", lambda: 0.0)
    delay = polling.delay_after_poll(
        10 * 30.0,
        None,
        errors=0,
        retry_after=None,
        poll_interval=30.0,
        max_poll_interval=30.0,
        poll_seconds=poll_seconds,
    )
    assert delay == pytest.approx(expected)
    # Error backoff and Retry-After are the vendor's to set: never shortened.
    after_error = polling.delay_after_poll(
        10 * 30.0,
        None,
        errors=1,
        retry_after=12.0,
        poll_interval=30.0,
        max_poll_interval=30.0,
        poll_seconds=poll_seconds,
    )
    assert after_error == pytest.approx(12.0)
