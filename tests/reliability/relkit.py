"""Helpers of the reliability suite: request files, recorded retry waits, one spelling for both faces."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import pickle
import random
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


# -- hardening: bounded calls, generated examples, connections set for one example ----------------------

BOUND = 60.0
"""Seconds any single call under test may take before the test fails: a bound, never a measurement."""


def bounded(call: Callable[[], Any], seconds: float = BOUND) -> Any:
    """
    Return ``call()`` run in a daemon thread, or raise what it raised; fail if it has not ended in time.

    For calls that must not block for good (a FIFO opened, a trickled answer): the test fails at the
    bound instead of hanging, and a stuck thread does not keep the interpreter from exiting.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=run, name="bounded-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise AssertionError(f"the call did not end within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def examples(count: int) -> Any:
    """
    Return hypothesis settings for a property with I/O: ``count`` derandomized examples, no deadline.

    ``LLMBATCH_HARDENING_EXAMPLES`` overrides every count for a longer hunt.
    """
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=int(os.environ.get("LLMBATCH_HARDENING_EXAMPLES", "0")) or count,
        deadline=None,
        derandomize=True,
        database=None,
        # The emulator and loopback servers are per test, not per example: each example reads deltas.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


_CONN_IDS = itertools.count()


@contextmanager
def connection(value: dict[str, Any], prefix: str = "hard") -> Iterator[str]:
    """Set ``AIRFLOW_CONN_<ID>`` to ``value`` for the block (one hypothesis example); yield the id."""
    conn_id = f"{prefix}_{next(_CONN_IDS)}"
    name = f"AIRFLOW_CONN_{conn_id.upper()}"
    os.environ[name] = json.dumps(value)
    try:
        yield conn_id
    finally:
        os.environ.pop(name, None)


def shown(exc: BaseException) -> dict[str, str]:
    """Return every text an exception shows: ``str``, ``repr``, traceback and pickled form (revived too)."""
    revived = pickle.loads(pickle.dumps(exc))
    return {
        "str": str(exc),
        "repr": repr(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "pickle": pickle.dumps(exc).decode("latin-1"),
        "revived": f"{revived!s} {revived!r}",
    }
