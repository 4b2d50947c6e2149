"""Packaging: the dependency ranges and the wheel's contents (issue 13)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _dependencies() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    found = {}
    for requirement in project["dependencies"]:
        name = requirement.split(">")[0].split("=")[0].split("<")[0].split("~")[0].strip()
        found[name.lower()] = requirement
    return found


def test_torch_floor_is_what_monai_1_6_1_needs():
    assert _dependencies()["torch"] == "torch>=2.8,<3"


def test_monai_is_a_compatible_range_not_an_exact_pin():
    requirement = _dependencies()["monai"]
    assert "==" not in requirement
    assert requirement == "monai>=1.6.1,<1.7"


def test_the_apache_license_file_is_present():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_license_but_no_tests(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    shutil.copytree(ROOT / "tests", source / "tests")  # present, and must stay out of the wheel
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    (wheel,) = (tmp_path / "dist").glob("bladdergen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    expected = {
        f"bladdergen/{p.relative_to(ROOT / 'src' / 'bladdergen').as_posix()}"
        for p in (ROOT / "src" / "bladdergen").rglob("*.py")
    }
    assert expected <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    assert not [n for n in names if "conftest" in n or "synthetic.py" in n]
