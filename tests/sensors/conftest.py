from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.vendors import REGISTRY


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
