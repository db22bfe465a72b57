"""Fixtures of the trigger tests: the trigger's clock under test control, and its logs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.triggers import batch as trigger_module
from tests.pollkit import Clock, waits_on


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The trigger's wall clock, moving only when the trigger sleeps: deadlines without real waits."""
    return waits_on(Clock(), trigger_module, monkeypatch)


@pytest.fixture
def emulator_time(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The trigger's clock, and the emulator's moving with it: batches run their course, nobody waits."""
    return waits_on(Clock(on_sleep=emulator.advance_clock), trigger_module, monkeypatch)


@pytest.fixture
def trigger_logs() -> Iterator[list[dict[str, Any]]]:
    """Capture the trigger's structured log entries (Airflow's loggers are structlog, not stdlib)."""
    with capture_logs() as entries:
        yield entries
