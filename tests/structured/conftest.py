"""Schemas shared by the structured-output tests, and an emulator whose batches end at once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig


class Review(BaseModel):
    """A labelled review, as the examples ask for it."""

    label: Literal["positive", "negative", "mixed"]
    score: float
    topics: list[str]


REVIEW_DICT: dict[str, Any] = {
    "title": "review",
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["label", "score"],
    "additionalProperties": False,
}
"""A strict-mode schema (closed, all required) given as a dict."""


@pytest.fixture(scope="module")
def instant() -> Iterator[Emulator]:
    """An emulator whose batches complete as soon as they are read, with one canned reply."""
    config = EmulatorConfig(time_scale=0.0, replies=(("(?i)canned", '{"label": "negative", "score": 2}'),))
    with Emulator(config) as server:
        yield server


@pytest.fixture
def emu(instant: Emulator) -> Emulator:
    instant.reset()
    return instant
