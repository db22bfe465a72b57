"""
The parts of one job waited for together: one progress line for all of them, one event once all ended.

Each part has its own :class:`~airflow_provider_llmbatch.polling.Poller` (its own schedule, as if it were
waited for alone); these two gather them, for the trigger and for the wait on a worker alike.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow_provider_llmbatch.outcomes import request_counts
from airflow_provider_llmbatch.polling import QUIET_LOG_SECONDS, TERMINAL_VALUES, EventKind, Finish, Poller


class GroupProgress:
    """
    One progress line for the parts of a job: how many ended, and the requests of all of them.

    :param pollers: the parts' state machines.
    :param log: where the line goes.
    """

    def __init__(self, pollers: list[Poller], log: logging.Logger | Any) -> None:
        self.pollers = pollers
        self.log = log
        self._last: tuple[tuple[Any, ...] | None, float] = (None, 0.0)

    def update(self, now: float) -> None:
        """Log the parts' progress when it changed (at least every :data:`QUIET_LOG_SECONDS`)."""
        summaries = [p.summary for p in self.pollers]
        ended = sum(1 for s in summaries if s is not None and s.get("status") in TERMINAL_VALUES)
        known = [c for s in summaries if s is not None and (c := request_counts(s)) is not None]
        completed, failed, total = (sum(c[i] for c in known) for i in range(3))
        seen = (ended, completed, failed, total)
        if seen == self._last[0] and now - self._last[1] < QUIET_LOG_SECONDS:
            return
        self._last = (seen, now)
        unknown = len(summaries) - len(known)
        self.log.info(
            "%d of %d batches ended; %d completed, %d failed of %d requests%s",
            ended,
            len(summaries),
            completed,
            failed,
            total,
            f" ({unknown} batches without counts yet)" if unknown else "",
        )


def group_event(pollers: list[Poller], finals: list[Finish]) -> dict[str, Any]:
    """
    Return the one event of a wait for several parts: the worst end, every part's summary.

    :param pollers: the parts' state machines, in order.
    :param finals: each part's final step.
    """
    if len(pollers) == 1:
        return pollers[0].event(finals[0])
    kinds = [final.kind for final in finals]
    kind: EventKind = "error" if "error" in kinds else "timeout" if "timeout" in kinds else "terminal"
    # Each message names its batch already. A part stopped by another's failed polling carries that
    # failure as its end: listed once, never under the stopped part's id as if it were its own.
    reasons = dict.fromkeys(final.message for final in finals if final.kind == kind)
    message = "; ".join(reasons) if kind != "terminal" else f"all {len(pollers)} batches ended"
    return {
        "event": kind,
        "batch_id": pollers[0].batch_id,
        "batch": pollers[0].summary,
        "batches": [p.summary for p in pollers],
        "message": message,
        "polls": sum(p.polls for p in pollers),
    }
