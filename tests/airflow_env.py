"""
A private Airflow for the tests that run DAGs: one SQLite database migrated per session, then copied.

Airflow runs in child processes (``dag.test()`` for every example DAG in one process, or a scheduler,
triggerer, ... for the end-to-end test) with an environment built from scratch, so these tests neither
depend on nor disturb whatever Airflow configuration the test process itself was started with.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.vendors import REGISTRY
from dev.local_airflow import LocalAirflow, find_example_dags

EXAMPLE_DAGS = find_example_dags()
REVIEWS_FILE = EXAMPLE_DAGS / "data" / "reviews.jsonl"

_template: LocalAirflow | None = None


def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> LocalAirflow:
    """Return this session's migrated Airflow (``airflow db migrate`` runs once per session)."""
    global _template
    if _template is None:
        template = LocalAirflow(tmp_path_factory.mktemp("airflow-template"), EXAMPLE_DAGS)
        template.migrate()
        _template = template
    return _template


def load_example(name: str) -> ModuleType:
    """Import an example DAG file as a plain module (its DAG object, constants and helpers)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_DAGS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable(what: str) -> NoReturn:
    """Fail under CI, whose ``.ci/run`` installs everything the suite runs on; skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"CI runs every test: {what}", pytrace=False)
    pytest.skip(what)


def connections_env(emulator: Emulator) -> dict[str, str]:
    """Return ``AIRFLOW_CONN_LLMBATCH_<VENDOR>`` for every vendor, pointing at ``emulator``."""
    env: dict[str, str] = {}
    for vendor in REGISTRY:
        env.update(emulator.airflow_conn_env(vendor, f"llmbatch_{vendor}"))
    return env


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Return the rows of a local JSONL file (``file://`` URIs accepted)."""
    local = Path(str(path).removeprefix("file://"))
    with local.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def count_lines(path: Path) -> int:
    """Return the number of non-blank lines of a text file."""
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


@pytest.fixture(scope="session")
def airflow_template(tmp_path_factory: pytest.TempPathFactory) -> LocalAirflow:
    """Return the session's migrated Airflow template."""
    return migrated_template(tmp_path_factory)


def slow_enough_emulator(time_scale: float) -> Iterator[Emulator]:
    """Serve an emulator whose batches last ~1.4 s x ``time_scale``, long enough to make a sensor defer."""
    with Emulator(EmulatorConfig(time_scale=time_scale)) as emulator:
        yield emulator


def failing_tail(path: Path | None, lines: int = 60) -> str:
    """Return the last lines of a log file, for assertion messages."""
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def env_for(emulator: Emulator, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a DAG run against ``emulator``: connections, a short poll interval."""
    return {**connections_env(emulator), "LLMBATCH_EXAMPLE_POLL_INTERVAL": "0.5", **(extra or {})}
