"""
The services a distributed Airflow needs, started by the test run itself: PostgreSQL, Redis and S3 (moto).

Each runs as a child process (see :mod:`processes`) on a free 127.0.0.1 port, with its data in a temporary
directory that is removed afterwards. The programs come from Debian's ``postgresql`` and ``redis-server``
packages, which ``.ci/run`` installs when they are missing, and from the ``e2e`` extra (moto). A missing
one fails the test in CI and skips it elsewhere (:func:`unavailable`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import airflow_env
from object_storage import S3Endpoint
from processes import LOOPBACK, Processes, answers, free_port

from dev.metadata import MetadataReader

START_SECONDS = 60.0


def unavailable(what: str) -> NoReturn:
    """Fail under CI (``.ci/run`` installs every service), skip elsewhere."""
    airflow_env.unavailable(f"{what}; `.ci/run` installs it: apt-get install -y postgresql redis-server")


E2E_MODULES = ("psycopg2", "asyncpg", "moto", "airflow.providers.celery", "airflow.providers.amazon")
"""What the ``e2e`` extra installs: PostgreSQL drivers (sync, async), S3 server, executor, filesystem."""


def require_e2e_extra() -> None:
    """Fail under CI, skip elsewhere, unless the ``e2e`` extra is installed."""
    missing = [name for name in E2E_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        airflow_env.unavailable(f"{', '.join(missing)} missing: pip install -e '.[e2e]' (tasks.py test does)")


def _program_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}


def postgres_bindir() -> Path:
    """Return the newest PostgreSQL's ``bin`` directory (Debian keeps it off ``PATH``)."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name))

    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=version)
    program = str(installed[-1]) if installed else shutil.which("postgres")
    if program is None:
        unavailable("PostgreSQL is not installed")
    return Path(program).parent


