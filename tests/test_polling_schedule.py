"""
The schedule's promises about the user's API quota, drawn by hypothesis on a simulated clock.

A wait is simulated as the trigger runs it: sleep the :class:`Wait`, queue for a connection slot, start
the poll (the start is when the slot is held), get an answer or an error some time later, ask the
:class:`Poller`. Hypothesis draws everything else: intervals, deadline, slot waits, poll durations,
progress, transient errors with or without ``Retry-After``, and the jitter. For every wait:

* two polls never start closer than the scheduled delay less its jitter (0.9 x), after an error never
  closer than the error delay, itself never shorter than the scheduled one or ``Retry-After``; the one
  exception is the last poll, made at the deadline;
* on average they start at least the scheduled delay apart (the jitter is mean-zero);
* never more often than a quarter of ``poll_interval`` (or the cap), and a poll whose answer took longer
  than the wait starts the next at once, never later than the (spread) delay.

The "scheduled delay" is the public schedule's: :func:`scheduled_delay` at the time of the answer, and
:func:`error_delay` over it after a failed poll.
"""

from __future__ import annotations

import copy
import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch.exceptions import VendorAPIError
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    JITTER,
    Finish,
    Poller,
    Step,
    Wait,
    error_delay,
    scheduled_delay,
)
from tests.pollkit import TRANSIENT_ERRORS, Cycle, Fixed, RecordingLog, batch

EPS = 1e-6
PROPERTIES = settings(max_examples=300, deadline=None)


@dataclass(frozen=True)
class Poll:
    """One poll of a simulated wait: queue ``slot`` s for a connection, answer ``duration`` s later."""

    slot: float
    duration: float
    result: Batch | VendorAPIError


@dataclass(frozen=True)
class Scenario:
    poll_interval: float
    max_poll_interval: float
    deadline_in: float | None
    cancel_on_timeout: bool
    max_consecutive_errors: int
    polls: list[Poll]
    draws: list[float]


@dataclass(frozen=True)
class Taken:
    """One simulated poll: when it started and got its answer, what it read, the step and the delay."""

    start: float
    end: float
    result: Batch | VendorAPIError
    failed: bool
    retry_after: float | None
    scheduled: float
    """The delay the schedule puts after this poll: scheduled_delay, or error_delay over it."""
    step: Step
    before: Poller
    """The state machine just before this poll's answer (to ask it again with other jitter)."""


def _running() -> st.SearchStrategy[Batch]:
    def build(total: int, completed: int, failed: int, status: str) -> Batch:
        completed = min(completed, total)
        return batch(status, total=total, completed=completed, failed=min(failed, total - completed))

    counts = st.integers(0, 1000)
    statuses = st.sampled_from(["validating", "in_progress", "finalizing", "cancelling", "paused"])
    return st.builds(build, counts, counts, counts, statuses)


def _error() -> st.SearchStrategy[VendorAPIError]:
    def build(error: VendorAPIError, retry_after: float | None) -> VendorAPIError:
        copied = copy.copy(error)
        copied.retry_after = retry_after
        return copied

    retry_after = st.none() | st.floats(0, 3600)
    return st.builds(build, st.sampled_from(TRANSIENT_ERRORS), retry_after)


def _seconds(high: float) -> st.SearchStrategy[float]:
    return st.floats(0.0, high) | st.just(0.0)


polls = st.lists(
    st.builds(Poll, _seconds(120.0), _seconds(300.0), _running() | _error()), min_size=2, max_size=40
)
unit = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)
scenarios = st.builds(
    Scenario,
    poll_interval=st.floats(0.05, 900),
    max_poll_interval=st.floats(0.05, 7200),
    deadline_in=st.none() | st.floats(0.0, 100_000),
    cancel_on_timeout=st.booleans(),
    max_consecutive_errors=st.integers(1, 12),
    polls=polls,
    draws=st.lists(unit, min_size=1, max_size=8),
)


def simulate(scenario: Scenario, rng: object) -> list[Taken]:
    """Run a wait on a simulated clock; return every poll it made, in order."""
    deadline = scenario.deadline_in  # the wait starts at 0
    poller = Poller(
        "batch_1",
        started=0.0,
        poll_interval=scenario.poll_interval,
        max_poll_interval=scenario.max_poll_interval,
        deadline=deadline,
        cancel_on_timeout=scenario.cancel_on_timeout,
        max_consecutive_errors=scenario.max_consecutive_errors,
        log=RecordingLog(),
        rng=rng,  # type: ignore[arg-type]
    )
    now, step, taken = 0.0, Wait(0.0), []
    for poll in scenario.polls:
        if not isinstance(step, Wait):
            break
        now += step.seconds + poll.slot  # sleep, then queue for a connection slot
        start = now  # the start is when the slot is held
        now += poll.duration
        before = copy.copy(poller)
        step = poller.after(poll.result, sent_at=start, now=now)
        scheduled = scheduled_delay(now, poller.summary, **_intervals(scenario))
        failed = isinstance(poll.result, VendorAPIError)
        retry_after = poll.result.retry_after if failed else None
        if failed:
            scheduled = error_delay(scheduled, poller.errors, retry_after, scenario.max_poll_interval)
        taken.append(Taken(start, now, poll.result, failed, retry_after, scheduled, step, before))
    return taken


