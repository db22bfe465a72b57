"""
The poll state machine as tables: the schedule's functions, the duration check, and one step per case.

The schedule's promises over whole waits (start-to-start spacing, mean, errors, slot waits) are drawn
by hypothesis in ``test_polling_schedule.py``.
"""

from __future__ import annotations

import json
import math
import random
from datetime import timedelta
from typing import Any

import pytest

from airflow_provider_llmbatch import polling
from airflow_provider_llmbatch.checks import MAX_WAIT_SECONDS, check_seconds
from airflow_provider_llmbatch.exceptions import InvalidInputError, RateLimitError
from airflow_provider_llmbatch.outcomes import describe
from airflow_provider_llmbatch.polling import (
    JITTER,
    QUIET_LOG_SECONDS,
    Cancel,
    Finish,
    Poller,
    Wait,
    error_delay,
    scheduled_delay,
    spread,
)
from tests.pollkit import (
    FATAL_ERRORS,
    START,
    TERMINAL,
    TRANSIENT_ERRORS,
    Fixed,
    RecordingLog,
    batch,
    error_id,
)


def progress(total: int | None, completed: int, failed: int = 0, status: str = "in_progress") -> dict:
    return {"status": status, "request_counts": {"total": total, "completed": completed, "failed": failed}}


# -- the adaptive schedule -------------------------------------------------------------------------

# (elapsed, summary, poll_interval, max_poll_interval) -> scheduled delay. The cap is max_poll_interval
# less 2% of it (at most 1 s): room for the answer's way back.
SCHEDULE = [
    (0.0, None, 30.0, 300.0, 7.5),  # the first poll comes back after a quarter of poll_interval
    (60.0, None, 30.0, 300.0, 22.5),  # ramping up...
    (90.0, None, 30.0, 300.0, 30.0),  # ...to poll_interval
    (300.0, None, 30.0, 300.0, 30.0),
    (1000.0, None, 30.0, 300.0, 50.0),  # then 5% of the time waited so far
    (10_000.0, None, 30.0, 300.0, 299.0),  # capped
    (10_000.0, None, 30.0, 120.0, 119.0),
    (0.0, None, 30.0, 5.0, 4.9),  # a cap below the first delay wins
    (10_000.0, progress(100, 99), 30.0, 300.0, 10_000 / 99),  # near the end: back around the ETA
    (10_000.0, progress(100, 1), 30.0, 300.0, 299.0),  # far from it: the ETA never lengthens a delay
    (1000.0, progress(100, 100), 30.0, 300.0, 7.5),  # all done, not terminal yet: the floor
    (1000.0, progress(100, 60, 40), 30.0, 300.0, 7.5),  # failed requests count as done
    (1000.0, {"status": "finalizing"}, 30.0, 300.0, 30.0),  # a short phase: poll_interval at most
    (1000.0, {"status": "cancelling"}, 30.0, 300.0, 30.0),
    (1000.0, progress(0, 0, status="validating"), 30.0, 300.0, 50.0),  # no progress: no ETA
    (1000.0, progress(None, 5), 30.0, 300.0, 50.0),  # unreadable counts: no ETA
    (-5.0, None, 30.0, 300.0, 7.5),  # a clock step backwards reads as no time waited
]


@pytest.mark.parametrize(("elapsed", "summary", "interval", "cap", "expected"), SCHEDULE)
def test_scheduled_delay_table(elapsed, summary, interval, cap, expected):
    delay = scheduled_delay(elapsed, summary, poll_interval=interval, max_poll_interval=cap)
    assert delay == pytest.approx(expected, rel=1e-9)


def test_scheduled_delays_grow_without_progress_and_stay_under_the_cap():
    delays = [scheduled_delay(t, None, poll_interval=30, max_poll_interval=600) for t in range(0, 20_000, 37)]
    assert delays == sorted(delays)
    assert delays[0] == 7.5
    assert max(delays) < 600


