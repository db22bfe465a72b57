#!/usr/bin/env python3
"""
Set-up and everyday commands, with nothing but Python 3.11+ on the machine.

    python3 tasks.py demo   # run the example pipeline end to end against the bundled emulator
    python3 tasks.py test   # lint, type-check and run the test suite (with the distributed end-to-end test)
    python3 tasks.py bench  # the benchmarks against the peer providers (bench/.venv), writes bench/RESULTS.md
    python3 tasks.py build  # the sdist and the wheel into dist/, checked, then installed into a fresh venv

Each command creates ``.venv`` on first use and reinstalls only when ``pyproject.toml`` changes.
``build`` needs the package index: the fresh venv gets the wheel's dependencies (Airflow) from it.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import zipfile
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


# build: the release artefacts, checked as PyPI and a user's machine will meet them.

PACKAGE = "airflow_provider_llmbatch"
DIST_NAME = "airflow-provider-llmbatch"
# The sdist's top level: what builds the wheel, and the documents a packager reads.
SDIST_TOP = {"PKG-INFO", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md"}
SDIST_NEEDS = ("PKG-INFO", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md")
# Inside the package: typing, the provider's registration, the emulator users test against.
WHEEL_NEEDS = ("__init__.py", "py.typed", "get_provider_info.py", "emulator/__init__.py", "emulator/cli.py")
# Folders no distribution holds: environments, caches, build output, the tooling's Airflow and work areas.
NEVER = {".venv", "__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis", "dist"}
NEVER |= {"build", "airflow-home", "_work"}
# The largest source file is the README (under 50 kB): a file past this is data that was swept in.
MAX_FILE_BYTES = 512 * 1024


class CheckFailed(Exception):
    """A release check that cannot go on; its message says what was found."""


def source_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"', (ROOT / PACKAGE / "__init__.py").read_text(), re.M)
    if match is None:
        raise CheckFailed(f"{PACKAGE}/__init__.py has no __version__")
    return match.group(1)


def package_files() -> set[str]:
    """The package's files in the checkout, named as in a distribution (caches left out)."""
    found = set()
    for path in (ROOT / PACKAGE).rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in {".pyc", ".pyo"}:
            found.add(rel.as_posix())
    return found


def declared_entry_points() -> dict[str, dict[str, str]]:
    import tomllib  # here, not at the top: an older Python must reach ensure_env's message first

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {group: dict(points) for group, points in project.get("entry-points", {}).items()}
    if project.get("scripts"):
        groups["console_scripts"] = dict(project["scripts"])
    return groups


def common_problems(kind: str, sizes: dict[str, int]) -> list[str]:
    """What neither distribution may hold: cache or environment folders, bytecode, large files."""
    problems = []
    never = sorted(n for n in sizes if NEVER & set(n.split("/")) or n.endswith((".pyc", ".pyo")))
    if never:
        problems.append(f"the {kind} holds caches or build output: {', '.join(never[:10])}")
    large = sorted(f"{n} ({size // 1024} kB)" for n, size in sizes.items() if size > MAX_FILE_BYTES)
    if large:
        problems.append(f"the {kind} holds files over {MAX_FILE_BYTES // 1024} kB: {', '.join(large)}")
    return problems


def same_files(kind: str, packaged: set[str], expected: set[str]) -> list[str]:
    problems = []
    if missing := sorted(expected - packaged):
        problems.append(f"the {kind} lacks package files the checkout has: {', '.join(missing)}")
    if extra := sorted(packaged - expected):
        problems.append(f"the {kind} has package files the checkout does not: {', '.join(extra)}")
    return problems


def check_wheel(wheel: Path, version: str) -> tuple[list[str], int]:
    """Check the wheel holds the package and its metadata, and nothing of the repository's tooling."""
    dist_info = f"{PACKAGE}-{version}.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        sizes = {info.filename: info.file_size for info in zf.infolist() if not info.is_dir()}
        read = {n: zf.read(n) for n in sizes if n.startswith(f"{dist_info}/")}
    problems = common_problems("wheel", sizes)
    if stray := sorted({n.split("/")[0] for n in sizes} - {PACKAGE, dist_info}):
        problems.append(f"the wheel holds more than {PACKAGE}/ and {dist_info}/: {', '.join(stray)}")
    problems += same_files("wheel", {n for n in sizes if n.startswith(f"{PACKAGE}/")}, package_files())
    problems += [f"the wheel lacks {PACKAGE}/{n}" for n in WHEEL_NEEDS if f"{PACKAGE}/{n}" not in sizes]
    if read.get(f"{dist_info}/licenses/LICENSE") != (ROOT / "LICENSE").read_bytes():
        problems.append(f"the wheel's {dist_info}/licenses/LICENSE is missing or differs from LICENSE")
    metadata = read.get(f"{dist_info}/METADATA", b"").decode()
    for field in (f"Name: {DIST_NAME}", f"Version: {version}", "License-Expression: Apache-2.0"):
        if field not in metadata.splitlines():
            problems.append(f"the wheel's METADATA lacks the line {field!r}")
    if "License-File: LICENSE" not in metadata.splitlines():
        problems.append("the wheel's METADATA names no License-File: LICENSE")
    entry_points = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    entry_points.optionxform = str  # names keep their case
    entry_points.read_string(read.get(f"{dist_info}/entry_points.txt", b"").decode())
    found = {group: dict(entry_points[group]) for group in entry_points.sections()}
    if found != declared_entry_points():
        problems.append(f"the wheel's entry points {found} are not those pyproject.toml declares")
    return problems, len(sizes)


