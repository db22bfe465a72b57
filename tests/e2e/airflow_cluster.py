"""
A real Airflow deployment in processes: api-server (execution API), scheduler, dag-processor, triggerers,
Celery workers when the executor is Celery, and the vendor emulator.

Everything listens on 127.0.0.1 only: the API server is bound there, and the log servers of the scheduler,
triggerers and workers (which bind every interface and cannot be told otherwise) are not started. Each
process leads its own process group and is stopped by PID, children included (see :mod:`processes`).
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from processes import LOOPBACK, Processes, answers, free_port, tail

from airflow_provider_llmbatch.emulator import DEFAULT_API_KEY
from airflow_provider_llmbatch.emulator.vendor_dialects import emulator_prefix
from airflow_provider_llmbatch.vendors import REGISTRY
from dev.local_airflow import LocalAirflow

__all__ = ["LOOPBACK", "AirflowCluster", "free_port"]


class AirflowCluster:
    """
    Start, watch and stop the processes of one Airflow deployment and an emulator.

    :param airflow: the installation (home, DAGs folder) to run.
    :param extra_env: variables for every Airflow process, on top of the cluster's own (which run the
        LocalExecutor on the installation's SQLite database unless these say otherwise).
    :param emulator_time_scale: the emulator's time scale.
    :param emulator_args: more ``llmbatch-emulator`` options, e.g. ``["--upload-mbps", "16"]``.
    :param triggerers: how many triggerers to run.
    :param celery_workers: how many Celery workers to run (set the CeleryExecutor in ``extra_env``).
    """

    def __init__(
        self,
        airflow: LocalAirflow,
        extra_env: Mapping[str, str] | None = None,
        *,
        emulator_time_scale: float,
        emulator_args: Sequence[str] = (),
        triggerers: int = 1,
        celery_workers: int = 0,
    ) -> None:
        self.airflow = airflow
        self.api_port = free_port()
        self.emulator_port = free_port()
        self.emulator_time_scale = emulator_time_scale
        self.emulator_args = list(emulator_args)
        self.emulator_data = airflow.home / "emulator-data"
        self.triggerers = [f"triggerer-{n}" for n in range(1, triggerers + 1)]
        self.workers: list[str] = []
        self._celery_workers = celery_workers
        self.log_dir = airflow.home / "process-logs"
        self.processes = Processes(self.log_dir)
        connections = {
            f"AIRFLOW_CONN_LLMBATCH_{name.upper()}": json.dumps(
                {
                    "conn_type": spec.conn_type,
                    "host": self.emulator_url + emulator_prefix(spec),
                    "password": DEFAULT_API_KEY,
                }
            )
            for name, spec in REGISTRY.items()
        }
        self.env_extra = {
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": f"http://{LOOPBACK}:{self.api_port}",
            # Task processes talk to the API server's execution API, authenticated with JWTs the
            # scheduler signs: both must know the same secret.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{LOOPBACK}:{self.api_port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            **connections,
            **(extra_env or {}),
        }

    @property
    def emulator_url(self) -> str:
        """Return the emulator's root URL."""
        return f"http://{LOOPBACK}:{self.emulator_port}"

    def start(self) -> None:
        """Start the emulator and the Airflow components; return once the emulator answers."""
        emulator_argv = [
            sys.executable,
            "-m",
            "airflow_provider_llmbatch.emulator",
            "--host",
            LOOPBACK,
            "--port",
            str(self.emulator_port),
            "--time-scale",
            str(self.emulator_time_scale),
            "--data-dir",
            str(self.emulator_data),
            *self.emulator_args,
        ]
        self.processes.spawn("emulator", emulator_argv, self.airflow.env())
        api = ["api-server", "--host", LOOPBACK, "--port", str(self.api_port), "--apps", "execution"]
        for name, args in {
            "api-server": api,
            "scheduler": ["scheduler", "--skip-serve-logs"],
            "dag-processor": ["dag-processor"],
        }.items():
            self._spawn_airflow(name, args)
        for name in self.triggerers:
            # A triggerer's job row records getuser() as its unixname: naming each one's user tells
            # which process holds which trigger.
            self._spawn_airflow(name, ["triggerer", "--skip-serve-logs"], {"LOGNAME": name, "USER": name})
        for _ in range(self._celery_workers):
            self.start_worker()
        self.wait_until(self._emulator_up, 30, "the emulator to answer")

    def start_worker(self) -> str:
        """Start one more Celery worker; return its name."""
        name = f"celery-worker-{len(self.workers) + 1}"
        argv = ["celery", "worker", "--skip-serve-logs", "--without-mingle", "--without-gossip"]
        self._spawn_airflow(name, [*argv, "--celery-hostname", f"{name}@{LOOPBACK}"])
        self.workers.append(name)
        return name

    def _spawn_airflow(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.processes.spawn(
            name, self.airflow.command(*args), self.airflow.env({**self.env_extra, **(env or {})})
        )

    def _emulator_up(self) -> bool:
        return answers(f"{self.emulator_url}/_emulator/health")

    def cli(self, *args: str, timeout: float = 120, log_name: str | None = None) -> None:
        """Run an ``airflow`` CLI command against this deployment; raise if it fails."""
        log_path = self.log_dir / f"cli-{log_name or '-'.join(args[:2])}.log"
        status = self.airflow.run(*args, env=self.env_extra, log_path=log_path, timeout=timeout)
        if status != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {status}:\n{self.tail(log_path)}")

    def wait_until(self, predicate: Callable[[], bool], seconds: float, what: str) -> float:
        """Poll ``predicate`` until true; return the seconds it took; raise on time-out or a death."""
        return self.processes.wait_until(predicate, seconds, what)

    def kill(self, name: str) -> list[int]:
        """SIGKILL a component with all its processes, as if its machine died; return their PIDs."""
        return self.processes.kill(name)

    def listening_addresses(self) -> set[str]:
        """Return the IPs on which any process of the deployment (children included) listens."""
        return self.processes.listening_addresses()

    def stop(self, grace: float = 20.0) -> dict[str, float | None]:
        """Stop every process: SIGTERM, then SIGKILL after ``grace``; return each one's seconds to exit."""
        return self.processes.stop(grace=grace)

    @staticmethod
    def tail(path: Path, lines: int = 40) -> str:
        """Return the end of a log file."""
        return tail(path, lines)

    def all_logs_tail(self) -> str:
        """Return the end of every process log, for a failure message."""
        return self.processes.all_logs_tail()
