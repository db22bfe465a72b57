"""A minimal task context for running operators' ``execute`` without a scheduler or worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.vendors import VendorSpec
from tests.pollkit import Clock, waits_on

CONN_ID = "llmbatch_test"

STORES = ["state_store", "no_store"]
"""With a task state store a first try looks nothing up; without one every try looks for earlier work."""

DS_TEST = "/v1/chat/ds-test"
"""DashScope's test endpoint: at most 100 requests a file, so a few hundred requests make several parts."""

DS_TEST_MODEL = "batch-test-model"
"""The only model the test endpoint takes."""


class FakeTI:
    """Records XCom pushes in order; ``fail_on`` keys raise once, like a worker dying mid-push."""

    def __init__(
        self,
        *,
        dag_id: str = "llmbatch_dag",
        task_id: str = "create",
        run_id: str = "manual__2026-01-01T00:00:00+00:00",
        map_index: int = -1,
        fail_on: set[str] | None = None,
    ) -> None:
        self.dag_id = dag_id
        self.task_id = task_id
        self.run_id = run_id
        self.map_index = map_index
        self.fail_on = set(fail_on or ())
        self.pushed: list[tuple[str, Any]] = []

    def xcom_push(self, key: str, value: Any) -> None:
        if key in self.fail_on:
            self.fail_on.discard(key)
            raise RuntimeError(f"worker died while pushing {key}")
        json.dumps(value)  # XCom values must serialize
        self.pushed.append((key, value))

    def xcom_pull(self, *, task_ids: str, key: str, map_indexes: int | None = None) -> Any:
        assert task_ids == self.task_id
        # Its own map index (-1, or None, for an unmapped task): never another instance's XCom.
        assert map_indexes == self.map_index or (map_indexes is None and self.map_index < 0)
        values = [v for k, v in self.pushed if k == key]
        return values[-1] if values else None

    def xcom(self, key: str) -> Any:
        values = [v for k, v in self.pushed if k == key]
        assert values, f"no XCom {key!r} pushed"
        return values[-1]


class FakeStateStore:
    """The task state store's get/set, in memory; shared across 'tries' like the real one."""

    def __init__(self, *, broken: bool = False) -> None:
        self.data: dict[str, Any] = {}
        self.broken = broken
        self.reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.reads += 1
        if self.broken:
            raise RuntimeError("state store unavailable")
        return self.data.get(key, default)

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        if self.broken:
            raise RuntimeError("state store unavailable")
        self.data[key] = json.loads(json.dumps(value))


def make_context(ti: FakeTI, state_store: FakeStateStore | None = None) -> dict[str, Any]:
    from airflow.sdk.execution_time.context import OutletEventAccessors

    context: dict[str, Any] = {"ti": ti, "run_id": ti.run_id, "outlet_events": OutletEventAccessors()}
    if state_store is not None:
        context["task_state_store"] = state_store
    return context


def write_requests(path: Path, spec: VendorSpec, ids: list[str], *, endpoint: str | None = None) -> Path:
    endpoint = endpoint or spec.default_endpoint
    with path.open("w", encoding="utf-8") as handle:
        for custom_id in ids:
            line = {
                "custom_id": custom_id,
                "method": "POST",
                "url": endpoint,
                "body": {
                    "model": "test-model",
                    "messages": [{"role": "user", "content": f"say {custom_id}"}],
                },
            }
            handle.write(json.dumps(line) + "\n")
    return path


def create_op(**kwargs: Any) -> Any:
    """Return a CreateBatchOperator of task ``create`` on connection ``llmbatch_test``."""
    from airflow_provider_llmbatch.operators.batch import CreateBatchOperator

    kwargs.setdefault("task_id", "create")
    kwargs.setdefault("conn_id", CONN_ID)
    return CreateBatchOperator(**kwargs)


def request_file(tmp_path: Path, vendor: str, ids: list[str] | None = None) -> Path:
    """Write ``requests.jsonl`` for a vendor (default: three requests, the third one failing)."""
    from airflow_provider_llmbatch.vendors import REGISTRY

    return write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ids or ["a", "b", "fail-c"])


def records(count: int, prefix: str = "r") -> list[dict[str, Any]]:
    """Return ``count`` prompt records with custom ids ``<prefix>0``, ``<prefix>1``, ..."""
    return [{"custom_id": f"{prefix}{i}", "prompt": f"question {i}"} for i in range(count)]


def parts_op(count: int = 250, **kwargs: Any) -> Any:
    """Return a CreateBatchOperator of ``count`` records on DashScope's test endpoint (100 a part)."""
    kwargs.setdefault("requests", records(count))
    return create_op(model=DS_TEST_MODEL, endpoint=DS_TEST, **kwargs)


def state_store(kind: str) -> FakeStateStore | None:
    """Return a fresh task state store for ``state_store``, none for ``no_store`` (older Airflow)."""
    return FakeStateStore() if kind == "state_store" else None


@pytest.fixture(scope="session")
def slow_emulator_server() -> Iterator[Emulator]:
    """An emulator whose batches stay put (validating 20 s, in progress 100 s) until a test moves them."""
    with Emulator(EmulatorConfig(time_scale=100.0)) as server:
        yield server


@pytest.fixture
def emu(slow_emulator_server: Emulator) -> Emulator:
    """Return the slow emulator with all state dropped."""
    slow_emulator_server.reset()
    return slow_emulator_server


@pytest.fixture
def connect(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point connection ``llmbatch_test`` at the slow emulator for a vendor; return the emulator."""
    emulator = emu

    def _connect(vendor: str) -> Emulator:
        for key, value in emulator.airflow_conn_env(vendor, CONN_ID).items():
            monkeypatch.setenv(key, value)
        return emulator

    return _connect


@pytest.fixture(autouse=True)
def airflow_home_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "airflow-home"
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _operators_run_outside_task_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let tests call ``execute`` directly, as the task runner would."""
    from airflow.sdk.bases.operator import ExecutorSafeguard

    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)


@pytest.fixture
def moving(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Make the worker's waits move the emulator's clock instead of sleeping."""
    return waits_on(Clock(on_sleep=emu.advance_clock), waiting, monkeypatch)


def hold_files(
    emu: Emulator, vendor: str, count: int, *, purpose: str = "batch", kind: str = "input", name: str = "old"
) -> None:
    """Put ``count`` files in the emulator's store, as earlier jobs (or other tools) left them."""
    store = emu.runtime.store
    content = store.new_path(vendor, ".jsonl")
    content.write_text('{"custom_id": "old"}\n')
    for n in range(count):
        store.add_file(vendor, content, filename=f"{name}-{n}.jsonl", purpose=purpose, kind=kind)


def uploads_and_batches(emu: Emulator, vendor: str) -> tuple[int, int]:
    """Return how many files the emulator took as uploads and how many batches it created."""
    stats = emu.stats(vendor)
    return stats["files_uploaded"], stats["batches_created"]


def die_on_call(monkeypatch: pytest.MonkeyPatch, name: str, die_on: int, *, after: bool) -> dict[str, int]:
    """Make ``BatchHook.<name>`` kill the task on its ``die_on``-th call (before or after it took effect)."""
    real = getattr(BatchHook, name)
    calls = {"n": 0}

    def dying(self: BatchHook, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == die_on and not after:
            raise RuntimeError(f"worker died before {name} #{die_on}")
        result = real(self, *args, **kwargs)
        if calls["n"] == die_on:
            raise RuntimeError(f"worker died after {name} #{die_on} took effect")
        return result

    monkeypatch.setattr(BatchHook, name, dying)
    return calls
