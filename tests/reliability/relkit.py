"""Helpers of the reliability suite: request files, recorded retry waits, one spelling for both faces."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

VENDORS = list(REGISTRY)
FACES = ["sync", "async"]
MAX_RETRIES = 3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_request_file(path: Path, spec: VendorSpec, n: int, *, failing: int = 0, padding: int = 40) -> Path:
    """Write ``n`` requests (the first ``failing`` of them fail), each prompt padded by ``padding`` bytes."""
    endpoint = spec.endpoints[0]
    model = endpoint.required_model or "test-model"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            custom_id = f"fail-{i}" if i < failing else f"req-{i}"
            content = f"question {i} " + "x" * padding
            body = {"model": model, "messages": [{"role": "user", "content": content}]}
            line = {"custom_id": custom_id, "method": "POST", "url": endpoint.path, "body": body}
            handle.write(json.dumps(line) + "\n")
    return path


class Waits:
    """The waits a retry policy asked for, recorded instead of slept (tests never really back off)."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        await asyncio.sleep(0)

    def policy(self, max_retries: int = MAX_RETRIES) -> RetryPolicy:
        return RetryPolicy(
            max_retries=max_retries,
            base_delay=0.001,
            max_delay=0.004,
            rng=random.Random(1),
            sleep=self.sleep,
            asleep=self.asleep,
        )


class Face:
    """Call the sync or the async face of a hook with one spelling."""

    def __init__(self, hook: BatchHook, face: str) -> None:
        self.hook = hook
        self.face = face
        self.loop = asyncio.new_event_loop() if face == "async" else None

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        iterating = name in {"list_files", "list_batches", "iter_file_lines"}
        if self.loop is None:
            result = getattr(self.hook, name)(*args, **kwargs)
            return list(result) if iterating else result
        if iterating:

            async def collect() -> list[Any]:
                return [item async for item in getattr(self.hook, "a" + name)(*args, **kwargs)]

            return self.loop.run_until_complete(collect())
        return self.loop.run_until_complete(getattr(self.hook, "a" + name)(*args, **kwargs))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.hook.aclose())
            self.loop.close()
        self.hook.close()
