"""The command-line shell: version, help, exit codes, profile printing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from bladdergen import __version__
from bladdergen.cli.app import app

runner = CliRunner()


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"bladdergen {__version__}"


def test_config_show_prints_a_profile_that_loads_back(tmp_path: Path):
    result = runner.invoke(app, ["config", "show", "tiny"])
    assert result.exit_code == 0
    data = yaml.safe_load(result.output)
    assert data["profile"] == "tiny"
    assert data["preprocess"]["target_size"] == [64, 64]


def test_bad_input_exits_2_with_one_line_and_no_traceback():
    result = runner.invoke(app, ["config", "show", "huge"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "profile: got 'huge'" in result.output


def test_unknown_option_is_bad_usage_exit_2():
    result = runner.invoke(app, ["config", "show", "--no-such-flag"])
    assert result.exit_code == 2


def test_python_dash_m_runs_the_same_tool():
    completed = subprocess.run(
        [sys.executable, "-m", "bladdergen", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0
    assert completed.stdout.strip() == f"bladdergen {__version__}"
