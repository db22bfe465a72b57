"""An emulator with canned answers, some valid and some not, and a pydantic model they are checked against."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import (  # noqa: F401 - fixtures the tests here use too
    _operators_run_outside_task_runner,
    airflow_home_dir,
)

CONN_ID = "llmbatch_typed"

GOOD = '{"label": "positive", "score": 0.9}'
"""A valid answer."""

REPLIES = (
    (r"good", GOOD),
    (r"fenced", "```json\n" + GOOD + "\n```"),
    (r"prose", "I think it is positive."),
    (r"wrong", '{"label": "meh", "score": 2}'),
)
"""Canned answers by the words of the prompt: ``say good-1`` gets a valid object, ``say prose-2`` prose."""


class Review(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    score: float


@pytest.fixture(scope="session")
def typed_emulator_server() -> Iterator[Emulator]:
    """An emulator whose batches stay put until a test moves them, answering with :data:`REPLIES`."""
    with Emulator(EmulatorConfig(time_scale=100.0, replies=REPLIES)) as server:
        yield server


@pytest.fixture
def typed_emu(typed_emulator_server: Emulator) -> Emulator:
    typed_emulator_server.reset()
    return typed_emulator_server


@pytest.fixture
def connect(typed_emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point connection ``llmbatch_typed`` at the emulator for a vendor (extras as given)."""

    def _connect(vendor: str, **extra: Any) -> Emulator:
        value = {
            "conn_type": REGISTRY[vendor].conn_type,
            "host": typed_emu.base_url(vendor),
            "password": typed_emu.api_key,
            "extra": extra,
        }
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(value))
        return typed_emu

    return _connect


def write_requests(path: Path, vendor: str, ids: list[str], model: str = "test-model") -> Path:
    """Write chat requests whose prompt is ``say <custom_id>``, on the vendor's chat endpoint."""
    spec = REGISTRY[vendor]
    with path.open("w", encoding="utf-8") as handle:
        for custom_id in ids:
            body = {"model": model, "messages": [{"role": "user", "content": f"say {custom_id}"}]}
            line = {"custom_id": custom_id, "method": "POST", "url": spec.default_endpoint, "body": body}
            handle.write(json.dumps(line) + "\n")
    return path


def read_rows(uri: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(uri.removeprefix("file://")).read_text().splitlines()]
