"""
A distributed Airflow for the end-to-end test: PostgreSQL, the CeleryExecutor on Redis, two triggerers, S3.

:func:`deploy` starts the services (:mod:`services`), migrates the metadata database, starts the Airflow
components and the emulator (:mod:`airflow_cluster`) and unpauses ``example_llmbatch_s3``, whose files live
on the S3 endpoint. :class:`Deployment` is what the tests drive it with: trigger runs, read the metadata
database and the emulator, kill and replace processes, and report milestones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from airflow_cluster import AirflowCluster
from airflow_env import EXAMPLE_DAGS, REVIEWS_FILE, load_example, read_jsonl
from processes import Processes
from services import S3, PostgresMetadataReader, PostgreSQL, Redis, require_e2e_extra

from airflow_provider_llmbatch.jsonl import build_request_file
from airflow_provider_llmbatch.vendors import REGISTRY
from dev.local_airflow import LocalAirflow

DAG_ID = "example_llmbatch_s3"
VENDOR = "zhipu"
MODEL = "glm-4-flash"
UPLOAD_MBPS = 16
"""The emulator takes uploads in at 2 MB/s, so a large one lasts long enough to be cut."""
EMULATOR_TIME_SCALE = 10.0
"""A batch lasts ~14 s."""

SETTINGS = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
    # A dead triggerer's triggers move once its heartbeat is this old (default 30 s; heartbeat 5 s).
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
    # A dead worker's task is failed (and retried) once its heartbeat is this old (default 300 s).
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
    "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "2",
    "LLMBATCH_EXAMPLE_POLL_INTERVAL": "1",
}
"""The deployment's settings, on top of the services' addresses and the shared keys."""


def write_requests(path: Path, records: list[dict[str, Any]]) -> list[str]:
    """Write prompt records as the vendor's request file; return their ``custom_id`` s in order."""
    report = build_request_file(records, path, REGISTRY[VENDOR], model=MODEL, params={"max_tokens": 64})
    assert report.lines == len(records)
    return [record["custom_id"] for record in records]


@dataclass(frozen=True)
class Requests:
    """A request file on S3 and the ``custom_id`` s in it, in order."""

    uri: str
    custom_ids: list[str]


@dataclass
class Deployment:
    """
    The running deployment, the runs the tests triggered and how long each step took.

    :param cluster: the Airflow components and the emulator.
    :param services: the PostgreSQL, Redis and S3 processes.
    :param postgres: the metadata database's server.
    :param s3: the shared storage.
    :param fernet_key: the key every component encrypts trigger kwargs with.
    :param dag: the example DAG, parsed here.
    :param default_requests: the request file at the example's default location.
    :param say_line: writes a line to the terminal.
    """

    cluster: AirflowCluster
    services: Processes
    postgres: PostgreSQL
    s3: S3
    fernet_key: str
    dag: Any
    default_requests: Requests
    say_line: Callable[[str], None]
    runs: dict[str, Requests] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def reader(self) -> PostgresMetadataReader:
        """Return a read-only view of the metadata database."""
        return self.postgres.reader()

    def say(self, message: str) -> None:
        """Report a milestone on the terminal and in ``process-logs/distributed-e2e.log``."""
        line = f"[distributed] {time.monotonic() - self.started:6.1f} s  {message}"
        self.say_line(line)
        with (self.cluster.log_dir / "distributed-e2e.log").open("a") as log:
            log.write(line + "\n")

    def emulator(self, method: str, path: str, body: Any = None) -> Any:
        """Call the emulator's control API (``/_emulator/...``)."""
        url = f"{self.cluster.emulator_url}/_emulator{path}"
        response = httpx.request(method, url, json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def batches(self) -> dict[str, dict[str, Any]]:
        """Return the vendor's batches at the emulator, by id."""
        return {batch["id"]: batch for batch in self.emulator("GET", f"/batches/{VENDOR}")}

    def stored_files(self) -> dict[str, int]:
        """Return the vendor's file counters: ``files`` stored now, ``files_uploaded`` ever, ``batches``."""
        stats = self.emulator("GET", f"/stats?vendor={VENDOR}")[VENDOR]
        return {key: stats[key] for key in ("files", "files_uploaded", "batches")}

    def uploads_in_flight(self) -> list[int]:
        """Return the bytes received so far of each upload the emulator is taking in."""
        return [path.stat().st_size for path in (self.cluster.emulator_data / VENDOR).glob("*.part")]

    def trigger(self, run_id: str, requests: Requests | None = None) -> str:
        """Trigger a run of the example, on its own request file when given; return the run id."""
        conf = [] if requests is None else ["--conf", json.dumps({"requests": requests.uri})]
        self.cluster.cli("dags", "trigger", DAG_ID, "--run-id", run_id, *conf, log_name=f"trigger-{run_id}")
        self.runs[run_id] = requests or self.default_requests
        return run_id

    def task(self, run_id: str, task_id: str) -> tuple[str | None, int]:
        """Return a task instance's state and try number."""
        return self.reader.task_tries(DAG_ID, run_id).get(task_id, (None, 0))

    def returned(self, run_id: str, task_id: str) -> Any:
        """Return a task's return value (XCom)."""
        return self.reader.return_values(DAG_ID, run_id)[task_id]

    def wait_for_success(self, run_ids: list[str], seconds: float) -> None:
        """Wait until the runs have ended; raise unless every one succeeded."""
        reader = self.reader

        def ended() -> bool:
            states = reader.run_states(DAG_ID, run_ids)
            return len(states) == len(run_ids) and set(states.values()) <= {"success", "failed"}

        try:
            self.cluster.wait_until(ended, seconds, f"runs {run_ids} to end")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.cluster.all_logs_tail()}") from None
        states = reader.run_states(DAG_ID, run_ids)
        for run_id in run_ids:
            tasks = reader.task_tries(DAG_ID, run_id)
            assert states[run_id] == "success", f"{run_id}: {tasks}\n{self.cluster.all_logs_tail()}"

    def trigger_kwargs(self, stored: str) -> dict[str, Any]:
        """Decrypt a trigger's stored kwargs."""
        from cryptography.fernet import Fernet

        plain = stored if stored.startswith("{") else Fernet(self.fernet_key).decrypt(stored.encode())
        kwargs = json.loads(plain)
        assert isinstance(kwargs, dict)
        return kwargs

    def replace_worker(self, why: str) -> None:
        """SIGKILL the Celery worker with every process under it, as if its machine died; start a new one."""
        (worker,) = [name for name in self.cluster.workers if name in self.cluster.processes.running]
        pids = self.cluster.kill(worker)
        self.say(f"SIGKILL {worker} (PIDs {pids}) {why}")
        self.say(f"started {self.cluster.start_worker()}")


