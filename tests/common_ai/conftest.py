from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from aikit import FAIL_PATTERN, JSON_ANSWER, JSON_PROMPT
from airflow_env import airflow_template

from airflow_provider_llmbatch.common_ai import ADAPTERS, VendorBatchAdapter
from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig

__all__ = ["adapter_on", "airflow_template", "instant", "instant_server"]


@pytest.fixture(scope="module")
def instant_server() -> Iterator[Emulator]:
    config = EmulatorConfig(
        time_scale=0.0,
        fail_custom_id_pattern=FAIL_PATTERN,
        # A JSON request no reply matches would get JSON built from its schema: "not json" stays prose.
        replies=((rf"^{JSON_PROMPT}", JSON_ANSWER), (r"^not json", "echo: not json")),
    )
    with Emulator(config) as emulator:
        yield emulator


@pytest.fixture
def instant(instant_server: Emulator) -> Emulator:
    """An emulator whose batches end at once; reset before each test."""
    instant_server.reset()
    return instant_server


@pytest.fixture
def adapter_on(instant: Emulator) -> Iterator[Callable[[str], VendorBatchAdapter]]:
    """Build a vendor's adapter as common-ai does: the key and the base URL of the connection."""
    made: list[VendorBatchAdapter] = []

    def _make(vendor: str) -> VendorBatchAdapter:
        adapter = ADAPTERS[vendor](api_key=instant.api_key, base_url=instant.base_url(vendor))
        made.append(adapter)
        return adapter

    yield _make
    for adapter in made:
        adapter.close()
