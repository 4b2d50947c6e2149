"""bench/gpu_check.py keeps working without a GPU: every stage on CPU, failures and the time budget.

The tiny profile at 32x32x24 keeps the whole check to seconds; the paper profile runs the same
functions with bigger networks (its CPU run at 128x128 is documented in docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    # one thread, as the script is run on shared CPUs: two spin-waiting threads on a busy
    # machine cost more than they give
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)
    sys.modules.pop("gpu_check", None)


def _small(out: Path, *extra: str) -> list[str]:
    return [
        "--out",
        str(out),
        "--device",
        "cpu",
        "--profile",
        "tiny",
        "--size",
        "32",
        "--steps",
        "1",
        "--ddim-steps",
        "2",
        "--sample-batch",
        "2",
        "--sample-batches",
        "1",
        "--sample-volumes",
        "3",
        *extra,
    ]


def test_every_stage_runs_on_cpu_and_reports_finite_numbers(gpu_check, tmp_path):
    code = gpu_check.main(_small(tmp_path, "--time-budget", "600"))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 0
    assert report["complete"] is True
    assert report["settings"]["volume"] == [32, 32, 24]
    assert set(report["stages"]) == set(gpu_check.STAGES)
    for name, stage in report["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("error"))
        assert stage["memory_kind"] == "cpu_rss_proxy"
        for key in ("peak_gb", "warmup_peak_gb", "step_s_median", "warmup_s", "wall_s"):
            assert math.isfinite(stage[key]) and stage[key] >= 0, (name, key)
        assert stage["step_s_median"] > 0 and stage["steps_timed"] == 1
        assert all(math.isfinite(v) for v in stage.get("losses", {}).values())
    assert report["stages"]["vqgan_train_b2"]["settings"]["batch"] == 2
    assert "loss_d" in report["stages"]["vqgan_train_b1"]["losses"]  # discriminators on
    for name in ("sample_ddim", "sample_command"):
        assert report["stages"][name]["seconds_per_volume"] > 0
        assert report["stages"][name]["extrapolated_s"] > 0
    measured = report["stages"]["sample_command"]["measured_run"]
    assert measured["status"] == "ok" and measured["volumes"] == 3
    env = report["environment"]
    assert env["torch"] and "gpu_name" in env and "cuda" in env and "cudnn" in env
    assert report["goals"]["evaluated"] is False  # CPU numbers are never judged against goals

    table = (tmp_path / "gpu_check.md").read_text()
    for name in gpu_check.STAGES:
        assert f"| {name} | ok |" in table
    assert "CPU proxy" in table
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave nothing behind


def test_a_failing_stage_is_recorded_and_the_budget_skips_the_measured_run(
    gpu_check, tmp_path, monkeypatch
):
    def broken(ctx):
        raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setitem(gpu_check.STAGE_FUNCTIONS, "segment", broken)
    stages = ["--stages", "segment", "sample_command", "--time-budget", "0"]
    code = gpu_check.main(_small(tmp_path, *stages))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 1
    assert report["stages"]["segment"]["status"] == "oom"
    assert "out of memory" in report["stages"]["segment"]["error"]
    command = report["stages"]["sample_command"]
    assert command["status"] == "ok"
    assert command["measured_run"]["status"] == "skipped"
    assert "time budget" in command["measured_run"]["reason"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| segment | oom:" in table and "| sample_command | ok |" in table


def test_goals_are_judged_only_on_a_gpu_at_the_paper_size(gpu_check):
    ok = {"status": "ok", "peak_gb": 12.5, "step_s_median": 0.8, "steps_timed": 3, "wall_s": 9.0}
    stages = {name: dict(ok) for name in gpu_check.STAGES}
    stages["vqgan_train_b2"]["peak_gb"] = 21.0
    stages["sample_command"] |= {
        "seconds_per_volume": 0.7,
        "volumes_extrapolated": 200,
        "extrapolated_s": 150.0,
        "measured_run": {"status": "ok", "volumes": 200, "wall_s": 170.0},
    }
    report = {
        "command": "python bench/gpu_check.py --out x",
        "started_utc": "now",
        "complete": True,
        "wall_s": 400.0,
        "environment": {
            "gpu_name": "NVIDIA H200",
            "gpu_total_memory_gb": 150.0,
            "torch": "2.x",
            "cuda": "12.x",
            "cudnn": 90000,
            "cuda_device_count": 1,
            "monai": "1.6.1",
        },
        "settings": {
            "device": "cuda:0",
            "profile": "paper",
            "volume": [512, 512, 24],
            "dtype": "bf16 autocast",
            "steps": 3,
            "sample_volumes": 200,
        },
        "stages": stages,
    }
    goals = gpu_check.goals(report)
    assert goals["evaluated"] is True
    assert goals["max_peak_gb"] == 21.0 and goals["every_stage_peak_le_20gb"] is False
    assert goals["sample_seconds"] == 170.0 and goals["sample_seconds_source"] == "measured"
    assert goals["sample_200_le_600s_24gb_gpu"] is True
    assert goals["sample_200_le_180s_h100_h200"] is True
    report["goals"] = goals
    table = gpu_check.markdown(report)
    assert "NVIDIA H200, 150.0 GB" in table and "torch.cuda.max_memory_allocated" in table
    assert "| vqgan_train_b2 | ok |" in table and "| 21.000 |" in table
