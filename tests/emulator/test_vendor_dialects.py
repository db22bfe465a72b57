from __future__ import annotations

import dataclasses

from airflow_provider_llmbatch.emulator.vendor_dialects import DIALECTS, OPENAI, dialect_of, emulator_prefix
from airflow_provider_llmbatch.vendors import REGISTRY


def test_every_registry_vendor_has_its_own_dialect() -> None:
    assert set(DIALECTS) == set(REGISTRY)


def test_a_vendor_without_a_dialect_is_answered_like_openai() -> None:
    newcomer = dataclasses.replace(REGISTRY["openai"], name="newcomer")
    assert dialect_of(newcomer) is OPENAI


def test_prefix_is_the_name_then_the_real_path() -> None:
    assert emulator_prefix(REGISTRY["zhipu"]) == "/zhipu/api/paas/v4"
    assert emulator_prefix(REGISTRY["dashscope"]) == "/dashscope/compatible-mode/v1"