def _intervals(scenario: Scenario) -> dict[str, float]:
    return {"poll_interval": scenario.poll_interval, "max_poll_interval": scenario.max_poll_interval}


def _cut_by_the_deadline(scenario: Scenario, poll: Taken) -> bool:
    """Whether the wait after ``poll`` ends at the deadline (for one last look before giving up)."""
    return (
        scenario.deadline_in is not None
        and isinstance(poll.step, Wait)
        and poll.end + poll.step.seconds >= scenario.deadline_in - EPS
    )


def _followed(taken: list[Taken]) -> list[tuple[Taken, Taken]]:
    return list(itertools.pairwise(taken))


@PROPERTIES
@given(scenarios)
def test_polls_never_start_closer_than_the_schedule_allows(scenario: Scenario) -> None:
    taken = simulate(scenario, Cycle(scenario.draws))
    first = scheduled_delay(0.0, None, **_intervals(scenario))
    for poll, after in _followed(taken):
        spacing = after.start - poll.start
        if _cut_by_the_deadline(scenario, poll):
            # The one exception: a last poll at the deadline, and nothing after it.
            assert not isinstance(after.step, Wait)
            continue
        # The scheduled delay less its jitter; after a failed poll, the error delay itself.
        assert spacing >= (1.0 if poll.failed else 1.0 - JITTER) * poll.scheduled - EPS
        if poll.failed:
            assert poll.scheduled >= scheduled_delay(poll.end, poll.before.summary, **_intervals(scenario))
            assert spacing >= (poll.retry_after or 0.0) - EPS
        # Never more often than a quarter of poll_interval (or the cap, when that is lower).
        assert spacing >= (1.0 - JITTER) * first - EPS


@PROPERTIES
@given(scenarios)
def test_the_next_poll_is_never_later_than_its_spread_delay(scenario: Scenario) -> None:
    # Waiting longer than scheduled would see the end late; an answer slower than the delay means the
    # next poll starts at once. Each start is bounded by the spread delay or the answer, plus its slot.
    taken = simulate(scenario, Cycle(scenario.draws))
    for poll, after in _followed(taken):
        slot = after.start - poll.end - poll.step.seconds  # type: ignore[union-attr]
        latest = max((1.0 + JITTER) * poll.scheduled, poll.end - poll.start) + slot
        assert after.start - poll.start <= latest + EPS
        if poll.end - poll.start >= (1.0 + JITTER) * poll.scheduled:
            assert poll.step == Wait(0.0)
        if not poll.failed:
            assert poll.scheduled < scenario.max_poll_interval


@PROPERTIES
@given(scenarios, unit)
def test_on_average_polls_start_at_least_the_scheduled_delay_apart(scenario: Scenario, draw: float) -> None:
    # The jitter is drawn uniformly, so r and 1 - r are equally likely at every step: whatever happened
    # before, the two next starts they give average at least the scheduled delay after this start.
    for poll in simulate(scenario, Cycle(scenario.draws)):
        if not isinstance(poll.step, Wait) or _cut_by_the_deadline(scenario, poll):
            continue
        starts = []
        for jitter in (Fixed(draw), Fixed(1.0 - draw)):
            again = copy.copy(poll.before)
            again.rng = jitter
            step = again.after(poll.result, sent_at=poll.start, now=poll.end)
            assert isinstance(step, Wait)
            starts.append(poll.end + step.seconds)
        if scenario.deadline_in is not None and max(starts) >= scenario.deadline_in - EPS:
            continue  # one of the two draws is cut by the deadline: the last look, not the schedule
        assert sum(starts) / 2 - poll.start >= poll.scheduled - EPS


# -- the defaults over whole batches ------------------------------------------------------------------


def _batch_of(hours: float, seed: int) -> tuple[int, float]:
    """Return (polls, seconds the end was seen late) for a batch reporting no progress, with the defaults."""
    duration = hours * 3600.0
    poller = Poller(
        "batch_1",
        started=0.0,
        poll_interval=DEFAULT_POLL_INTERVAL,
        max_poll_interval=DEFAULT_MAX_POLL_INTERVAL,
        deadline=None,
        cancel_on_timeout=True,
        max_consecutive_errors=10,
        log=RecordingLog(),
        rng=random.Random(seed),
    )
    now, step = 0.0, Wait(0.0)
    while isinstance(step, Wait):
        now += step.seconds
        result = batch("completed" if now >= duration else "in_progress", total=0)
        step = poller.after(result, sent_at=now, now=now + 0.2)
    assert isinstance(step, Finish)
    return poller.polls, now - duration


@pytest.mark.parametrize("hours", [2, 20])
def test_the_end_is_seen_at_most_5_percent_of_the_duration_late(hours: float) -> None:
    for seed in range(10):
        _, late = _batch_of(hours, seed)
        assert late <= 0.05 * hours * 3600 + 1.0


def test_a_20_hour_batch_takes_5_times_fewer_polls_than_one_a_minute() -> None:
    polls, _ = _batch_of(20, seed=0)
    assert polls * 5 <= 20 * 60
