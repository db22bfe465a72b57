from __future__ import annotations

from collections.abc import Iterator

import pytest
from airflow_env import airflow_template, slow_enough_emulator

from airflow_provider_llmbatch.emulator import Emulator

__all__ = ["airflow_template", "dag_emulator"]


@pytest.fixture(scope="module")
def dag_emulator() -> Iterator[Emulator]:
    # ~2.8 s per batch: longer than the hop from create to sensor, so the sensor has to defer.
    yield from slow_enough_emulator(time_scale=2.0)
