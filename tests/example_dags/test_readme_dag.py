"""
The README's "A DAG in 20 lines", run verbatim in a real Airflow: by hand with no logical date, and scheduled.

Only the bucket is moved to a local folder (the DAG's paths are ``s3://my-bucket/...``) and the connection
points at the emulator; every other character is the README's.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from airflow_env import REVIEWS_FILE, env_for, failing_tail, read_jsonl

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.jsonl import build_request_file
from dev.local_airflow import REPO_ROOT, DagTestRun, LocalAirflow, PlannedRun

README = REPO_ROOT / "README.md"
BUCKET = "s3://my-bucket"
DAG_ID = "classify_reviews"

# A run triggered by hand with no logical date, as Airflow 3 allows: it renders from its run_after.
MANUAL = PlannedRun(
    DAG_ID, dates={"logical_date": None, "run_after": datetime(2026, 3, 2, 10, 30, tzinfo=UTC)}
)
# The run the scheduler makes for the @daily interval 2026-03-01: logical date at its start, run at its end.
SCHEDULED = PlannedRun(
    DAG_ID,
    dates={"logical_date": datetime(2026, 3, 1, tzinfo=UTC), "run_after": datetime(2026, 3, 2, tzinfo=UTC)},
)
# The day each run's files are named after: the logical date, else the day the run was asked for.
DAYS = {"manual": "2026-03-02", "scheduled": "2026-03-01"}


def readme_dag() -> str:
    """Return the python block of the README's "A DAG in 20 lines" section, as written."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## A DAG in 20 lines\n(.*?)^## ", text, flags=re.S | re.M)
    assert section, "README.md has no '## A DAG in 20 lines' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), flags=re.S | re.M)
    assert block, "the section has no python block"
    return block.group(1)


@pytest.fixture(scope="module")
def readme_runs(
    airflow_template: LocalAirflow, tmp_path_factory: pytest.TempPathFactory, emulator_server: Emulator
) -> tuple[dict[str, DagTestRun], Path, Emulator]:
    """Run the README's DAG twice in one Airflow process: by hand without a logical date, then scheduled."""
    emulator_server.reset()
    root = tmp_path_factory.mktemp("readme-dag")
    bucket = root / "bucket"
    source = readme_dag()
    assert BUCKET + "/" in source, "the README's DAG no longer keeps its files in s3://my-bucket"
    dags = root / "dags"
    dags.mkdir()
    (dags / "readme_dag.py").write_text(source.replace(BUCKET, bucket.as_uri()), encoding="utf-8")
    records = [{"custom_id": r["review_id"], "prompt": r["text"]} for r in read_jsonl(REVIEWS_FILE)]
    for day in DAYS.values():
        build_request_file(records, bucket / "requests" / f"{day}.jsonl", "zhipu", model="glm-4-flash")
    airflow = airflow_template.clone(root / "airflow-home", dags)
    runs = airflow.run_dag_tests([MANUAL, SCHEDULED], env=env_for(emulator_server), timeout=240)
    return dict(zip(DAYS, runs, strict=True)), bucket, emulator_server


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", list(DAYS))
def test_readme_dag_runs_by_hand_and_scheduled(
    which: str, readme_runs: tuple[dict[str, DagTestRun], Path, Emulator]
) -> None:
    runs, bucket, _ = readme_runs
    run = runs[which]
    assert run.succeeded, f"{run.error or run.tasks}\n{failing_tail(run.log_path)}"
    assert run.tasks == {"create": "success", "wait": "success", "fetch": "success"}
    # The manual run really had no logical date; the scheduled one had its interval's start.
    if which == "manual":
        assert run.logical_date is None
    else:
        assert run.logical_date is not None
        assert run.logical_date.startswith(DAYS["scheduled"])
    day = DAYS[which]
    manifest = run.xcoms["fetch"]
    assert manifest["result_uri"].endswith(f"/results/{day}.jsonl")
    rows = read_jsonl(bucket / "results" / f"{day}.jsonl")
    expected = {r["review_id"] for r in read_jsonl(REVIEWS_FILE)}
    assert {row["custom_id"] for row in rows} == expected
    assert len(rows) == len(expected)


@pytest.mark.airflow
@pytest.mark.integration
def test_each_run_created_one_batch(readme_runs: tuple[dict[str, DagTestRun], Path, Emulator]) -> None:
    runs, _, emulator = readme_runs
    assert all(run.succeeded for run in runs.values())
    assert emulator.stats("zhipu")["batches_created"] == len(runs)
