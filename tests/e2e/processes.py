"""
Child processes of an end-to-end test: each leads a process group and is stopped by PID, children included.

Airflow's supervisors put every task and trigger runner in a process group of its own, so a group signal
alone misses them: :meth:`Processes.kill` and :meth:`Processes.stop` also signal every descendant found
by PID, the way a machine that dies takes all of its processes with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    """Return whether ``url`` answers 200 (a readiness probe)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    """Return the end of a log file."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Processes:
    """
    Start, watch and stop named child processes, each writing its output to ``<log_dir>/<name>.log``.

    :param log_dir: where each process's output goes.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: dict[str, int] = {}
        """Names of processes killed on purpose -> their PID (not an error for :meth:`check_alive`)."""

    def log_path(self, name: str) -> Path:
        """Return where a process's output goes."""
        return self.log_dir / f"{name}.log"

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str], **popen: Any) -> int:
        """Start ``argv`` as the leader of a new process group; return its PID."""
        with self.log_path(name).open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **popen,
            )
        self.running[name] = process
        self.killed.pop(name, None)
        return process.pid

    def pid(self, name: str) -> int:
        """Return the PID of a running process."""
        return self.running[name].pid

    def check_alive(self) -> None:
        """Raise if a process exited that was not killed on purpose."""
        for name, process in self.running.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{tail(self.log_path(name))}")

    def wait_until(self, predicate: Callable[[], bool], seconds: float, what: str) -> float:
        """Poll ``predicate`` until true; return the seconds it took; raise on time-out or a death."""
        started = time.monotonic()
        while not predicate():
            self.check_alive()
            if time.monotonic() - started > seconds:
                raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
            time.sleep(0.25)
        return time.monotonic() - started

    def kill(self, name: str) -> list[int]:
        """SIGKILL a process, its group and every descendant, as a machine that dies; return the PIDs."""
        process = self.running.pop(name)
        tree = _tree(process.pid)
        _signal_all(tree, signal.SIGKILL)
        process.wait()
        self.killed[name] = process.pid
        return [member.pid for member in tree]

    def stop(self, names: Sequence[str] | None = None, grace: float = 20.0) -> dict[str, float | None]:
        """
        Stop processes (default: all): SIGTERM to each group, then SIGKILL for what is left after ``grace``.

        Return each process's seconds to exit after SIGTERM (None: it had to be killed).
        """
        chosen = {name: self.running.pop(name) for name in (names or list(self.running))}
        trees = {name: _tree(process.pid) for name, process in chosen.items()}
        asked = time.monotonic()
        for process in chosen.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        exited: dict[str, float | None] = dict.fromkeys(chosen)
        while time.monotonic() < asked + grace and None in exited.values():
            for name, process in chosen.items():
                if exited[name] is None and process.poll() is not None:
                    exited[name] = round(time.monotonic() - asked, 1)
            time.sleep(0.1)
        for name, process in chosen.items():
            # Task runners and other children lead groups of their own: kill every member found at the start.
            _signal_all(trees[name], signal.SIGKILL)
            process.wait()
        return exited

    def listening_addresses(self) -> set[str]:
        """Return the IPs on which any running process (children included) listens."""
        addresses: set[str] = set()
        for process in self.running.values():
            for member in _tree(process.pid):
                try:
                    connections = member.net_connections(kind="inet")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                addresses.update(c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN)
        return addresses

    def all_logs_tail(self, lines: int = 25) -> str:
        """Return the end of every process log, for a failure message."""
        names = sorted({*self.running, *self.killed})
        return "\n".join(f"--- {name} ---\n{tail(self.log_path(name), lines)}" for name in names)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(tree: list[psutil.Process], sig: signal.Signals) -> None:
    groups = set()
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            groups.add(os.getpgid(member.pid))
            member.send_signal(sig)
    for group in groups - {os.getpgrp()}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
