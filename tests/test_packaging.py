"""The release's packaging: what pyproject.toml declares holds, and the release checks catch what they must.

Fast and offline: no build here. ``python3 tasks.py build`` builds, installs and asks a fresh Airflow.
"""

from __future__ import annotations

import importlib
import io
import re
import tarfile
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import tasks
from airflow_provider_llmbatch import __version__
from airflow_provider_llmbatch.get_provider_info import PACKAGE_NAME

ROOT = Path(tasks.__file__).resolve().parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PKG = tasks.PACKAGE
DIST_INFO = f"{PKG}-{__version__}.dist-info"
TOP = f"{PKG}-{__version__}"
LICENSE = (ROOT / "LICENSE").read_bytes()
ENTRY_POINTS = [
    (group, name, target)
    for group, points in tasks.declared_entry_points().items()
    for name, target in points.items()
]


@pytest.mark.parametrize(
    ("group", "name", "target"), ENTRY_POINTS, ids=[f"{group}:{name}" for group, name, _ in ENTRY_POINTS]
)
def test_entry_point_targets_import(group, name, target):
    module, _, attribute = target.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    assert callable(obj)


def test_the_provider_and_the_emulator_are_declared():
    groups = tasks.declared_entry_points()
    assert groups["apache_airflow_provider"] == {
        "provider_info": f"{PKG}.get_provider_info:get_provider_info"
    }
    assert groups["console_scripts"]["llmbatch-emulator"] == f"{PKG}.emulator.cli:main"


def test_every_package_folder_is_a_package():
    # setuptools finds only folders with an __init__.py: a module in any other folder misses the wheel.
    folders = {path.parent for path in (ROOT / PKG).rglob("*.py") if "__pycache__" not in path.parts}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []
    assert (ROOT / PKG / "py.typed").is_file()
    assert PYPROJECT["tool"]["setuptools"]["package-data"][PKG] == ["py.typed"]


def test_extras_name_only_extras_that_exist():
    extras = PROJECT["optional-dependencies"]
    for extra, requirements in extras.items():
        for text in requirements:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == canonicalize_name(PROJECT["name"]):
                assert requirement.extras <= set(extras), f"[{extra}] {text}"
    assert {"emulator", "s3", "gcs", "common-ai", "openlineage", "release"} <= set(extras)


def test_name_and_version():
    assert canonicalize_name(PROJECT["name"]) == PACKAGE_NAME
    assert PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": f"{PKG}.__version__"}
    assert tasks.source_version() == __version__
    assert str(Version(__version__)) == __version__  # PEP 440, in its normal form


def test_the_version_has_a_changelog_entry():
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[0] == "Unreleased"
    assert any(re.fullmatch(rf"{re.escape(__version__)} - \d{{4}}-\d{{2}}-\d{{2}}", h) for h in headings)


def test_license_is_the_whole_apache_2_text():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = LICENSE.decode()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text
    assert re.findall(r"^(\d)\. [A-Z]", text, re.M) == list("123456789")
    assert "END OF TERMS AND CONDITIONS" in text
    assert re.search(r"^Copyright \d{4} \S", text, re.M)
    assert "[yyyy]" not in text
    assert "[name of copyright owner]" not in text


# The release checks of `tasks.py build`, on archives made here: a clean one passes, each defect is named.


def _entry_points_txt() -> bytes:
    return "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) + "\n"
        for group, points in tasks.declared_entry_points().items()
    ).encode()


def _metadata(**fields: str) -> bytes:
    lines = {"Name": PACKAGE_NAME, "Version": __version__, "License-Expression": "Apache-2.0"} | fields
    text = "Metadata-Version: 2.4\n" + "".join(f"{k}: {v}\n" for k, v in lines.items() if v)
    return (text + "License-File: LICENSE\n").encode()


def _package() -> dict[str, bytes]:
    return {name: (ROOT / name).read_bytes() for name in tasks.package_files()}


def good_wheel() -> dict[str, bytes]:
    return _package() | {
        f"{DIST_INFO}/METADATA": _metadata(),
        f"{DIST_INFO}/WHEEL": b"Wheel-Version: 1.0\n",
        f"{DIST_INFO}/entry_points.txt": _entry_points_txt(),
        f"{DIST_INFO}/licenses/LICENSE": LICENSE,
    }


