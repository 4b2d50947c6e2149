"""train-vqgan end to end: a short run, exact resume after a kill, config checks, reconstruct."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bladdergen.checkpoint import load_weights
from bladdergen.config import load_config
from bladdergen.errors import CheckpointError, InputError
from bladdergen.progress import Reporter, Task
from bladdergen.vqgan.load import load_vqgan
from bladdergen.vqgan.reconstruct import reconstruct_set
from bladdergen.vqgan.train import batch_plan, learning_rate, train_vqgan


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets gain nothing from threads; one avoids OpenMP spin-waits on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Tiny nets on the 32x32x8 fixture; the discriminators switch on at step 2 so every loss runs.
SMALL = {
    "vqgan.n_hiddens": 4,
    "vqgan.n_codes": 32,
    "vqgan.num_groups": 4,
    "vqgan.disc_channels": 4,
    "vqgan.disc_layers": 2,
    "vqgan.disc_start": 2,
    "vqgan.max_steps": 4,
    "vqgan.checkpoint_every": 2,
    "vqgan.log_every": 1,
    "vqgan.image_every": 2,
}


def _config(**extra):
    return load_config("tiny", overrides={**SMALL, **extra})


class _KillAfter(Reporter):
    """A reporter whose progress bar raises after ``steps`` steps: a kill mid-run."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def task(self, description, total=None, completed=0):
        outer = self

        class _Task(Task):
            def advance(self, n=1, **fields):
                outer.steps -= n
                if outer.steps <= 0:
                    raise KeyboardInterrupt

        return _Task()


class _Collect(Reporter):
    def __init__(self) -> None:
        self.notices: list[str] = []

    def notice(self, text):
        self.notices.append(text)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """One uninterrupted 4-step run shared by the tests below: (run folder, result, notices)."""
    run = tmp_path_factory.mktemp("vqgan") / "run"
    reporter = _Collect()
    result = train_vqgan(_config().vqgan, tiny_dataset, run, reporter=reporter)
    return run, result, reporter.notices


def test_short_run_writes_weights_state_metrics_and_previews(trained):
    run, result, _ = trained
    assert result["steps"] == 4
    assert {"config.yaml", "model.safetensors", "training_state.pt", "metrics.jsonl"} <= {
        p.name for p in run.iterdir()
    }
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "loss_d" not in records[0] and "loss_d" in records[3]  # discriminators from step 2
    for key in ("l1", "commitment", "g_2d", "g_3d", "feature_matching", "perplexity"):
        assert key in records[3]
    assert sorted(p.name for p in (run / "images").iterdir()) == [
        "step_0000002.png",
        "step_0000004.png",
    ]
    _, metadata = load_weights(run / "model.safetensors", expected_kind="vqgan")
    assert metadata["step"] == 4 and 0 < metadata["code_usage"] <= 1


def test_perceptual_loss_without_weights_is_off_with_one_notice(trained):
    notices = trained[2]
    assert len(notices) == 1 and "perceptual loss is off" in notices[0]


def test_killed_and_resumed_run_equals_an_uninterrupted_run(trained, tiny_dataset, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train_vqgan(_config().vqgan, tiny_dataset, tmp_path / "killed", reporter=_KillAfter(3))
    result = train_vqgan(_config().vqgan, tiny_dataset, tmp_path / "killed", resume=True)
    assert result["start_step"] == 2  # the last checkpoint before the kill
    full, _ = load_weights(trained[0] / "model.safetensors")
    resumed, _ = load_weights(tmp_path / "killed" / "model.safetensors")
    for name, tensor in full.items():
        assert torch.equal(tensor, resumed[name]), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]  # the line logged after the checkpoint was dropped on resume


def test_resume_with_a_different_architecture_is_a_checkpoint_error(
    trained, tiny_dataset, tmp_path
):
    shutil.copytree(trained[0], tmp_path / "run")
    with pytest.raises(CheckpointError, match="vqgan.n_codes"):
        train_vqgan(
            _config(**{"vqgan.n_codes": 16}).vqgan, tiny_dataset, tmp_path / "run", resume=True
        )


