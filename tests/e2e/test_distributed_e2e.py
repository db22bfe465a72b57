"""
The provider in a distributed Airflow: PostgreSQL, the CeleryExecutor on Redis, two triggerers, files on S3.

The test run starts everything itself, on 127.0.0.1 only (see :mod:`distributed`): PostgreSQL and Redis
(Debian's packages, which ``.ci/run`` installs), an S3 endpoint (moto), the vendor emulator, and Airflow's
api-server, scheduler, dag-processor, two triggerers and a Celery worker, which share the metadata database
and nothing else but the DAGs folder. ``example_llmbatch_s3`` runs with its request and results files on
S3. The tests run in this order on one deployment, each checking one claim:

1. several runs wait in one triggerer, which is SIGKILLed: the other one takes their triggers over with the
   deadlines set at deferral, and every run succeeds (the failover time is reported);
2. the Celery worker is SIGKILLed mid-upload of a large request file: nothing is stored at the vendor, and
   the retry creates one batch;
3. the worker is SIGKILLed after the vendor created the batch but before its answer arrived: the retry
   re-attaches to that batch;
4. in the end the vendor holds exactly one batch per run, and each run's results object on S3 has one row
   per request, with unique ``custom_id`` s.

Milestones are written to the terminal as they happen (``[distributed] ...``), captured output or not.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow_env import REVIEWS_FILE, read_jsonl
from distributed import DAG_ID, VENDOR, Deployment, Requests, deploy, write_requests
from processes import LOOPBACK

from airflow_provider_llmbatch.emulator import DEFAULT_API_KEY
from airflow_provider_llmbatch.operators.reattach import KEY_METADATA, batch_key

CREATE, SENSOR, FETCH = "create_batch", "wait_for_batch", "fetch_results"
FAILOVER_RUNS = 3
LARGE_REQUESTS = 20_000  # ~19 MB, like the 18.6 MB file of the manual run
CUT_AFTER_BYTES = 3_000_000

pytestmark = [pytest.mark.e2e, pytest.mark.airflow]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Deployment]:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say_line(line: str) -> None:
        # Shown as it happens, also when pytest captures the tests' output (as CI's run does).
        with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
            (reporter.write_line if reporter is not None else print)(line)

    with deploy(tmp_path_factory.mktemp("distributed"), say_line) as running:
        yield running


def _hold_new_batches(deployment: Deployment, held: set[str]) -> None:
    """Hold each new batch ``in_progress`` until released, so that it outlasts the failover."""
    for batch_id, batch in deployment.batches().items():
        if batch_id not in held and batch["status"] in ("validating", "in_progress"):
            deployment.emulator("POST", f"/batches/{VENDOR}/{batch_id}/status", {"status": "in_progress"})
            held.add(batch_id)


@pytest.mark.timeout(720)  # the deployment starts in this test's set-up
def test_triggers_of_a_killed_triggerer_resume_on_the_other_with_their_deadlines(
    deployment: Deployment, record_property: pytest.RecordProperty
) -> None:
    cluster, reader = deployment.cluster, deployment.reader
    runs = [deployment.trigger(f"failover-{n}") for n in range(1, FAILOVER_RUNS + 1)]
    held: set[str] = set()

    def all_deferred() -> bool:
        _hold_new_batches(deployment, held)
        triggers = reader.deferred_triggers(DAG_ID, SENSOR)
        assigned = [run for run in runs if run in triggers and triggers[run].triggerer is not None]
        return len(assigned) == len(runs) and all(deployment.task(r, SENSOR)[0] == "deferred" for r in runs)

    cluster.wait_until(all_deferred, 300, "every sensor to defer and its trigger to be assigned")
    listening = cluster.listening_addresses() | deployment.services.listening_addresses()
    triggers = {run: reader.deferred_triggers(DAG_ID, SENSOR)[run] for run in runs}
    names = reader.triggerer_jobs()
    placement = Counter(names.get(trigger.triggerer) for trigger in triggers.values())
    holder, _ = placement.most_common(1)[0]
    (survivor,) = set(cluster.triggerers) - {holder}
    moving = sorted(t.id for t in triggers.values() if names.get(t.triggerer) == holder)
    before = {run: deployment.trigger_kwargs(trigger.kwargs)["deadline"] for run, trigger in triggers.items()}
    deployment.say(f"{len(runs)} sensors deferred; triggers per triggerer: {dict(placement)}")

    heartbeat_age = reader.heartbeat_ages()[next(j for j, n in names.items() if n == holder)]
    killed_at = time.monotonic()
    pids = cluster.kill(holder)
    deployment.say(f"SIGKILL {holder} (PIDs {pids}) holding triggers {moving}")
    deployment.say(f"{holder}'s last heartbeat was {heartbeat_age:.1f} s before the kill")

    def reassigned() -> bool:
        jobs = reader.triggerer_jobs()
        return all(jobs.get(job) == survivor for job in reader.trigger_assignment(moving).values())

    cluster.wait_until(reassigned, 120, f"{survivor} to take the triggers over")
    reassigned_after = time.monotonic() - killed_at
    survivor_job = next(job for job, name in reader.triggerer_jobs().items() if name == survivor)
    deployment.say(f"triggers {moving} reassigned to {survivor} {reassigned_after:.1f} s after the kill")

    def running() -> bool:
        pattern = f"logs/dag_id=*/*/task_id={SENSOR}/*.log.trigger.{survivor_job}.log"
        text = "".join(path.read_text(errors="replace") for path in cluster.airflow.home.glob(pattern))
        return text.count("Waiting for batch") >= len(moving)

    cluster.wait_until(running, 60, f"{survivor} to run the triggers")
    failover = time.monotonic() - killed_at
    deployment.say(f"{survivor} runs every moved trigger {failover:.1f} s after the kill: the failover time")
    deployment.timings["triggerer failover"] = failover
    record_property("failover_seconds", round(failover, 1))

    current = reader.deferred_triggers(DAG_ID, SENSOR)
    after = {run: deployment.trigger_kwargs(current[run].kwargs)["deadline"] for run in runs}
    for batch_id in sorted(held):
        release = {"status": "in_progress", "hold": False}
        deployment.emulator("POST", f"/batches/{VENDOR}/{batch_id}/status", release)
    deployment.wait_for_success(runs, 240)
    deployment.say(f"runs {runs} succeeded")

    assert moving, "the killed triggerer held no trigger"
    assert {current[run].id for run in runs} == {t.id for t in triggers.values()}, (
        "the triggers were replaced"
    )
    assert after == before, "a trigger's deadline changed when it moved to the other triggerer"
    timeout = deployment.dag.get_task(SENSOR).wait_settings.timeout
    for run, trigger in triggers.items():
        # Set once, at deferral, from the sensor's timeout: the failover does not restart the clock.
        assert abs(before[run] - (trigger.created.timestamp() + timeout)) < 60, (run, before[run], trigger)
    assert listening == {LOOPBACK}, f"listening on {listening}, expected loopback only"


@pytest.mark.timeout(420)
def test_worker_killed_mid_upload_stores_nothing_and_the_retry_creates_one_batch(
    deployment: Deployment, tmp_path: Path
) -> None:
    text = " ".join(review["text"] for review in read_jsonl(REVIEWS_FILE))[:800]
    records = [{"custom_id": f"large-{n:05d}", "prompt": f"{n} {text}"} for n in range(LARGE_REQUESTS)]
    local = tmp_path / "large-requests.jsonl"
    ids = write_requests(local, records)
    size = local.stat().st_size
    requests = Requests(deployment.s3.endpoint.upload(local, deployment.s3.uri("requests/large.jsonl")), ids)
    batches_before = set(deployment.batches())
    stored_before = deployment.stored_files()
    run_id = deployment.trigger("upload-kill", requests)

    def cut_midway() -> bool:
        return any(CUT_AFTER_BYTES <= received < size for received in deployment.uploads_in_flight())

    deployment.cluster.wait_until(cut_midway, 180, "the large upload to be under way")
    received = max(deployment.uploads_in_flight())
    deployment.replace_worker(f"mid-upload: {received / 1e6:.1f} of {size / 1e6:.1f} MB received")
    deployment.cluster.wait_until(lambda: not deployment.uploads_in_flight(), 60, "the cut upload to end")
    stored_after_kill = deployment.stored_files()
    deployment.say(f"after the kill the emulator holds {stored_after_kill} (before: {stored_before})")
    deployment.wait_for_success([run_id], 360)
    tries = deployment.task(run_id, CREATE)[1]
    created = deployment.returned(run_id, CREATE)
    new_batches = set(deployment.batches()) - batches_before
    deployment.say(f"{run_id} succeeded; {CREATE} ran {tries} times and created {sorted(new_batches)}")

    assert stored_after_kill == stored_before, "the cut upload left something at the vendor"
    assert tries == 2, f"{CREATE} should have run twice (killed, retried), ran {tries} times"
    assert created["reattached"] is False
    assert created["request_count"] == LARGE_REQUESTS
    assert new_batches == {created["batch_id"]}, "the retry should create exactly one batch"


@pytest.mark.timeout(360)
def test_worker_killed_after_the_create_took_effect_the_retry_reattaches(deployment: Deployment) -> None:
    batches_before = set(deployment.batches())
    # The vendor creates the batch, then its answer does not come for ten minutes.
    fault = {"kind": "stall_after", "vendor": VENDOR, "operation": "create", "times": 1, "delay": 600}
    deployment.emulator("POST", "/faults", fault)
    try:
        run_id = deployment.trigger("create-kill")

        def created_unanswered() -> bool:
            running = deployment.task(run_id, CREATE)[0] == "running"
            return running and bool(set(deployment.batches()) - batches_before)

        deployment.cluster.wait_until(created_unanswered, 180, "the vendor to create the batch")
        (stalled,) = set(deployment.batches()) - batches_before
        deployment.replace_worker(f"after the vendor created {stalled}, before its answer arrived")
        deployment.wait_for_success([run_id], 300)
    finally:
        deployment.emulator("DELETE", "/faults")
    tries = deployment.task(run_id, CREATE)[1]
    created = deployment.returned(run_id, CREATE)
    new_batches = set(deployment.batches()) - batches_before
    deployment.say(f"{run_id} succeeded; {CREATE} ran {tries} times, re-attached to {created['batch_id']}")

    assert tries == 2, f"{CREATE} should have run twice (killed, retried), ran {tries} times"
    assert created["reattached"] is True, "the retry should re-attach to the batch the vendor created"
    assert created["batch_id"] == stalled
    assert new_batches == {stalled}, "the retry should create no batch"


@pytest.mark.timeout(180)
def test_one_batch_per_run_and_one_row_per_request_on_s3(deployment: Deployment) -> None:
    assert deployment.runs, "no run was triggered: run this module's tests together"
    batches = deployment.batches()
    owned: Counter[str] = Counter()
    for run_id, requests in deployment.runs.items():
        created = deployment.returned(run_id, CREATE)
        ti = SimpleNamespace(dag_id=DAG_ID, task_id=CREATE, run_id=run_id, map_index=-1)
        key = batch_key({"ti": ti}, created["input_fingerprint"])  # type: ignore[typeddict-item]
        mine = [b for b, batch in batches.items() if (batch.get("metadata") or {}).get(KEY_METADATA) == key]
        owned.update(mine)
        assert mine == [created["batch_id"]], f"{run_id}: expected its one batch at the vendor, found {mine}"

        manifest = deployment.returned(run_id, FETCH)
        assert manifest["result_uri"].startswith(f"s3://{deployment.s3.bucket}/"), manifest["result_uri"]
        rows = deployment.s3.endpoint.read_jsonl(manifest["result_uri"])
        custom_ids = [row["custom_id"] for row in rows]
        assert len(rows) == len(requests.custom_ids), (
            f"{run_id}: {len(rows)} rows, {len(requests.custom_ids)} requests"
        )
        assert len(set(custom_ids)) == len(custom_ids), f"{run_id}: duplicate custom_ids in the results"
        assert custom_ids == requests.custom_ids, f"{run_id}: the rows are not the requests, in order"
        assert {row["status"] for row in rows} == {"succeeded"}
    assert sorted(owned) == sorted(batches), (
        f"{len(batches)} batches at the vendor for {len(deployment.runs)} runs"
    )
    leaking = [
        path
        for path in deployment.cluster.airflow.home.rglob("*.log")
        if DEFAULT_API_KEY in path.read_text(errors="replace")
    ]
    assert leaking == [], "the API key is in these logs"
    wall = time.monotonic() - deployment.started
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in deployment.timings.items())
    deployment.say(f"{len(deployment.runs)} runs, {len(batches)} batches; {timings}; {wall:.0f} s so far")
