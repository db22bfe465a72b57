#!/usr/bin/env python3
"""
Set-up and everyday commands, with nothing but Python 3.11+ on the machine.

    python3 tasks.py demo   # run the example pipeline end to end against the bundled emulator
    python3 tasks.py test   # lint, type-check and run the test suite (with the distributed end-to-end test)
    python3 tasks.py bench  # the benchmarks against the peer providers (bench/.venv), writes bench/RESULTS.md

Each command creates ``.venv`` on first use and reinstalls only when ``pyproject.toml`` changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LLMBATCH_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def ensure_env(extras: str = "test") -> None:
    if sys.version_info < (3, 11):  # noqa: UP036  (this script runs before the venv exists)
        sys.exit(f"Python 3.11+ is required, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extras}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"installing the project with [{extras}] into {VENV}", flush=True)
    run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PY, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]")
    stamp.write_text(digest)


def run(*cmd: object, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(result.returncode)


def test(args: list[str]) -> None:
    # e2e: the distributed end-to-end test's clients (Celery, PostgreSQL drivers, S3 on moto).
    ensure_env("test,e2e")
    run(BIN / "ruff", "check", ".")
    run(BIN / "ruff", "format", "--check", ".")
    run(BIN / "mypy")
    # pytest exits 5 when it collected nothing: that is a failure here, like any other non-zero exit.
    run(PY, "-m", "pytest", *args)


def demo(args: list[str]) -> None:
    ensure_env("test")
    # dev/ is repository tooling, not in the wheel: run as a module from the checkout's root (run's cwd).
    run(PY, "-m", "dev.demo", *args)


def bench(args: list[str]) -> None:
    # bench/run.py keeps its own environment (bench/.venv, with the peer providers installed only there).
    run(sys.executable, ROOT / "bench" / "run.py", *args)


COMMANDS = {"test": test, "demo": demo, "bench": bench}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python3 tasks.py {{{'|'.join(COMMANDS)}}} [args...]")
    COMMANDS[sys.argv[1]](sys.argv[2:])