def check_sdist(sdist: Path, version: str) -> tuple[list[str], int]:
    """Check the sdist holds what builds the wheel and the documents, and nothing large or private."""
    top = f"{PACKAGE}-{version}"
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        license_file = tf.extractfile(f"{top}/LICENSE") if f"{top}/LICENSE" in tf.getnames() else None
        license_text = license_file.read() if license_file else b""
    outside = sorted(m.name for m in members if not m.name.startswith(f"{top}/"))
    sizes = {m.name.removeprefix(f"{top}/"): m.size for m in members}
    problems = common_problems("sdist", sizes)
    if outside:
        problems.append(f"the sdist has files outside {top}/: {', '.join(outside)}")
    allowed = SDIST_TOP | {PACKAGE, f"{PACKAGE}.egg-info"}
    if stray := sorted({n.split("/")[0] for n in sizes} - allowed):
        problems.append(f"the sdist holds repository files a build does not need: {', '.join(stray)}")
    problems += [f"the sdist lacks {n}" for n in SDIST_NEEDS if n not in sizes]
    problems += same_files("sdist", {n for n in sizes if n.startswith(f"{PACKAGE}/")}, package_files())
    if license_text != (ROOT / "LICENSE").read_bytes():
        problems.append("the sdist's LICENSE is missing or differs from LICENSE")
    return problems, len(sizes)


