"""
Pytest fixtures serving the emulator on loopback.

``emulator_server`` (session) starts one server for the whole run; ``emulator`` (function) is the same
server, reset before each test. ``emulator_connections`` points an Airflow connection per vendor at it.
The time scale comes from ``LLMBATCH_EMULATOR_TIME_SCALE`` (default 0.1: a batch completes in ~0.14 s),
never from the emulator's own default (about 21 s a batch), which is for watching a DAG defer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from airflow_provider_llmbatch.emulator.config import EmulatorConfig
from airflow_provider_llmbatch.emulator.server import Emulator

TIME_SCALE_ENV = "LLMBATCH_EMULATOR_TIME_SCALE"
DEFAULT_TEST_TIME_SCALE = 0.1


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[Emulator]:
    """Start the emulator once per session and stop it at the end."""
    scale = float(os.environ.get(TIME_SCALE_ENV, DEFAULT_TEST_TIME_SCALE))
    with Emulator(EmulatorConfig(time_scale=scale)) as server:
        yield server


@pytest.fixture
def emulator(emulator_server: Emulator) -> Emulator:
    """Return the session's emulator with all state, faults and latency dropped."""
    emulator_server.reset()
    return emulator_server


@pytest.fixture
def emulator_connections(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set ``AIRFLOW_CONN_LLMBATCH_<VENDOR>`` for every vendor; return vendor name -> conn id."""
    conn_ids: dict[str, str] = {}
    for vendor in emulator.config.vendors:
        conn_id = f"llmbatch_{vendor}"
        for key, value in emulator.airflow_conn_env(vendor, conn_id).items():
            monkeypatch.setenv(key, value)
        conn_ids[vendor] = conn_id
    return conn_ids
