from __future__ import annotations

from collections.abc import Iterator

import pytest

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.emulator.testing import VendorClient
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

FROZEN_NOW = 1_800_000_000.0


@pytest.fixture(params=list(REGISTRY.values()), ids=list(REGISTRY))
def spec(request: pytest.FixtureRequest) -> VendorSpec:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def api(emulator: Emulator, spec: VendorSpec) -> Iterator[VendorClient]:
    client = VendorClient(emulator, spec)
    yield client
    client.close()


@pytest.fixture(scope="session")
def frozen_server() -> Iterator[Emulator]:
    """An emulator whose clock stands still unless a test moves it (advance_clock)."""
    with Emulator(EmulatorConfig(time_scale=1.0), clock=lambda: FROZEN_NOW) as server:
        yield server


@pytest.fixture
def frozen(frozen_server: Emulator) -> Emulator:
    frozen_server.reset()
    return frozen_server


@pytest.fixture
def frozen_api(frozen: Emulator, spec: VendorSpec) -> Iterator[VendorClient]:
    client = VendorClient(frozen, spec)
    yield client
    client.close()
