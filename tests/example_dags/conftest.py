from __future__ import annotations

from collections.abc import Iterator

import pytest
from airflow_env import REVIEWS_FILE, airflow_template, load_example, read_jsonl, slow_enough_emulator
from object_storage import S3Endpoint, threaded_s3

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.jsonl import build_request_file

__all__ = ["airflow_template", "dag_emulator", "example_s3"]


@pytest.fixture(scope="module")
def dag_emulator() -> Iterator[Emulator]:
    # ~2.8 s per batch: longer than the hop from create to sensor, so the sensor has to defer.
    yield from slow_enough_emulator(time_scale=2.0)


@pytest.fixture(scope="module")
def example_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """S3 on loopback with the reviews as requests where ``example_llmbatch_s3`` looks for them by default."""
    example = load_example("example_llmbatch_s3")
    path = tmp_path_factory.mktemp("example-s3") / "requests.jsonl"
    records = ({"custom_id": r["review_id"], "prompt": r["text"]} for r in read_jsonl(REVIEWS_FILE))
    build_request_file(records, path, example.CONN_ID.removeprefix("llmbatch_"), model="glm-4-flash")
    with threaded_s3() as endpoint:
        endpoint.upload(path, example.dag.params["requests"])
        yield endpoint