class PostgreSQL:
    """
    A throwaway PostgreSQL server: ``initdb`` into a temporary directory, ``postgres`` in the foreground.

    PostgreSQL refuses to run as root, so as root both run as the ``postgres`` OS user (which Debian's
    package creates) in a directory it owns. The ``airflow`` role has a random password; the server
    listens on 127.0.0.1 only, with its Unix socket in its own directory.

    :param processes: where the server process is started and stopped.
    """

    role = "airflow"
    database = "airflow"

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.os_user = "postgres" if os.geteuid() == 0 else None
        # Under /tmp, not pytest's private (0700) base directory, so the postgres user can reach it.
        self.root = Path(tempfile.mkdtemp(prefix="llmbatch-pg-"))

    def _as_server_user(self) -> dict[str, Any]:
        if self.os_user is None:
            return {}
        return {"user": self.os_user, "group": self.os_user, "extra_groups": []}

    def start(self) -> None:
        """Create the cluster and the ``airflow`` database; return once it accepts connections."""
        if self.os_user is not None:
            try:
                shutil.chown(self.root, self.os_user, self.os_user)
            except LookupError:
                unavailable("the postgres OS user is missing (it comes with Debian's postgresql package)")
        password_file = self.root / "password"
        password_file.write_text(self.password)
        if self.os_user is not None:
            shutil.chown(password_file, self.os_user, self.os_user)
        data = self.root / "data"
        initdb = subprocess.run(
            [
                str(self.bindir / "initdb"),
                f"--pgdata={data}",
                f"--username={self.role}",
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            env=_program_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **self._as_server_user(),
        )
        password_file.unlink()
        if initdb.returncode != 0:
            raise AssertionError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            # A test's data need not survive a power cut: skip the disk flushes.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            # Every Airflow process keeps a pool: scheduler, api-server, dag-processor, triggerers, workers.
            "max_connections": "300",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(data)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        self.processes.spawn("postgres", argv, _program_env(), **self._as_server_user())
        self.processes.wait_until(self._accepts, START_SECONDS, "PostgreSQL to accept connections")
        connection = self._connect("postgres")
        try:
            connection.autocommit = True
            connection.cursor().execute(f"CREATE DATABASE {self.database}")
        finally:
            connection.close()

    def _connect(self, database: str) -> Any:
        import psycopg2

        return psycopg2.connect(
            host=LOOPBACK,
            port=self.port,
            user=self.role,
            password=self.password,
            dbname=database,
            connect_timeout=5,
        )

    def _accepts(self) -> bool:
        import psycopg2

        try:
            self._connect("postgres").close()
        except psycopg2.OperationalError:
            return False
        return True

    def url(self, scheme: str = "postgresql+psycopg2") -> str:
        """
        Return the SQLAlchemy URL of the ``airflow`` database.

        The driver is named: with SQLAlchemy 2.1 a bare ``postgresql://`` means psycopg 3.
        """
        return f"{scheme}://{self.role}:{self.password}@{LOOPBACK}:{self.port}/{self.database}"

    def reader(self) -> PostgresMetadataReader:
        """Return a read-only view of the Airflow metadata database."""
        return PostgresMetadataReader(self)

    def cleanup(self) -> None:
        """Remove the data directory (after the server has stopped)."""
        shutil.rmtree(self.root, ignore_errors=True)


class DeferredTrigger(NamedTuple):
    """A trigger row: its id, the triggerer job holding it, its stored kwargs and when it was created."""

    id: int
    triggerer: int | None
    kwargs: str
    created: datetime


class PostgresMetadataReader(MetadataReader):
    """
    :class:`~dev.metadata.MetadataReader` over PostgreSQL, plus what the distributed test asks.

    :param server: the PostgreSQL holding the metadata database.
    """

    def __init__(self, server: PostgreSQL) -> None:
        self.server = server

    def _query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        connection = self.server._connect(self.server.database)
        try:
            connection.set_session(readonly=True, autocommit=True)
            with connection.cursor() as cursor:
                cursor.execute(sql.replace("?", "%s"), args)
                return cursor.fetchall()
        finally:
            connection.close()

    def run_states(self, dag_id: str, run_ids: list[str]) -> dict[str, str | None]:
        """Return run id -> state for the given runs of a DAG."""
        rows = self._query(
            "SELECT run_id, state FROM dag_run WHERE dag_id = ? AND run_id = ANY(?)", dag_id, run_ids
        )
        return dict(rows)

    def task_tries(self, dag_id: str, run_id: str) -> dict[str, tuple[str | None, int]]:
        """Return task id -> (state, try number) for a run."""
        rows = self._query(
            "SELECT task_id, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?",
            dag_id,
            run_id,
        )
        return {task_id: (state, tries) for task_id, state, tries in rows}

    def deferred_triggers(self, dag_id: str, task_id: str) -> dict[str, DeferredTrigger]:
        """Return run id -> the trigger a deferred task instance waits on."""
        rows = self._query(
            "SELECT ti.run_id, t.id, t.triggerer_id, t.kwargs, t.created_date FROM trigger t"
            " JOIN task_instance ti ON ti.trigger_id = t.id WHERE ti.dag_id = ? AND ti.task_id = ?",
            dag_id,
            task_id,
        )
        return {run_id: DeferredTrigger(*row) for run_id, *row in rows}

    def trigger_assignment(self, trigger_ids: list[int]) -> dict[int, int | None]:
        """Return trigger id -> the triggerer job it is assigned to (rows of fired triggers are gone)."""
        rows = self._query("SELECT id, triggerer_id FROM trigger WHERE id = ANY(?)", trigger_ids)
        return dict(rows)

    def heartbeat_ages(self) -> dict[int, float]:
        """Return triggerer job id -> seconds since its latest heartbeat, by the database's clock."""
        rows = self._query(
            "SELECT id, EXTRACT(EPOCH FROM now() - latest_heartbeat) FROM job WHERE job_type = 'TriggererJob'"
        )
        return {job_id: float(age) for job_id, age in rows}

    def triggerer_jobs(self) -> dict[int, str]:
        """Return triggerer job id -> the ``unixname`` it recorded (the tests name each triggerer so)."""
        rows = self._query("SELECT id, unixname FROM job WHERE job_type = 'TriggererJob'")
        return {job_id: str(name) for job_id, name in rows}


def redis_server() -> str:
    """Return the ``redis-server`` program."""
    # Debian puts it in /usr/bin; look there too when PATH is minimal.
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    if found is None:
        unavailable("redis-server is not installed")
    return found


class Redis:
    """
    A throwaway Redis (the Celery broker): no persistence, 127.0.0.1 only.

    :param processes: where the server process is started and stopped.
    """

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.program = redis_server()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="llmbatch-redis-"))

    @property
    def url(self) -> str:
        """Return the broker URL."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        """Start the server; return once it answers PING."""
        argv = [self.program, "--bind", LOOPBACK, "--port", str(self.port), "--dir", str(self.root)]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no"]
        self.processes.spawn("redis", argv, _program_env())
        self.processes.wait_until(self._pong, START_SECONDS, "Redis to answer PING")

    def _pong(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cleanup(self) -> None:
        """Remove the working directory."""
        shutil.rmtree(self.root, ignore_errors=True)


class S3:
    """
    An S3 endpoint on loopback: moto's server mode, as a process of its own, with one bucket.

    :param processes: where the server process is started and stopped.
    :param bucket: the bucket to create.
    """

    def __init__(self, processes: Processes, bucket: str) -> None:
        self.processes = processes
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = S3Endpoint(f"http://{LOOPBACK}:{self.port}")

    def start(self) -> None:
        """Start the server and create the bucket."""
        argv = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]
        self.processes.spawn("s3", argv, {**os.environ, **self.endpoint.env()})
        up = f"{self.endpoint.url}/moto-api/"
        self.processes.wait_until(lambda: answers(up), START_SECONDS, "the S3 endpoint to answer")
        self.endpoint.client().create_bucket(Bucket=self.bucket)

    def uri(self, key: str) -> str:
        """Return the ``s3://`` URI of a key in the bucket."""
        return f"s3://{self.bucket}/{key}"
