from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
from airflow_env import EXAMPLE_DAGS


@pytest.fixture(scope="module")
def pipeline() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "example_pipeline", EXAMPLE_DAGS / "example_llmbatch_pipeline.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
