from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.cli import build_parser
from airflow_provider_llmbatch.emulator.config import DEFAULT_TIME_SCALE, EmulatorConfig
from airflow_provider_llmbatch.emulator.testing import VendorClient
from airflow_provider_llmbatch.emulator.vendor_dialects import emulator_prefix
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

REPO = Path(__file__).resolve().parents[2]


def test_parser_defaults_to_loopback() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 8765)


def test_cli_and_config_share_the_default_time_scale() -> None:
    assert build_parser().parse_args([]).time_scale == DEFAULT_TIME_SCALE == EmulatorConfig().time_scale


@pytest.mark.integration
@pytest.mark.parametrize("spec", REGISTRY.values(), ids=list(REGISTRY))
def test_default_batch_stays_in_progress_long_enough_to_defer(spec: VendorSpec) -> None:
    # The default emulator (CLI, demo): a batch runs tens of seconds, so a sensor defers and its trigger
    # polls it while it runs. Read on a clock the test moves, never the wall clock.
    config = EmulatorConfig()
    validating = config.phase_seconds("validating")
    in_progress = config.phase_seconds("in_progress")
    total = validating + in_progress + config.phase_seconds("finalizing")
    assert in_progress >= 15
    with Emulator(config, clock=lambda: 1_800_000_000.0) as emulator:
        client = VendorClient(emulator, spec)
        try:
            batch_id = client.batch_from(["a", "b", "c", "d"])["id"]
            emulator.advance_clock(validating + in_progress / 2)
            halfway = client.get(batch_id)
            emulator.advance_clock(total - validating - in_progress / 2 - 0.01)
            still = client.get(batch_id)["status"]
            emulator.advance_clock(0.02)
            done = client.get(batch_id)["status"]
        finally:
            client.close()
    assert halfway["status"] == "in_progress"
    assert 0 < halfway["request_counts"]["completed"] < 4
    assert still == "finalizing"
    assert done == "completed"


@pytest.mark.integration
def test_cli_serves_until_terminated(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_llmbatch.emulator",
            "--port",
            "0",
            "--api-key",
            "cli-key",
            "--data-dir",
            str(tmp_path),
            "--time-scale",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", first)
        assert match, first + (proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
        root = match.group(1)
        urls = dict(proc.stdout.readline().split() for _ in REGISTRY)
        assert urls == {name: root + emulator_prefix(spec) for name, spec in REGISTRY.items()}
        assert httpx.get(f"{root}/_emulator/health", timeout=5).json()["status"] == "ok"
        ok = httpx.get(f"{urls['openai']}/batches", headers={"Authorization": "Bearer cli-key"}, timeout=5)
        assert ok.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "cli-key" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
