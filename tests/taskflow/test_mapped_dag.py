"""``@task.llmbatch`` mapped over three inputs under ``dag.test()``: three result files, three batches."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow_env import env_for, failing_tail, migrated_template, slow_enough_emulator

from airflow_provider_llmbatch.emulator import Emulator

DAG_ID = "llmbatch_taskflow_mapped"
CHUNKS = ["north", "south", "east"]
PER_CHUNK = 3

DAG_FILE = textwrap.dedent(
    f"""
    from __future__ import annotations

    from datetime import datetime

    from airflow.sdk import DAG, task

    with DAG({DAG_ID!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False):

        @task.llmbatch(
            conn_id="llmbatch_zhipu",
            model="glm-4-flash",
            deferrable=True,
            poll_interval=0.5,
            max_poll_interval=1.0,
            max_input_tokens=100_000,
        )
        def reviews(chunk: str) -> list[dict]:
            return [
                {{"custom_id": f"{{chunk}}-{{i}}", "prompt": f"review {{i}} from {{chunk}}"}}
                for i in range({PER_CHUNK})
            ]

        @task
        def collect(manifests) -> list[dict]:
            return [
                {{"result_uri": m["result_uri"], "batch_ids": m["batch_ids"], "counts": m["counts"]}}
                for m in manifests
            ]

        collect(reviews.expand(chunk={CHUNKS!r}))
    """
)


@pytest.fixture(scope="module")
def mapped_emulator() -> Iterator[Emulator]:
    # A batch lasts ~1.4 s: longer than the hop from create to wait, so every mapped task defers.
    yield from slow_enough_emulator(time_scale=1.0)


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_mapped_over_three_inputs_lands_three_files_without_duplicate_batches(
    tmp_path_factory: pytest.TempPathFactory, mapped_emulator: Emulator
) -> None:
    dags = tmp_path_factory.mktemp("taskflow-dags")
    (dags / "taskflow_mapped.py").write_text(DAG_FILE)
    template = migrated_template(tmp_path_factory)
    airflow = template.clone(tmp_path_factory.mktemp("taskflow") / "airflow-home", dags)

    (run,) = airflow.run_dag_tests([DAG_ID], env=env_for(mapped_emulator), timeout=240)

    assert run.succeeded, f"{run.error}\n{failing_tail(run.log_path)}"
    landed = run.xcoms["collect"]
    assert len(landed) == len(CHUNKS)
    uris = [m["result_uri"] for m in landed]
    assert len(set(uris)) == len(CHUNKS)
    for chunk, manifest in zip(CHUNKS, landed, strict=True):
        rows = [
            json.loads(line)
            for line in Path(manifest["result_uri"].removeprefix("file://")).read_text().splitlines()
        ]
        assert [row["custom_id"] for row in rows] == [f"{chunk}-{i}" for i in range(PER_CHUNK)]
        assert manifest["counts"]["succeeded"] == PER_CHUNK
    # One batch per mapped task instance, each created once, and every one waited for in a deferral.
    made = mapped_emulator.batches("zhipu")
    assert len(made) == len(CHUNKS)
    assert sorted(b["id"] for b in made) == sorted(i for m in landed for i in m["batch_ids"])
    assert mapped_emulator.stats("zhipu")["files_uploaded"] == len(CHUNKS)
    waited = {i for kwargs in run.deferrals if kwargs for i in [kwargs.get("batch_id")] if i}
    assert waited == {b["id"] for b in made}