# (scheduled, consecutive errors, Retry-After, max_poll_interval) -> delay
ERROR_DELAYS = [
    (7.5, 1, None, 300.0, 7.5),  # the first error: the scheduled delay, never sooner
    (7.5, 2, None, 300.0, 15.0),  # then doubling
    (7.5, 3, None, 300.0, 30.0),
    (7.5, 6, None, 300.0, 240.0),
    (7.5, 7, None, 300.0, 300.0),  # up to max_poll_interval
    (7.5, 10_000, None, 300.0, 300.0),
    (50.0, 1, None, 30.0, 50.0),  # a scheduled delay above the cap stays
    (7.5, 1, 60.0, 300.0, 60.0),  # the vendor's Retry-After is honoured
    (7.5, 1, 1000.0, 300.0, 1000.0),  # even past the cap: polling sooner only earns another 429
    (30.0, 3, 1.0, 300.0, 120.0),  # and never shortens the backoff
    (30.0, 1, 0.0, 300.0, 30.0),
]


@pytest.mark.parametrize(("scheduled", "errors", "retry_after", "cap", "expected"), ERROR_DELAYS)
def test_error_delay_table(scheduled, errors, retry_after, cap, expected):
    assert error_delay(scheduled, errors, retry_after, cap) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("low", "draw", "factor"),
    [
        (-JITTER, 0.0, 0.9),  # the first wait: ±10%...
        (-JITTER, 0.5, 1.0),  # ...centred on the scheduled delay
        (-JITTER, 0.999999, 1.1),
        (0.0, 0.0, 1.0),  # an error wait: never sooner, up to 10% later
        (0.0, 0.999999, 1.1),
    ],
)
def test_spread_table(low, draw, factor):
    assert spread(40.0, Fixed(draw), low=low) == pytest.approx(40.0 * factor, rel=1e-5)


@pytest.mark.parametrize("draw", [0.0, 0.1, 0.25, 0.4999, 0.73, 0.999999])
def test_the_first_wait_spread_is_mean_zero(draw):
    # Drawn uniformly, r and 1 - r are equally likely: their spreads average to the delay itself.
    assert spread(40.0, Fixed(draw)) + spread(40.0, Fixed(1 - draw)) == pytest.approx(80.0, rel=1e-12)


# -- the one check of every duration argument -------------------------------------------------------

BAD_DURATIONS = [math.nan, math.inf, -math.inf, -5, 0, 0.0, 1e30, MAX_WAIT_SECONDS + 1, "30", True, None]


@pytest.mark.parametrize("bad", BAD_DURATIONS, ids=repr)
def test_check_seconds_refuses(bad):
    with pytest.raises(InvalidInputError, match=r"^poll_interval must be .*got "):
        check_seconds("poll_interval", bad)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), (0.25, 0.25), (timedelta(hours=2), 7200.0), (MAX_WAIT_SECONDS, MAX_WAIT_SECONDS)],
)
def test_check_seconds_accepts(value, seconds):
    assert check_seconds("timeout", value) == seconds


def test_check_seconds_allows_zero_only_when_asked():
    assert check_seconds("margin", 0, allow_zero=True) == 0.0
    with pytest.raises(InvalidInputError, match="from 0 to 10 seconds, got -1"):
        check_seconds("margin", -1, allow_zero=True, maximum=10)


# -- one step of the state machine ------------------------------------------------------------------

INTERVALS = {"poll_interval": 30.0, "max_poll_interval": 600.0}


def poller(**kwargs: Any) -> Poller:
    settings: dict[str, Any] = {
        "started": START,
        **INTERVALS,
        "deadline": None,
        "cancel_on_timeout": True,
        "max_consecutive_errors": 3,
        "log": RecordingLog(),
        "rng": Fixed(0.5),
    }
    return Poller("batch_1", **{**settings, **kwargs})