def in_fresh_env(cmd: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run a command of the fresh venv and return its standard output; raise if it fails."""
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        shown = " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))
        tail = (result.stderr or result.stdout).strip()[-3000:]
        raise CheckFailed(f"`{shown}` exited {result.returncode} in the fresh venv:\n{tail}")
    return result.stdout


def airflow_json(airflow: Path, env: dict[str, str], cwd: Path, *command: str) -> list[dict[str, object]]:
    out = in_fresh_env([str(airflow), *command, "--output", "json"], env, cwd)
    # The list is the first line that parses as one: log lines before it start with "[" too.
    for start in (m.start() for m in re.finditer(r"^\[", out, re.M)):
        try:
            listed = json.JSONDecoder().raw_decode(out[start:])[0]
        except ValueError:
            continue
        if isinstance(listed, list):
            return listed
    raise CheckFailed(f"`airflow {' '.join(command)}` printed no JSON list: {out[-2000:]!r}")


def check_installed(wheel: Path, version: str) -> list[str]:
    """Install the wheel into a fresh venv (dependencies from the index); ask that Airflow about it."""
    with tempfile.TemporaryDirectory(prefix="llmbatch-release-") as tmp:
        work = Path(tmp)
        print(f"installing {wheel.name} into a fresh venv in {work}", flush=True)
        venv.EnvBuilder(with_pip=True).create(work / "venv")
        bin_dir = work / "venv" / BIN.name
        # Nothing of this shell's Airflow or Python set-up: only the fresh venv and an empty AIRFLOW_HOME.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "LLMBATCH"))}
        env |= {"AIRFLOW_HOME": str(work / "airflow-home"), "VIRTUAL_ENV": str(work / "venv")}
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        python, pip = str(bin_dir / "python"), [str(bin_dir / "python"), "-m", "pip", "install", "--quiet"]
        in_fresh_env([*pip, "--upgrade", "pip"], env, work)
        in_fresh_env([*pip, str(wheel)], env, work)
        where = in_fresh_env([python, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"], env, work)
        if not Path(where.strip()).is_relative_to(work / "venv"):
            raise CheckFailed(f"the fresh venv imports {PACKAGE} from {where.strip()}, not from the wheel")
        airflow = bin_dir / "airflow"
        problems = []
        providers = airflow_json(airflow, env, work, "providers", "list")
        ours = [p for p in providers if p.get("package_name") == DIST_NAME]
        if [p.get("version") for p in ours] != [version]:
            problems.append(f"`airflow providers list` shows {ours or 'no'} {DIST_NAME} (expected {version})")
        declared_json = in_fresh_env(
            [
                python,
                "-c",
                f"import json; from {PACKAGE}.get_provider_info import get_provider_info as info; "
                "print(json.dumps({c['connection-type']: c['hook-class-name'] for c in "
                "info()['connection-types']}))",
            ],
            env,
            work,
        )
        declared: dict[str, str] = json.loads(declared_json)
        if not declared:
            problems.append("get_provider_info() declares no connection types")
        hooks = {h.get("connection_type"): h for h in airflow_json(airflow, env, work, "providers", "hooks")}
        for conn_type, hook_class in declared.items():
            listed = hooks.get(conn_type)
            if listed is None:
                problems.append(f"`airflow providers hooks` does not list the connection type {conn_type}")
            elif listed.get("class") != hook_class or listed.get("package_name") != DIST_NAME:
                problems.append(f"`airflow providers hooks` lists {conn_type} as {listed}")
        # The emulator extra resolves, and its console script starts with what it brings.
        in_fresh_env([*pip, f"{wheel}[emulator]"], env, work)
        usage = in_fresh_env([str(bin_dir / "llmbatch-emulator"), "--help"], env, work)
        if not usage.startswith("usage: llmbatch-emulator"):
            problems.append(f"`llmbatch-emulator --help` printed {usage[:200]!r}")
        if not problems:
            print(f"  airflow providers list: {DIST_NAME} {version}", flush=True)
            print(f"  airflow providers hooks: {', '.join(sorted(declared))}", flush=True)
            print("  llmbatch-emulator --help (with [emulator]): ok", flush=True)
        return problems


def quiet_step(what: str, *cmd: object) -> str:
    """Run a step of the build, showing its output only when it fails."""
    print(what, flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout, result.stderr, sep="\n", file=sys.stderr)
        raise CheckFailed(f"{what}: exited {result.returncode} (its output is above)")
    return result.stdout


def build(args: list[str]) -> None:
    if args:
        sys.exit("usage: python3 tasks.py build  (no arguments)")
    started = time.monotonic()
    ensure_env("release")
    took: dict[str, float] = {}
    try:
        version, dist = source_version(), ROOT / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        # setuptools puts back every file an earlier SOURCES.txt lists: the sdist is made from the tree as is.
        shutil.rmtree(ROOT / f"{PACKAGE}.egg-info", ignore_errors=True)
        mark = time.monotonic()
        # The sdist first, then the wheel from it: a wheel the sdist cannot build fails here.
        quiet_step("building the sdist, then the wheel from it", PY, "-m", "build", "-o", dist, ROOT)
        wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
        if len(wheels) != 1 or len(sdists) != 1:
            raise CheckFailed(f"expected one wheel and one sdist in dist/, found {sorted(os.listdir(dist))}")
        wheel, sdist = wheels[0], sdists[0]
        twine = quiet_step(
            "twine check --strict", BIN / "twine", "--no-color", "check", "--strict", wheel, sdist
        )
        print(twine.strip(), flush=True)
        wheel_problems, wheel_files = check_wheel(wheel, version)
        sdist_problems, sdist_files = check_sdist(sdist, version)
        if problems := wheel_problems + sdist_problems:
            raise CheckFailed("\n".join(problems))
        took["build and contents"] = time.monotonic() - mark
        mark = time.monotonic()
        if problems := check_installed(wheel, version):
            raise CheckFailed("\n".join(problems))
        took["fresh venv install and airflow"] = time.monotonic() - mark
    except CheckFailed as failed:
        sys.exit(f"build check FAILED:\n{failed}")
    took["total"] = time.monotonic() - started
    print(
        f"""
build check passed: {DIST_NAME} {version}
  wheel  {wheel.name}: {wheel.stat().st_size // 1024} kB, {wheel_files} files; only {PACKAGE}/ (py.typed,
         emulator, get_provider_info) and its dist-info (licenses/LICENSE, entry points as pyproject declares)
  sdist  {sdist.name}: {sdist.stat().st_size // 1024} kB, {sdist_files} files; {", ".join(SDIST_NEEDS)}
         and the package; no tests/, dev/, bench/, example_dags/, caches, bytecode or file over \
{MAX_FILE_BYTES // 1024} kB
  twine check --strict passed; the wheel installed into a fresh venv with Airflow from the package index
  time   {"; ".join(f"{k} {v:.0f} s" for k, v in took.items())}"""
    )


COMMANDS = {"test": test, "demo": demo, "bench": bench, "build": build}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python3 tasks.py {{{'|'.join(COMMANDS)}}} [args...]")
    COMMANDS[sys.argv[1]](sys.argv[2:])
