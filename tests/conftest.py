from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests that import Airflow in this process get a private, throw-away AIRFLOW_HOME, set before anything
# imports Airflow, so the suite neither reads nor writes the machine's ~/airflow.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="llmbatch-tests-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)

pytest_plugins = ["airflow_provider_llmbatch.emulator.pytest_plugin"]

# Imported after AIRFLOW_HOME is set: these modules import Airflow.
from airflow_provider_llmbatch.emulator import Emulator  # noqa: E402
from airflow_provider_llmbatch.hooks.batch import BatchHook  # noqa: E402
from airflow_provider_llmbatch.vendors import REGISTRY  # noqa: E402


@pytest.fixture
def connect(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Point ``AIRFLOW_CONN_<ID>`` at the emulator; hook retries off so the waiter sees each failure."""

    def _connect(vendor: str, conn_id: str | None = None, *, key: str | None = None, **extra: object) -> str:
        conn_id = conn_id or f"wait_{vendor}"
        value = {
            "conn_type": REGISTRY[vendor].conn_type,
            "host": emulator.base_url(vendor),
            "password": key or emulator.api_key,
            "extra": {"max_retries": 0, **extra},
        }
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))
        return conn_id

    return _connect


@pytest.fixture
def make_batch(connect: Callable[..., str], tmp_path: Path) -> Callable[..., str]:
    """Upload a small request file and create a batch; return its id."""

    def _make(vendor: str, *, requests: int = 3, metadata: dict[str, str] | None = None) -> str:
        spec = REGISTRY[vendor]
        path = tmp_path / f"{vendor}-{len(list(tmp_path.iterdir()))}.jsonl"
        with path.open("w") as handle:
            for i in range(requests):
                line = {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": spec.default_endpoint,
                    "body": {"model": "test-model", "messages": [{"role": "user", "content": f"hello {i}"}]},
                }
                handle.write(json.dumps(line) + "\n")
        with BatchHook(connect(vendor, "setup_" + vendor)) as hook:
            uploaded = hook.upload_file(str(path))
            return hook.create_batch(input_file_id=uploaded.id, metadata=metadata).id

    return _make