@pytest.mark.parametrize("status", TERMINAL)
def test_a_terminal_batch_finishes(status):
    p = poller()
    step = p.after(batch(status, completed=10), sent_at=START, now=START + 1)
    assert step == Finish("terminal", describe(batch(status, completed=10).summary()))
    event = p.event(step)
    assert event == {
        "event": "terminal",
        "batch_id": "batch_1",
        "batch": batch(status, completed=10).summary(),
        "batches": [batch(status, completed=10).summary()],
        "message": step.message,
        "polls": 1,
    }
    assert json.loads(json.dumps(event)) == event


@pytest.mark.parametrize(
    "status", ["validating", "in_progress", "finalizing", "cancelling", "paused_by_vendor"]
)
def test_a_batch_still_running_is_polled_again(status):
    p = poller(log=RecordingLog())
    # The answer took 2 s: the next poll starts the delay scheduled at 2 s after this one started.
    assert p.after(batch(status), sent_at=START, now=START + 2) == Wait(
        pytest.approx(30 * (0.25 + 2 / 120) - 2)
    )
    if status == "paused_by_vendor":
        assert "'paused_by_vendor', which no vendor documents" in p.log.text("warning")


def test_an_answer_slower_than_the_delay_starts_the_next_poll_at_once():
    assert poller().after(batch(), sent_at=START, now=START + 60) == Wait(0.0)


def test_waiters_started_together_are_spread_by_their_first_wait():
    rng = random.Random(1)
    firsts = [poller(rng=rng).after(batch(), sent_at=START, now=START).seconds for _ in range(500)]
    assert 7.5 * (1 - JITTER) - 1e-6 <= min(firsts) < max(firsts) <= 7.5 * (1 + JITTER) + 1e-6
    assert max(firsts) - min(firsts) > 7.5 * 2 * JITTER * 0.9
    assert len({round(f, 6) for f in firsts}) > 400
    assert sum(firsts) / len(firsts) == pytest.approx(7.5, rel=0.01)


@pytest.mark.parametrize("error", TRANSIENT_ERRORS, ids=error_id)
def test_a_transient_error_waits_the_error_delay_and_counts(error):
    p = poller(log=RecordingLog())
    first = p.after(error, sent_at=START, now=START)
    assert first == Wait(pytest.approx(7.5 * 1.05))  # error waits are spread upwards only
    assert p.errors == 1
    second = p.after(error, sent_at=START + 10, now=START + 10)
    assert second == Wait(pytest.approx(scheduled_delay(10, None, **INTERVALS) * 2 * 1.05))
    assert p.errors == 2
    assert p.log.text("warning").count("will retry") == 2
    assert str(error) in p.log.text("warning")


def test_retry_after_sets_the_error_wait():
    step = poller().after(RateLimitError("slow down", retry_after=42.0), sent_at=START, now=START)
    assert step == Wait(pytest.approx(42.0 * 1.05))


def test_a_good_poll_resets_the_error_count():
    p = poller(max_consecutive_errors=2)
    assert isinstance(p.after(TRANSIENT_ERRORS[0], sent_at=START, now=START), Wait)
    assert isinstance(p.after(batch(), sent_at=START + 10, now=START + 10), Wait)
    assert p.errors == 0
    assert isinstance(p.after(TRANSIENT_ERRORS[0], sent_at=START + 20, now=START + 20), Wait)


@pytest.mark.parametrize("error", TRANSIENT_ERRORS, ids=error_id)
def test_max_consecutive_errors_finishes_with_an_error(error):
    p = poller(max_consecutive_errors=3)
    steps = [p.after(error, sent_at=START + i, now=START + i) for i in range(3)]
    assert [type(s) for s in steps] == [Wait, Wait, Finish]
    assert steps[-1].kind == "error"
    assert f"Polling batch batch_1 failed 3 times in a row; last error: {error}" == steps[-1].message
    assert p.event(steps[-1])["polls"] == 3
    assert p.event(steps[-1])["batch"] is None