def test_a_new_run_refuses_a_folder_that_holds_one(trained, tiny_dataset, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    with pytest.raises(InputError, match="--resume"):
        train_vqgan(_config(**{"vqgan.max_steps": 1}).vqgan, tiny_dataset, tmp_path / "run")


def test_batches_visit_every_case_once_per_epoch_and_depend_only_on_seed_and_step():
    seen = torch.cat([batch_plan(0, step, 6, 2, 8)["indices"] for step in range(3)])
    assert sorted(seen.tolist()) == [0, 1, 2, 3, 4, 5]
    assert torch.equal(batch_plan(0, 5, 6, 2, 8)["flips"], batch_plan(0, 5, 6, 2, 8)["flips"])
    assert not torch.equal(
        batch_plan(0, 1, 6, 2, 8)["indices"], batch_plan(1, 1, 6, 2, 8)["indices"]
    )


def test_perceptual_weights_path_that_does_not_exist_is_an_input_error(tiny_dataset, tmp_path):
    config = _config(**{"vqgan.perceptual_weights": str(tmp_path / "missing.pth")})
    with pytest.raises(InputError, match="missing.pth"):
        train_vqgan(config.vqgan, tiny_dataset, tmp_path / "run")


def test_reconstruct_reports_metrics_usage_and_writes_volumes(trained, tiny_dataset, tmp_path):
    result = reconstruct_set(trained[0], tiny_dataset, device="cpu", out_dir=tmp_path / "out")
    assert result["n_cases"] == 6 and len(result["cases"]) == 6
    assert 0 < result["code_usage"] <= 1 and result["codes_used"] >= 1
    assert result["psnr"] > 0 and -1 <= result["ssim"] <= 1
    assert result["trilinear_psnr"] > 0
    assert len(list((tmp_path / "out" / "images").glob("*.nii.gz"))) == 6
    assert json.loads((tmp_path / "out" / "reconstruct.json").read_text())["n_cases"] == 6
    model, _ = load_vqgan(trained[0])
    assert not model.training


def test_reconstruct_command_prints_one_json_result(trained, tiny_dataset):
    from typer.testing import CliRunner

    from bladdergen.cli import app

    result = CliRunner().invoke(
        app, ["reconstruct", str(trained[0]), str(tiny_dataset), "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n_cases"] == 6 and len(summary["cases"]) == 6


def test_cosine_schedule_runs_from_lr_to_a_tenth_and_constant_stays_put():
    cosine = _config(**{"vqgan.lr": 1e-3, "vqgan.lr_schedule": "cosine", "vqgan.max_steps": 101})
    assert learning_rate(cosine.vqgan, 0) == pytest.approx(1e-3)
    assert learning_rate(cosine.vqgan, 50) == pytest.approx(1e-3 * (0.1 + 0.45))
    assert learning_rate(cosine.vqgan, 100) == pytest.approx(1e-4)
    constant = _config(**{"vqgan.lr": 1e-3, "vqgan.lr_schedule": "constant"})
    assert learning_rate(constant.vqgan, 3) == 1e-3


def test_region_targets_mark_the_enclosed_urine_and_a_shell_around_the_bladder():
    from bladdergen.vqgan.model import LUMEN
    from bladdergen.vqgan.train import SHELL, UNLABELED, with_regions

    labeled = torch.zeros(11, 11, 2, dtype=torch.int64)
    labeled[3:8, 3:8, 0] = 1  # a square wall ring on slice 0 ...
    labeled[4:7, 4:7, 0] = 0  # ... around 3x3 urine voxels
    labeled[3, 5, 0] = 2  # a tumor voxel in the ring keeps it closed
    unlabeled = torch.full((11, 11, 2), UNLABELED, dtype=torch.int64)
    marked = with_regions(torch.stack([labeled, unlabeled])[:, None])

    expected = labeled.clone()
    expected[1:10, 1:10, 0] = SHELL  # two voxels around the 5x5 bladder, in-plane only
    expected[3:8, 3:8, 0] = labeled[3:8, 3:8, 0]
    expected[4:7, 4:7, 0] = LUMEN
    assert torch.equal(marked[0, 0], expected)  # slice 1 has no bladder: nothing marked
    assert torch.equal(marked[1, 0], unlabeled)


def test_region_l1_weighs_each_structure_the_same_whatever_its_size():
    from bladdergen.vqgan.model import LUMEN
    from bladdergen.vqgan.train import SHELL, region_l1

    classes = torch.tensor([1, 1, 1, 2, LUMEN, LUMEN, SHELL, 0]).view(1, 1, 8, 1, 1)
    error = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.4, 0.6, 0.8, 5.0]).view(1, 1, 8, 1, 1)
    # wall 0.2, tumor 0.9, urine 0.5, shell 0.8; background (5.0) is not a region
    assert float(region_l1(error, classes)) == pytest.approx((0.2 + 0.9 + 0.5 + 0.8) / 4)
    assert region_l1(error, torch.zeros_like(classes)) is None


def test_slice_ssim_is_one_for_repeated_slices_and_low_for_independent_noise():
    from bladdergen.vqgan.reconstruct import adjacent_slice_ssim

    generator = torch.Generator().manual_seed(0)
    one_slice = torch.rand(1, 1, 24, 24, 1, generator=generator) * 2 - 1
    assert adjacent_slice_ssim(one_slice.repeat(1, 1, 1, 1, 6)) == pytest.approx(1.0)
    noise = torch.rand(1, 1, 24, 24, 6, generator=generator) * 2 - 1
    assert adjacent_slice_ssim(noise) < 0.2  # independent slices share no structure
