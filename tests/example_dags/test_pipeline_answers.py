from __future__ import annotations

from types import ModuleType

import pytest
from airflow_env import load_example


@pytest.fixture(scope="module")
def pipeline() -> ModuleType:
    return load_example("example_llmbatch_pipeline")


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ('{"sentiment": "positive", "issue": null}', "positive"),
        ('```json\n{"sentiment": "Negative", "issue": "battery"}\n```', "negative"),
        ("Neutral.", "neutral"),
        ("mixed - good sound, cheap case", "mixed"),
        ('{"sentiment": "angry"}', None),
        ('["positive"]', None),
        ("echo: Battery easily lasts a full day", None),
        ("", None),
        (None, None),
    ],
)
def test_pipeline_reads_the_label_from_a_model_answer(
    pipeline: ModuleType, answer: str | None, label: str | None
) -> None:
    assert pipeline._sentiment(answer) == label