@pytest.mark.parametrize("error", FATAL_ERRORS, ids=error_id)
def test_a_fatal_error_finishes_at_once(error):
    p = poller(max_consecutive_errors=10, log=RecordingLog())
    step = p.after(error, sent_at=START, now=START)
    assert step == Finish("error", f"Polling batch batch_1 failed: {type(error).__name__}: {error}")
    assert step.message in p.log.text("error")


@pytest.mark.parametrize(
    ("cancel_on_timeout", "expected"),
    [(True, Cancel("the deadline passed")), (False, "; left running (cancel_on_timeout=False)")],
)
@pytest.mark.parametrize("result", [batch(), TRANSIENT_ERRORS[1]], ids=["running", "transient error"])
def test_the_deadline_cancels_or_times_out(cancel_on_timeout, expected, result):
    p = poller(deadline=START + 100, cancel_on_timeout=cancel_on_timeout)
    step = p.after(result, sent_at=START + 99, now=START + 100)
    if isinstance(expected, Cancel):
        assert step == expected
    else:
        assert step == Finish("timeout", f"Batch batch_1 did not finish before the deadline{expected}")


def test_a_terminal_batch_at_the_deadline_wins():
    step = poller(deadline=START).after(batch("completed"), sent_at=START + 5, now=START + 10)
    assert isinstance(step, Finish)
    assert step.kind == "terminal"


def test_the_last_wait_ends_at_the_deadline():
    assert poller(deadline=START + 3).after(batch(), sent_at=START, now=START + 1) == Wait(pytest.approx(2.0))


@pytest.mark.parametrize(
    ("cancelled", "message", "summary"),
    [
        ({"batch_id": "batch_1", "status": "cancelling"}, "; cancel requested (status now cancelling)", True),
        (None, "; the cancel request failed", False),
    ],
)
def test_after_cancel(cancelled, message, summary):
    p = poller(deadline=START)
    p.after(batch(), sent_at=START, now=START)
    step = p.after_cancel(cancelled)
    assert step == Finish("timeout", f"Batch batch_1 did not finish before the deadline{message}")
    event = p.event(step)
    assert event["event"] == "timeout"
    assert event["batch"] == (cancelled if summary else batch().summary())


@pytest.mark.parametrize(("quiet", "lines"), [(QUIET_LOG_SECONDS, 2), (0.0, 4)])
def test_progress_is_logged_when_it_changes_or_after_a_quiet_spell(monkeypatch, quiet, lines):
    from airflow_provider_llmbatch import polling

    monkeypatch.setattr(polling, "QUIET_LOG_SECONDS", quiet)
    p = poller(log=RecordingLog())
    for i in range(3):
        p.after(batch(total=4), sent_at=START + 10 * i, now=START + 10 * i + 1)
    p.after(batch("completed", total=4, completed=4), sent_at=START + 30, now=START + 31)
    progress_lines = [m for level, m in p.log.lines if level == "info" and "rate" in m]
    assert len(progress_lines) == lines
    assert all("ETA" in m and "of 4" in m for m in progress_lines)
    assert "status in_progress, 0 completed, 0 failed of 4" in progress_lines[0]
    assert "status completed, 4 completed" in progress_lines[-1]
    assert "8.0 requests/min" in progress_lines[-1]  # 4 requests in the 30 s since the first poll


@pytest.mark.parametrize("retry_after", [7200.0, 1e9, float("inf")])
def test_a_hostile_retry_after_cannot_park_a_wait(retry_after: float) -> None:
    assert polling.error_delay(10.0, 1, retry_after, 600.0) == polling.MAX_RETRY_AFTER
    assert polling.error_delay(10.0, 1, retry_after, 7200.0) == 7200.0


@pytest.mark.parametrize("deadline", [float("nan"), float("inf"), True, "1700000000"])
def test_a_trigger_refuses_a_deadline_that_is_not_a_time(deadline: object) -> None:
    from airflow_provider_llmbatch.triggers.batch import BatchTrigger

    with pytest.raises(InvalidInputError, match="deadline"):
        BatchTrigger("c", "b", deadline=deadline)  # type: ignore[arg-type]
