"""An upload link slower than loopback: the emulator takes upload bodies in no faster than a set rate."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig, uploads
from airflow_provider_llmbatch.emulator.cli import build_parser
from airflow_provider_llmbatch.vendors import REGISTRY


class _Clock:
    """A monotonic clock that moves only when the pace sleeps (or when told)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(uploads, "monotonic", fake.monotonic)
    monkeypatch.setattr(uploads, "sleep", fake.sleep)
    return fake


def test_pace_waits_until_the_bytes_are_due(clock: _Clock) -> None:
    pace = uploads._Pace(1000.0)

    async def take() -> None:
        await pace.took(500)  # due at 0.5 s
        clock.now += 0.2  # the server spent 0.2 s on the next piece
        await pace.took(500)  # due at 1.0 s, 0.7 s of it already gone
        clock.now += 2.0  # a slow piece: behind the rate, no wait
        await pace.took(100)

    asyncio.run(take())

    assert clock.sleeps == pytest.approx([0.5, 0.3])


def test_no_rate_never_waits(clock: _Clock) -> None:
    pace = uploads._Pace(None)
    asyncio.run(pace.took(10**9))
    assert clock.sleeps == []


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="upload_bytes_per_second must be > 0"):
        EmulatorConfig(upload_bytes_per_second=0)


def test_cli_takes_the_rate_in_megabits() -> None:
    args = build_parser().parse_args(["--upload-mbps", "400"])
    assert args.upload_mbps == 400


def test_paced_upload_is_stored_whole() -> None:
    spec = REGISTRY["moonshot"]
    url = spec.default_endpoint
    lines = (
        f'{{"custom_id":"r{n}","method":"POST","url":"{url}","body":{{"model":"m"}}}}\n' for n in range(2000)
    )
    content = "".join(lines).encode()  # about 150 KB, taken in at 2 MB/s: a few paced pieces
    with Emulator(EmulatorConfig(upload_bytes_per_second=2_000_000)) as emulator:
        headers = {"Authorization": f"Bearer {emulator.api_key}"}
        with httpx.Client(base_url=emulator.base_url(spec.name), headers=headers, timeout=30) as client:
            answer = client.post(
                "/files", data={"purpose": "batch"}, files={"file": ("requests.jsonl", content)}
            )
            answer.raise_for_status()
            stored = emulator.file_path(spec.name, answer.json()["id"]).read_bytes()
    assert stored == content
