"""
Run the example pipeline end to end against the bundled emulator, in a private Airflow.

    python -m airflow_provider_llmbatch.demo [--vendor all|zhipu|moonshot|dashscope|openai]

Starts the emulator on a free loopback port, prepares a private ``AIRFLOW_HOME`` (``./airflow-home``:
a SQLite metadata database, migrated once and reused), points the connections ``llmbatch_<vendor>``
at the emulator through ``AIRFLOW_CONN_*`` variables and runs ``airflow dags test
example_llmbatch_pipeline`` once per vendor. The batch sensor defers for real: its trigger runs in
line, then the task resumes. Prints per vendor the run state, where the results landed, the counts,
the tokens and the wall time; exits non-zero if a run failed.

:class:`LocalAirflow` and :class:`MetadataReader` are also what the test suite runs Airflow with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from airflow_provider_llmbatch.vendors import REGISTRY

PIPELINE_DAG_ID = "example_llmbatch_pipeline"
"""The DAG the demo runs."""

TRIGGER_CLASSPATH = "airflow_provider_llmbatch.triggers.batch.BatchTrigger"
"""The trigger a deferred batch sensor leaves in the metadata database."""

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def find_example_dags() -> Path:
    """Return the ``example_dags`` folder of a source checkout, or of the current directory."""
    for candidate in (_PACKAGE_ROOT / "example_dags", Path.cwd() / "example_dags"):
        if (candidate / f"{PIPELINE_DAG_ID}.py").is_file():
            return candidate
    raise FileNotFoundError("example_dags/ not found: run from a source checkout or pass --dags-folder")


def _airflow_version() -> str:
    try:
        return metadata.version("apache-airflow-core")
    except metadata.PackageNotFoundError:
        return metadata.version("apache-airflow")


@dataclass(frozen=True)
class DagTestRun:
    """
    The outcome of one ``airflow dags test``, read back from the metadata database.

    :param dag_id: the DAG that ran.
    :param returncode: the command's exit status (1 when the run failed).
    :param seconds: wall time of the command.
    :param run_id: the DAG run, if one was created.
    :param state: the DAG run's final state.
    :param tasks: task id -> final state.
    :param xcoms: task id -> return value.
    :param deferrals: the batch triggers created during the run, as stored (kwargs dict, or None if
        not readable).
    :param log_path: the command's full output.
    """

    dag_id: str
    returncode: int
    seconds: float
    run_id: str | None
    state: str | None
    tasks: dict[str, str | None] = field(default_factory=dict)
    xcoms: dict[str, Any] = field(default_factory=dict)
    deferrals: list[dict[str, Any] | None] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def succeeded(self) -> bool:
        """Return True when the command and the DAG run both succeeded."""
        return self.returncode == 0 and self.state == "success"


class MetadataReader:
    """
    Read an Airflow SQLite metadata database, read-only, without importing Airflow.

    :param db_path: the SQLite file.
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def _query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        # Read-only and with a busy timeout: the scheduler and workers may be writing right now.
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def has_dag(self, dag_id: str) -> bool:
        """Return True once the DAG is parsed and serialized."""
        return bool(self._query("SELECT 1 FROM serialized_dag WHERE dag_id = ?", dag_id))

    def latest_run(self, dag_id: str) -> tuple[str, str | None] | None:
        """Return ``(run_id, state)`` of the DAG's newest run."""
        rows = self._query("SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", dag_id)
        return (rows[0][0], rows[0][1]) if rows else None

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """Return task id -> state for a run (mapped tasks: the last index read wins)."""
        rows = self._query("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return {task_id: state for task_id, state in rows}

    def return_values(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Return task id -> XCom return value for a run."""
        rows = self._query(
            "SELECT task_id, value FROM xcom WHERE dag_id = ? AND run_id = ? AND key = 'return_value'",
            dag_id,
            run_id,
        )
        values: dict[str, Any] = {}
        for task_id, raw in rows:
            try:
                values[task_id] = json.loads(raw) if isinstance(raw, str | bytes) else raw
            except ValueError:
                values[task_id] = raw
        return values

    def triggers(self, classpath: str, *, since: float = 0.0) -> list[dict[str, Any] | None]:
        """Return the kwargs of triggers of a class created since an epoch time (None where encrypted)."""
        rows = self._query("SELECT kwargs, created_date FROM trigger WHERE classpath = ?", classpath)
        found: list[dict[str, Any] | None] = []
        for raw, created in rows:
            if _epoch(created) < since:
                continue
            try:
                kwargs = json.loads(raw) if str(raw).startswith("{") else None
            except ValueError:
                kwargs = None
            found.append(kwargs if isinstance(kwargs, dict) else None)
        return found


def _epoch(created: Any) -> float:
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(str(created))
    except ValueError:
        return 0.0
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class LocalAirflow:
    """
    A private Airflow: its own home directory, SQLite metadata database and DAGs folder.

    Every Airflow command runs in a child process whose environment holds only this Airflow's
    settings (inherited ``AIRFLOW*`` variables are dropped), so nothing leaks in from, or out to,
    another Airflow on the machine.

    :param home: the ``AIRFLOW_HOME``; created if missing.
    :param dags_folder: the DAGs folder (default: the repository's ``example_dags``).
    """

    def __init__(self, home: str | os.PathLike[str], dags_folder: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve() if dags_folder else find_example_dags()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)

    @property
    def db_path(self) -> Path:
        """Return the SQLite metadata database file."""
        return self.home / "airflow.db"

    @property
    def _stamp(self) -> Path:
        return self.home / f".migrated-{_airflow_version()}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the environment of an Airflow process of this installation, plus ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        python_path = [str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")]
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db_path}",
                "PYTHONPATH": os.pathsep.join(p for p in python_path if p),
            }
        )
        env.update(extra or {})
        return env

    def command(self, *args: str) -> list[str]:
        """Return the argv of an ``airflow`` command run with this interpreter."""
        return [sys.executable, "-m", "airflow", *args]

    def run(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        timeout: float | None = None,
    ) -> int:
        """Run an ``airflow`` command to completion; return its exit status (output to ``log_path``)."""
        log_path = log_path or self.home / "logs" / f"{'-'.join(args[:2])}.log"
        with log_path.open("wb") as log:
            try:
                return subprocess.run(
                    self.command(*args),
                    env=self.env(env),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                log.write(f"\n*** killed after {timeout} s\n".encode())
                return -1

    def migrate(self) -> bool:
        """Create or upgrade the metadata database unless this Airflow version already did; say if it ran."""
        if self._stamp.exists() and self.db_path.exists():
            return False
        status = self.run("db", "migrate", log_path=self.home / "logs" / "db-migrate.log", timeout=300)
        if status != 0:
            raise RuntimeError(f"airflow db migrate failed; see {self.home / 'logs' / 'db-migrate.log'}")
        self._stamp.write_text(_airflow_version())
        return True

    def clone(self, home: str | os.PathLike[str], dags_folder: str | os.PathLike[str] | None = None) -> LocalAirflow:
        """Return a new installation at ``home`` starting from a copy of this one's migrated database."""
        other = LocalAirflow(home, dags_folder or self.dags_folder)
        if self.db_path.exists():
            shutil.copyfile(self.db_path, other.db_path)
            other._stamp.write_text(_airflow_version())
        return other

    def reader(self) -> MetadataReader:
        """Return a read-only view of the metadata database."""
        return MetadataReader(self.db_path)

    def dags_test(
        self,
        dag_id: str,
        *,
        env: Mapping[str, str] | None = None,
        conf: Mapping[str, Any] | None = None,
        timeout: float = 300.0,
        log_path: Path | None = None,
    ) -> DagTestRun:
        """Run ``airflow dags test`` (deferrals run in line) and read back what happened."""
        log_path = log_path or self.home / "logs" / f"dags-test-{dag_id}.log"
        args = ["dags", "test", dag_id]
        if conf:
            args += ["--conf", json.dumps(dict(conf))]
        started = time.time()
        clock = time.monotonic()
        status = self.run(*args, env=env, log_path=log_path, timeout=timeout)
        seconds = time.monotonic() - clock
        reader = self.reader()
        latest = reader.latest_run(dag_id) if self.db_path.exists() else None
        if latest is None:
            return DagTestRun(dag_id, status, seconds, None, None, log_path=log_path)
        run_id, state = latest
        return DagTestRun(
            dag_id=dag_id,
            returncode=status,
            seconds=seconds,
            run_id=run_id,
            state=state,
            tasks=reader.task_states(dag_id, run_id),
            xcoms=reader.return_values(dag_id, run_id),
            # Created-date precision is a second: allow for it rather than miss this run's trigger.
            deferrals=reader.triggers(TRIGGER_CLASSPATH, since=started - 1.0),
            log_path=log_path,
        )


def _default_home() -> Path:
    return Path.cwd() / "airflow-home"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_llmbatch.demo",
        description="Run the example LLM batch pipeline in a private Airflow against the bundled emulator.",
    )
    parser.add_argument(
        "--vendor",
        choices=["all", *REGISTRY],
        default="all",
        help="which vendor's pipeline to run (default: all, one after the other)",
    )
    parser.add_argument("--home", type=Path, default=None, help="AIRFLOW_HOME to use (default: ./airflow-home)")
    parser.add_argument("--dags-folder", type=Path, default=None, help="DAGs folder (default: example_dags/)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=3.0,
        help="emulator time scale: a batch takes about 1.4 s times this (default: 3.0)",
    )
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="the batch sensor's poll interval, seconds (default: 1)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per run (default: 300)")
    return parser.parse_args(argv)


def _row_of(vendor: str, run: DagTestRun) -> dict[str, Any]:
    fetched = run.xcoms.get("fetch_results") or {}
    summary = run.xcoms.get("summarize") or {}
    return {
        "vendor": vendor,
        "state": run.state or f"exit {run.returncode}",
        "deferred": "yes" if run.deferrals else "no",
        "counts": fetched.get("counts") or {},
        "tokens": (fetched.get("usage") or {}).get("total_tokens"),
        "results": fetched.get("result_uri"),
        "summary": summary.get("summary"),
        "seconds": run.seconds,
        "log": run.log_path,
    }


def _print_row(row: Mapping[str, Any]) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in row["counts"].items() if v) or "-"
    print(
        f"{row['vendor']:<10} {row['state']:<8} deferred: {row['deferred']:<3} "
        f"requests: {counts}; tokens: {row['tokens'] if row['tokens'] is not None else '-'}; "
        f"{row['seconds']:.1f} s",
        flush=True,
    )
    print(f"{'':<10} results: {row['results'] or '-'}", flush=True)
    if row["summary"]:
        print(f"{'':<10} summary: {row['summary']}", flush=True)
    if row["state"] != "success":
        print(f"{'':<10} log:     {row['log']}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 when every run succeeded."""
    args = _parse_args(argv)
    home = (args.home or _default_home()).resolve()
    # Set before anything can import Airflow, so this process never touches ~/airflow either.
    os.environ["AIRFLOW_HOME"] = str(home)
    from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig

    airflow = LocalAirflow(home, args.dags_folder)
    vendors = list(REGISTRY) if args.vendor == "all" else [args.vendor]
    wall = time.monotonic()
    print(f"AIRFLOW_HOME {airflow.home} (DAGs: {airflow.dags_folder})", flush=True)
    clock = time.monotonic()
    if airflow.migrate():
        print(f"metadata database created in {time.monotonic() - clock:.1f} s", flush=True)
    failed = 0
    with Emulator(EmulatorConfig(time_scale=args.time_scale)) as emulator:
        print(f"emulator on {emulator.url} (time scale {args.time_scale})", flush=True)
        connections: dict[str, str] = {}
        for vendor in REGISTRY:
            connections.update(emulator.airflow_conn_env(vendor, f"llmbatch_{vendor}"))
        print(f"running {PIPELINE_DAG_ID} for: {', '.join(vendors)}\n", flush=True)
        for vendor in vendors:
            output_dir = airflow.home / "llmbatch-pipeline" / vendor
            run = airflow.dags_test(
                PIPELINE_DAG_ID,
                env={
                    **connections,
                    "LLMBATCH_PIPELINE_VENDOR": vendor,
                    "LLMBATCH_EXAMPLE_POLL_INTERVAL": str(args.poll_interval),
                    "LLMBATCH_OUTPUT_DIR": str(output_dir),
                },
                timeout=args.timeout,
                log_path=airflow.home / "logs" / f"demo-{vendor}.log",
            )
            failed += not run.succeeded
            _print_row(_row_of(vendor, run))
    print(f"\n{len(vendors) - failed}/{len(vendors)} runs succeeded in {time.monotonic() - wall:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
