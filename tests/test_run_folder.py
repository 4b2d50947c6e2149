"""RunFolder, the run engine's folder object: what it refuses, what it records, how it stops."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml

from bladdergen.checkpoint import load_training_state
from bladdergen.engine.run import RunFolder, RunKind, TrainingDiverged
from bladdergen.errors import CheckpointError, InputError
from bladdergen.runtime import Runtime


@dataclasses.dataclass
class ToySettings:
    lr: float = 0.1
    max_steps: int = 4


def _open(path, resume=False, kind="toy", **settings):
    stage = RunKind(kind, resumable={"max_steps"}, entries={"previews"})
    runtime = Runtime(device=torch.device("cpu"))
    return RunFolder.open(path, stage, ToySettings(**settings), runtime, seed=3, resume=resume)


def _train(run, total=4, every=2, diverge_at=None, killed_after=None):
    net = torch.nn.Linear(2, 1)
    run.restore(net=net)
    for step in run.steps(total, log_every=1):
        loss = float("nan") if step == diverge_at else 1.0 / (step + 1)
        done = run.end_step(step, {"loss": loss})
        if done == killed_after:
            return net  # a kill: the loop ends without a checkpoint
        if run.due(done, every):
            run.save(done, {"net": net})
    return net


def test_a_new_run_records_its_kind_settings_and_seed(tmp_path):
    _open(tmp_path / "run", lr=0.25)
    assert json.loads((tmp_path / "run/run.json").read_text())["kind"] == "toy"
    recorded = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert recorded == {"seed": 3, "toy": {"lr": 0.25, "max_steps": 4}}


def test_a_run_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        _open(tmp_path / "run")


def test_a_folder_with_unrelated_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"not part of a toy run \(notes.txt\)"):
        _open(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


def test_a_folder_holding_another_stages_run_is_refused(tmp_path):
    _open(tmp_path / "run", kind="vqgan")
    with pytest.raises(InputError, match="holds a train-vqgan run, not a train-ldm run"):
        _open(tmp_path / "run", kind="ldm")


def test_a_new_run_over_a_finished_one_asks_for_resume(tmp_path):
    _train(_open(tmp_path / "run"))
    with pytest.raises(InputError, match="--resume"):
        _open(tmp_path / "run")


def test_a_start_killed_before_its_first_checkpoint_starts_again_with_a_clean_log(tmp_path):
    run = _open(tmp_path / "run")
    run.log(1, {"loss": 1.0})  # then killed: no training state yet
    _train(_open(tmp_path / "run"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


def test_resume_may_change_only_the_resumable_keys(tmp_path):
    _train(_open(tmp_path / "run"), total=2)
    with pytest.raises(CheckpointError, match="toy.lr is 0.2 but the run used 0.1"):
        _open(tmp_path / "run", resume=True, lr=0.2)
    assert _open(tmp_path / "run", resume=True, max_steps=8).step == 2


def test_resume_continues_the_log_after_the_checkpoint_step(tmp_path):
    run = _open(tmp_path / "run")
    _train(run, total=4, every=2, killed_after=3)  # checkpoint at 2, logged 1, 2, 3
    resumed = _open(tmp_path / "run", resume=True)
    assert resumed.step == 2
    _train(resumed, total=4, every=2)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite at step 4 \(loss=nan\).*step 2"):
        _train(_open(tmp_path / "run"), total=6, every=2, diverge_at=3)
    state = load_training_state(tmp_path / "run/training_state.pt")
    assert state["step"] == 2
    assert all(math.isfinite(v) for v in state["net"]["weight"].flatten().tolist())


def test_logged_terms_are_the_mean_over_the_logging_window(tmp_path):
    run = _open(tmp_path / "run")
    for step in run.steps(4, log_every=2):
        run.end_step(step, {"loss": float(step)})
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert [(r["step"], r["loss"]) for r in records] == [(2, 0.5), (4, 2.5)]  # (0+1)/2, (2+3)/2


def test_every_rank_rng_state_is_saved_with_the_checkpoint(tmp_path):
    run = _open(tmp_path / "run")
    torch.manual_seed(11)
    run.save(1, {})
    expected = torch.rand(3)
    torch.manual_seed(12)
    resumed = _open(tmp_path / "run", resume=True)
    resumed.restore()
    assert torch.equal(torch.rand(3), expected)
    assert len(load_training_state(tmp_path / "run/training_state.pt")["rng"]) == 1
