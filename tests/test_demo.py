"""`bladdergen demo`: the whole pipeline end to end on tiny phantoms, resumable stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bladdergen.config import load_config
from bladdergen.pipeline.demo import STAGES, DemoPlan, run_demo

# A few steps of every stage on 32x32x8 volumes: this checks the wiring, not model quality.
QUICK = {
    "preprocess.target_size": [32, 32],
    "preprocess.target_depth": 8,
    "vqgan.max_steps": 2,
    "vqgan.disc_start": 1,
    "vqgan.checkpoint_every": 1,
    "vqgan.image_every": 1,
    "ldm.max_steps": 2,
    "ldm.ema_start": 1,
    "ldm.checkpoint_every": 1,
    "sample.steps": 2,
    "deepatlas.max_steps": 8,
    "deepatlas.reg_pretrain_steps": 2,  # a multiple of val_every: DeepAtlas starts from the
    "deepatlas.seg_pretrain_steps": 2,  # baseline's pre-training
    "deepatlas.reg_steps_per_cycle": 1,
    "deepatlas.seg_steps_per_cycle": 1,
    "deepatlas.val_every": 2,
    "deepatlas.val_cases": 1,  # 3 labeled training phantoms
    "deepatlas.checkpoint_every": 2,
    "evaluate.bootstrap_samples": 100,
}
PLAN = DemoPlan(
    train_cases=5, unlabeled_cases=2, test_cases=2, phantom_size=48, synthetic_volumes=2
)


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    config = load_config("tiny", overrides=QUICK)
    return run_dir, run_demo(run_dir, config, PLAN)


def test_demo_runs_every_stage_and_writes_the_report(finished_demo):
    run_dir, summary = finished_demo
    assert summary["skipped_stages"] == []
    report = (run_dir / "report.md").read_text()
    assert "| baseline | wall |" in report and "| deepatlas | wall |" in report
    assert len(list((run_dir / "synthetic" / "images").glob("*.nii.gz"))) == 2
    assert len(list((run_dir / "predictions" / "deepatlas").glob("*.nii.gz"))) == 2
    assert (run_dir / "evaluation" / "gen" / "montage.png").is_file()


def test_deepatlas_starts_from_the_baseline_s_pretraining(finished_demo):
    run_dir, _ = finished_demo
    result = json.loads((run_dir / "stages" / "train-deepatlas.json").read_text())["result"]
    assert result["from_baseline"] == str((run_dir / "baseline").resolve())
    assert result["segmentation_updates"] == 4  # 2 of pre-training, 2 of the alternating phase


def test_rerun_with_same_settings_skips_every_stage(finished_demo):
    run_dir, _ = finished_demo
    config = load_config("tiny", overrides=QUICK)
    summary = run_demo(run_dir, config, PLAN)
    assert summary["skipped_stages"] == list(STAGES)


def test_from_stage_reruns_that_stage_and_later_only(finished_demo):
    run_dir, _ = finished_demo
    config = load_config("tiny", overrides=QUICK)
    summary = run_demo(run_dir, config, PLAN, from_stage="evaluate")
    assert summary["skipped_stages"] == list(STAGES[:-1])
    stamp = json.loads((run_dir / "stages" / "evaluate.json").read_text())
    assert stamp["stage"] == "evaluate"


def test_changed_stage_settings_rerun_from_that_stage(finished_demo):
    run_dir, _ = finished_demo
    config = load_config("tiny", overrides={**QUICK, "evaluate.bootstrap_samples": 200})
    summary = run_demo(run_dir, config, PLAN)
    assert summary["skipped_stages"] == list(STAGES[: STAGES.index("evaluate")])
