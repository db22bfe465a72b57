"""
A private Airflow for the demo and the tests: its own home, SQLite metadata database and DAGs folder.

:class:`LocalAirflow` runs every Airflow command in a child process with an environment built from
scratch; :meth:`LocalAirflow.run_dag_tests` runs ``dag.test()`` for a list of DAGs in one such child
(this module, run as ``python -m dev.local_airflow --run-plan ... --report ...``) and reads each run
back from the metadata database.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from dev.metadata import MetadataReader

PIPELINE_DAG_ID = "example_llmbatch_pipeline"
"""The example DAG the demo runs, and the one that marks an ``example_dags`` folder."""

TRIGGER_CLASSPATH = "airflow_provider_llmbatch.triggers.batch.BatchTrigger"
"""The trigger a deferred batch sensor leaves in the metadata database."""

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The source checkout this tooling belongs to."""

_MODULE = "dev.local_airflow"


def find_example_dags() -> Path:
    """Return the ``example_dags`` folder of a source checkout, or of the current directory."""
    for candidate in (REPO_ROOT / "example_dags", Path.cwd() / "example_dags"):
        if (candidate / f"{PIPELINE_DAG_ID}.py").is_file():
            return candidate
    raise FileNotFoundError("example_dags/ not found: run from a source checkout or pass --dags-folder")


def _airflow_version() -> str:
    try:
        return metadata.version("apache-airflow-core")
    except metadata.PackageNotFoundError:
        return metadata.version("apache-airflow")


