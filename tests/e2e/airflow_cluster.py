"""
A real Airflow deployment in processes: api-server (execution API), scheduler, dag-processor, triggerer.

Everything listens on 127.0.0.1 only: the API server is bound there, and the scheduler's and
triggerer's log servers (which bind every interface and cannot be told otherwise) are not started.
Each process leads its own process group and is stopped by group id, children included.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from airflow_provider_llmbatch.emulator import DEFAULT_API_KEY
from airflow_provider_llmbatch.emulator.vendor_dialects import emulator_prefix
from airflow_provider_llmbatch.vendors import REGISTRY
from dev.local_airflow import LocalAirflow

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class AirflowCluster:
    """
    Start, watch and stop the processes of one Airflow deployment and an emulator.

    :param airflow: the installation (home, database, DAGs folder) to run.
    :param extra_env: variables for every process (on top of the cluster's own).
    :param emulator_time_scale: the emulator's time scale.
    """

    def __init__(
        self, airflow: LocalAirflow, extra_env: Mapping[str, str] | None = None, *, emulator_time_scale: float
    ) -> None:
        self.airflow = airflow
        self.api_port = free_port()
        self.emulator_port = free_port()
        self.emulator_time_scale = emulator_time_scale
        self.log_dir = airflow.home / "process-logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        emulator_url = f"http://{LOOPBACK}:{self.emulator_port}"
        connections = {
            f"AIRFLOW_CONN_LLMBATCH_{name.upper()}": json.dumps(
                {
                    "conn_type": spec.conn_type,
                    "host": emulator_url + emulator_prefix(spec),
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

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            argv,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

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
        ]
        self._spawn("emulator", emulator_argv, self.airflow.env())
        api = ["api-server", "--host", LOOPBACK, "--port", str(self.api_port), "--apps", "execution"]
        for name, args in {
            "api-server": api,
            "scheduler": ["scheduler", "--skip-serve-logs"],
            "dag-processor": ["dag-processor"],
            "triggerer": ["triggerer", "--skip-serve-logs"],
        }.items():
            self._spawn(name, self.airflow.command(*args), self.airflow.env(self.env_extra))
        self.wait_until(self._emulator_up, 30, "the emulator to answer")

    def _emulator_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.emulator_url}/_emulator/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def cli(self, *args: str, timeout: float = 120) -> None:
        """Run an ``airflow`` CLI command against this deployment; raise if it fails."""
        log_path = self.log_dir / f"cli-{'-'.join(args[:2])}.log"
        status = self.airflow.run(*args, env=self.env_extra, log_path=log_path, timeout=timeout)
        if status != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {status}:\n{self.tail(log_path)}")

    def check_alive(self) -> None:
        """Raise if a process of the deployment has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {process.returncode}:\n{self.tail(self.log_dir / f'{name}.log')}"
                )

    def wait_until(self, predicate: Callable[[], bool], seconds: float, what: str) -> None:
        """Poll ``predicate`` until it is true; raise after ``seconds`` or if a process died."""
        deadline = time.monotonic() + seconds
        while not predicate():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
            time.sleep(0.25)

    def listening_addresses(self) -> set[str]:
        """Return the IPs on which any process of the deployment (children included) listens."""
        addresses: set[str] = set()
        for process in self.processes.values():
            try:
                root = psutil.Process(process.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for member in tree:
                try:
                    connections = member.net_connections(kind="inet")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                addresses.update(c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN)
        return addresses

    def stop(self, grace: float = 20.0) -> dict[str, float | None]:
        """
        Stop every process group: SIGTERM, then SIGKILL for what is left after ``grace`` seconds.

        Return each process's seconds to exit after SIGTERM (None: it had to be killed).
        """
        asked = time.monotonic()
        for process in self.processes.values():
            self._signal_group(process, signal.SIGTERM)
        exited: dict[str, float | None] = dict.fromkeys(self.processes)
        while time.monotonic() < asked + grace and None in exited.values():
            for name, process in self.processes.items():
                if exited[name] is None and process.poll() is not None:
                    exited[name] = round(time.monotonic() - asked, 1)
            time.sleep(0.1)
        for process in self.processes.values():
            # Workers and other children share the leader's group: kill the group even if the leader exited.
            self._signal_group(process, signal.SIGKILL)
            process.wait()
        return exited

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    @staticmethod
    def tail(path: Path, lines: int = 40) -> str:
        """Return the end of a log file."""
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def all_logs_tail(self) -> str:
        """Return the end of every process log, for a failure message."""
        return "\n".join(
            f"--- {name} ---\n{self.tail(self.log_dir / f'{name}.log', 25)}" for name in self.processes
        )