def good_sdist() -> dict[str, bytes]:
    documents = ["pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in"]
    files = {name: (ROOT / name).read_bytes() for name in documents} | {"PKG-INFO": _metadata()}
    return {f"{TOP}/{name}": data for name, data in (files | _package()).items()}


def write_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def write_sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def without(name: str) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda files: {k: v for k, v in files.items() if k != name}


def adding(name: str, data: bytes = b"") -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda files: files | {name: data}


LARGE = b"0" * (tasks.MAX_FILE_BYTES + 1)

WHEEL_DEFECTS = {
    "tests": (adding("tests/test_hooks.py"), "tests"),
    "dev tooling": (adding("dev/demo.py"), "dev"),
    "tasks.py": (adding("tasks.py"), "tasks.py"),
    "example dags": (adding("example_dags/example_llmbatch_zhipu.py"), "example_dags"),
    "bytecode": (adding(f"{PKG}/__pycache__/vendors.cpython-311.pyc"), "__pycache__"),
    "egg-info": (adding(f"{PKG}.egg-info/PKG-INFO"), ".egg-info"),
    "no py.typed": (without(f"{PKG}/py.typed"), "py.typed"),
    "no emulator": (without(f"{PKG}/emulator/cli.py"), "emulator/cli.py"),
    "no provider info": (without(f"{PKG}/get_provider_info.py"), "get_provider_info.py"),
    "large file": (adding(f"{PKG}/data.bin", LARGE), "over 512 kB"),
    "no license": (without(f"{DIST_INFO}/licenses/LICENSE"), "licenses/LICENSE"),
    "other license": (adding(f"{DIST_INFO}/licenses/LICENSE", b"MIT License\n"), "licenses/LICENSE"),
    "no expression": (adding(f"{DIST_INFO}/METADATA", _metadata(**{"License-Expression": ""})), "License-E"),
    "other version": (adding(f"{DIST_INFO}/METADATA", _metadata(Version="9.9.9")), "Version"),
    "entry points": (adding(f"{DIST_INFO}/entry_points.txt", b"[console_scripts]\n"), "entry points"),
}

SDIST_DEFECTS = {
    "tests": (adding(f"{TOP}/tests/test_hooks.py"), "tests"),
    "bench venv": (adding(f"{TOP}/bench/.venv/lib/site.py"), ".venv"),
    "bench data": (adding(f"{TOP}/bench/results/large_job.json", LARGE), "bench"),
    "airflow home": (adding(f"{TOP}/airflow-home/airflow.db"), "airflow-home"),
    "caches": (adding(f"{TOP}/{PKG}/.mypy_cache/3.11/vendors.data.json"), ".mypy_cache"),
    "dist": (adding(f"{TOP}/dist/{PKG}-0.0.1.tar.gz"), "dist"),
    "no changelog": (without(f"{TOP}/CHANGELOG.md"), "CHANGELOG.md"),
    "no readme": (without(f"{TOP}/README.md"), "README.md"),
    "no license": (without(f"{TOP}/LICENSE"), "LICENSE"),
    "other license": (adding(f"{TOP}/LICENSE", b"MIT License\n"), "LICENSE"),
    "module missing": (without(f"{TOP}/{PKG}/vendors.py"), "vendors.py"),
    "outside its folder": (adding("setup.py"), "outside"),
}


def test_a_clean_wheel_passes(tmp_path):
    files = good_wheel()
    assert tasks.check_wheel(write_wheel(tmp_path / "a.whl", files), __version__) == ([], len(files))


def test_a_clean_sdist_passes(tmp_path):
    files = good_sdist()
    assert tasks.check_sdist(write_sdist(tmp_path / "a.tar.gz", files), __version__) == ([], len(files))


@pytest.mark.parametrize(("change", "named"), WHEEL_DEFECTS.values(), ids=list(WHEEL_DEFECTS))
def test_a_wheel_defect_is_named(tmp_path, change, named):
    problems, _ = tasks.check_wheel(write_wheel(tmp_path / "a.whl", change(good_wheel())), __version__)
    assert any(named in problem for problem in problems), problems


@pytest.mark.parametrize(("change", "named"), SDIST_DEFECTS.values(), ids=list(SDIST_DEFECTS))
def test_an_sdist_defect_is_named(tmp_path, change, named):
    problems, _ = tasks.check_sdist(write_sdist(tmp_path / "a.tar.gz", change(good_sdist())), __version__)
    assert any(named in problem for problem in problems), problems