@dataclass(frozen=True)
class PlannedRun:
    """
    One ``dag.test()`` of a plan, with the dates a scheduler or a manual trigger would give the run.

    :param dag_id: the DAG to run.
    :param env: variables set before the DAG is parsed (e.g. ``LLMBATCH_PIPELINE_VENDOR``).
    :param dates: keyword arguments of ``dag.test()``: ``logical_date`` (None: a manual run without a
        logical date; absent: now) and ``run_after`` (absent: now).
    """

    dag_id: str
    env: Mapping[str, str] = field(default_factory=dict)
    dates: Mapping[str, datetime | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the plan entry the child process reads."""
        dates = {key: None if value is None else value.isoformat() for key, value in self.dates.items()}
        return {"dag_id": self.dag_id, "env": dict(self.env), "dates": dates}


@dataclass(frozen=True)
class DagTestRun:
    """
    The outcome of one ``dag.test()``, read back from the metadata database.

    :param dag_id: the DAG that ran.
    :param run_id: the DAG run, if one was created.
    :param state: the DAG run's final state (None if the run did not finish).
    :param seconds: wall time of the run.
    :param tasks: task id -> final state.
    :param xcoms: task id -> return value.
    :param deferrals: the batch triggers created during the run, as stored (kwargs dict, or None if
        not readable).
    :param error: why the run could not be started or finished, if so.
    :param import_errors: DAG file -> error, for files of the DAGs folder that failed to parse.
    :param log_path: the full output of the process that ran it.
    :param logical_date: the run's logical date as stored (None: the run has none).
    :param run_after: the run's ``run_after`` as stored.
    """

    dag_id: str
    run_id: str | None
    state: str | None
    seconds: float
    tasks: dict[str, str | None] = field(default_factory=dict)
    xcoms: dict[str, Any] = field(default_factory=dict)
    deferrals: list[dict[str, Any] | None] = field(default_factory=list)
    error: str | None = None
    import_errors: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    logical_date: str | None = None
    run_after: str | None = None

    @property
    def succeeded(self) -> bool:
        """Return True when the DAG run succeeded."""
        return self.state == "success" and self.error is None


class LocalAirflow:
    """
    A private Airflow: its own home directory, SQLite metadata database and DAGs folder.

    Every Airflow command runs in a child process whose environment holds only this Airflow's
    settings (inherited ``AIRFLOW*`` variables are dropped), so nothing leaks in from, or out to,
    another Airflow on the machine.

    :param home: the ``AIRFLOW_HOME``; created if missing.
    :param dags_folder: the DAGs folder (default: the repository's ``example_dags``).
    """

    def __init__(
        self, home: str | os.PathLike[str], dags_folder: str | os.PathLike[str] | None = None
    ) -> None:
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
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db_path}",
            }
        )
        # The dag.test() child imports this module, and the DAGs must import the provider even from a
        # checkout that is not installed: both are found from the repository root.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
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

    def clone(
        self, home: str | os.PathLike[str], dags_folder: str | os.PathLike[str] | None = None
    ) -> LocalAirflow:
        """Return a new installation at ``home`` starting from a copy of this one's migrated database."""
        other = LocalAirflow(home, dags_folder or self.dags_folder)
        if self.db_path.exists():
            shutil.copyfile(self.db_path, other.db_path)
            other._stamp.write_text(_airflow_version())
        return other

    def reader(self) -> MetadataReader:
        """Return a read-only view of the metadata database."""
        return MetadataReader(self.db_path)

    def run_dag_tests(
        self,
        runs: Sequence[str | tuple[str, Mapping[str, str]] | PlannedRun],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        log_path: Path | None = None,
        on_run: Callable[[DagTestRun], None] | None = None,
    ) -> list[DagTestRun]:
        """
        Run ``dag.test()`` for each DAG, one after the other, in one child process; read back each run.

        One process for all: starting Airflow's in-process execution API costs seconds, once. Deferrals
        run in line (``dag.test()`` builds the trigger from its serialized kwargs and runs it).

        :param runs: DAG ids, ``(dag_id, env)`` pairs whose variables are set before the DAG is
            parsed (e.g. ``LLMBATCH_PIPELINE_VENDOR``), or :class:`PlannedRun` (with the run's dates).
        :param env: variables for the whole process (connections, poll interval).
        :param timeout: seconds for all runs together; runs not finished by then are reported so.
        :param log_path: where the process's output goes (default: under ``logs/``).
        :param on_run: called with each run as soon as it has finished.
        """
        plan = [_planned(run) for run in runs]
        stamp = f"{os.getpid()}-{time.monotonic_ns()}"
        plan_path = self.home / "logs" / f"dag-test-plan-{stamp}.json"
        report_path = self.home / "logs" / f"dag-test-report-{stamp}.jsonl"
        log_path = log_path or self.home / "logs" / f"dag-test-{stamp}.log"
        plan_path.write_text(json.dumps([run.to_json() for run in plan]))
        results: list[DagTestRun] = []
        done = 0

        def collect() -> None:
            nonlocal done
            text = report_path.read_text() if report_path.exists() else ""
            # Only newline-terminated lines are complete; the last piece may still be being written.
            for line in text.split("\n")[:-1][done:]:
                results.append(self._read_run(json.loads(line), log_path))
                done += 1
                if on_run is not None:
                    on_run(results[-1])

        deadline = time.monotonic() + timeout
        with log_path.open("wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", _MODULE, "--run-plan", str(plan_path), "--report", str(report_path)],
                env=self.env(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            reason = ""
            try:
                while child.poll() is None and time.monotonic() < deadline:
                    collect()
                    time.sleep(0.2)
            finally:
                if child.poll() is None:
                    child.kill()
                    reason = f"not finished after {timeout:.0f} s"
                    log.write(f"\n*** killed: {reason}\n".encode())
                status = child.wait()
        collect()
        reason = reason or f"the process running the DAGs exited early (status {status})"
        for planned in plan[len(results) :]:
            missing = DagTestRun(planned.dag_id, None, None, 0.0, error=reason, log_path=log_path)
            results.append(missing)
            if on_run is not None:
                on_run(missing)
        return results

    def _read_run(self, entry: Mapping[str, Any], log_path: Path) -> DagTestRun:
        dag_id, run_id = entry["dag_id"], entry.get("run_id")
        seconds = entry["ended"] - entry["started"]
        import_errors = dict(entry.get("import_errors") or {})
        if not run_id:
            return DagTestRun(
                dag_id,
                None,
                None,
                seconds,
                error=entry.get("error"),
                import_errors=import_errors,
                log_path=log_path,
            )
        reader = self.reader()
        logical_date, run_after = reader.run_dates(dag_id, run_id)
        return DagTestRun(
            dag_id=dag_id,
            run_id=run_id,
            state=entry.get("state"),
            seconds=seconds,
            tasks=reader.task_states(dag_id, run_id),
            xcoms=reader.return_values(dag_id, run_id),
            # Created dates are stored to the microsecond but may lag a clock read: allow a second.
            deferrals=reader.triggers(
                TRIGGER_CLASSPATH, since=entry["started"] - 1.0, until=entry["ended"] + 1.0
            ),
            error=entry.get("error"),
            import_errors=import_errors,
            log_path=log_path,
            logical_date=logical_date,
            run_after=run_after,
        )


def _planned(run: str | tuple[str, Mapping[str, str]] | PlannedRun) -> PlannedRun:
    if isinstance(run, PlannedRun):
        return run
    return PlannedRun(run) if isinstance(run, str) else PlannedRun(run[0], run[1])


def _run_plan(plan_path: Path, report_path: Path) -> int:
    """Run ``dag.test()`` for each entry of a plan, in this process; append one JSON line per run."""
    import traceback

    from airflow.dag_processing.dagbag import DagBag

    plan = json.loads(plan_path.read_text())
    worst = 0
    for item in plan:
        saved = {key: os.environ.get(key) for key in item["env"]}
        os.environ.update(item["env"])
        entry: dict[str, Any] = {"dag_id": item["dag_id"], "started": time.time()}
        try:
            # Parsed afresh for each run, so variables read at parse time take this run's values.
            bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
            entry["import_errors"] = {str(path): str(error) for path, error in bag.import_errors.items()}
            dag = bag.get_dag(item["dag_id"])
            if dag is None:
                raise LookupError(f"DAG {item['dag_id']!r} not found; import errors: {bag.import_errors}")
            # Absent dates are dag.test()'s defaults (now); a null logical date is a run without one.
            dates = {
                key: None if value is None else datetime.fromisoformat(value)
                for key, value in item.get("dates", {}).items()
            }
            dag_run = dag.test(**dates)
            state = getattr(dag_run.state, "value", dag_run.state)
            entry.update(run_id=dag_run.run_id, state=state)
        except Exception as exc:
            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        entry["ended"] = time.time()
        worst = max(worst, 0 if entry.get("state") == "success" else 1)
        with report_path.open("a") as report:
            report.write(json.dumps(entry) + "\n")
    return worst


def _child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description="Run a dag.test() plan.")
    parser.add_argument("--run-plan", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    return _run_plan(args.run_plan, args.report)


if __name__ == "__main__":
    sys.exit(_child_main())