@contextmanager
def deploy(root: Path, say_line: Callable[[str], None]) -> Iterator[Deployment]:
    """Start the whole deployment under ``root``; stop every process on exit."""
    from cryptography.fernet import Fernet

    require_e2e_extra()
    started = time.monotonic()
    dag = load_example(DAG_ID).dag  # its defaults and the sensor's timeout are read from it
    # The example's defaults name its bucket: the test's S3 endpoint serves it, so the DAG runs as shipped.
    default_uri = dag.params["requests"]
    bucket = default_uri.removeprefix("s3://").partition("/")[0]
    services = Processes(root / "service-logs")
    postgres, redis, s3 = PostgreSQL(services), Redis(services), S3(services, bucket)
    cluster: AirflowCluster | None = None
    try:
        postgres.start()
        redis.start()
        s3.start()
        reviews = read_jsonl(REVIEWS_FILE)
        local = root / "reviews-requests.jsonl"
        ids = write_requests(local, [{"custom_id": r["review_id"], "prompt": r["text"]} for r in reviews])
        s3.endpoint.upload(local, default_uri)
        fernet_key = Fernet.generate_key().decode()
        env = {
            **SETTINGS,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url(),
            "AIRFLOW__CELERY__BROKER_URL": redis.url,
            # db+postgresql:// would mean psycopg 3 under SQLAlchemy 2.1: the driver is named.
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres.url(),
            # Trigger kwargs, connections and variables are encrypted: every component needs the same key.
            "AIRFLOW__CORE__FERNET_KEY": fernet_key,
            **s3.endpoint.env(),
        }
        cluster = AirflowCluster(
            LocalAirflow(root / "airflow-home", EXAMPLE_DAGS),
            env,
            emulator_time_scale=EMULATOR_TIME_SCALE,
            emulator_args=["--upload-mbps", str(UPLOAD_MBPS)],
            triggerers=2,
            celery_workers=1,
        )
        state = Deployment(
            cluster, services, postgres, s3, fernet_key, dag, Requests(default_uri, ids), say_line
        )
        state.started = started
        state.say(f"services up: PostgreSQL :{postgres.port}, Redis :{redis.port}, S3 :{s3.port}")
        cluster.cli("db", "migrate", timeout=300)
        cluster.start()
        reader = postgres.reader()
        cluster.wait_until(lambda: reader.has_dag(DAG_ID), 180, f"{DAG_ID} to be parsed")
        cluster.cli("dags", "unpause", DAG_ID)
        state.timings["deployment ready"] = time.monotonic() - started
        state.say(f"Airflow up: CeleryExecutor, {len(cluster.triggerers)} triggerers, 1 worker")
        yield state
    finally:
        stopped = cluster.stop() if cluster is not None else {}
        services.stop()
        postgres.cleanup()
        redis.cleanup()
        say_line(f"seconds to stop after SIGTERM (None: killed): {stopped}")
        say_line(f"distributed test: {time.monotonic() - started:.0f} s in all")
