"""train-deepatlas: run folder, kill-and-resume, the supervised-only baseline, pools, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bladdergen.checkpoint import read_metadata
from bladdergen.config import load_config
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.deepatlas import train as deepatlas_train
from bladdergen.deepatlas.pairs import segmentation_updates
from bladdergen.deepatlas.train import (
    registration_beats_identity,
    smoothed_score,
    train_deepatlas,
)
from bladdergen.errors import CheckpointError, ConfigError, InputError
from bladdergen.progress import Reporter, Task
from synthetic import ring_classes

# Tiny networks and a short schedule: reg pretrain 2, seg pretrain 2, cycles of 2 reg + 2 seg.
TINY_NETS = {
    "preprocess.target_size": [32, 32],
    "preprocess.target_depth": 8,
    "deepatlas.seg_filters": [4, 8, 8],
    "deepatlas.reg_filters": [4, 8, 8],
    "deepatlas.reg_pretrain_steps": 2,
    "deepatlas.seg_pretrain_steps": 2,
    "deepatlas.reg_steps_per_cycle": 2,
    "deepatlas.seg_steps_per_cycle": 2,
    "deepatlas.val_every": 4,
    "deepatlas.checkpoint_every": 3,
    "deepatlas.log_every": 1,
    "deepatlas.val_cases": 1,  # 4 labeled cases in the tiny set
    "deepatlas.device": "cpu",
}


def tiny_config(**extra):
    return load_config("tiny", overrides={**TINY_NETS, **extra})


class _KillAt(Reporter):
    """A reporter whose progress bar raises KeyboardInterrupt after ``step`` steps (a kill)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def task(self, description, total=None, completed=0):
        reporter = self

        class _Task(Task):
            done = completed

            def advance(self, n=1, **fields):
                self.done += n
                if self.done == reporter.step:
                    raise KeyboardInterrupt

        return _Task()


def test_training_writes_checkpoints_logs_and_validation(tiny_dataset, tmp_path):
    config = tiny_config(**{"deepatlas.max_steps": 8, "deepatlas.val_every": 2})
    result = train_deepatlas(config.deepatlas, tiny_dataset, tmp_path)
    assert result["steps"] == 8 and result["validation_cases"] == 1
    assert result["labeled_training_cases"] == 3 and result["unlabeled_images"] == 2
    for name in ("config.yaml", "model.safetensors", "best.safetensors", "split.json"):
        assert (tmp_path / name).is_file()
    assert read_metadata(tmp_path / "model.safetensors")["kind"] == "deepatlas"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records if r["phase"] not in ("validation", "synthetic_filter")]
    assert phases == ["reg_pretrain"] * 2 + ["seg_pretrain"] * 2 + ["reg"] * 2 + ["seg"] * 2
    # the synthetic plausibility filter runs once, at the first alternating step (no synthetic)
    assert [(r["step"], r["synthetic"]) for r in records if r["phase"] == "synthetic_filter"] == [
        (5, 0)
    ]
    validation = [r for r in records if r["phase"] == "validation"]
    # not at step 2: the segmentation net is still untrained after registration pre-training
    assert [r["step"] for r in validation] == [4, 6, 8]
    for key in ("dice_wall", "dice_mean", "folding", "registration_dice", "identity_dice"):
        assert key in validation[0]
    assert "similarity" in records[0] and "folding" in records[0]


def test_kill_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_dataset, tmp_path):
    config = tiny_config(**{"deepatlas.max_steps": 8})
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):  # killed at step 7, last checkpoint at step 6
        train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "killed", reporter=_KillAt(7))
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "killed", resume=True)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed/metrics.jsonl").open()]
    assert steps == [json.loads(x)["step"] for x in (tmp_path / "straight/metrics.jsonl").open()]


def _validations(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in r.items() if k != "seconds"}
        for r in map(json.loads, lines)
        if r["phase"] == "validation"
    ]


def test_smoothed_score_is_the_exponential_moving_average():
    assert smoothed_score(None, 0.4, 0.9) == 0.4
    assert smoothed_score(0.5, 1.0, 0.9) == pytest.approx(0.55)
    assert smoothed_score(0.5, 1.0, 0.0) == 1.0


def test_best_checkpoint_is_chosen_on_the_smoothed_validation_score(
    tiny_dataset, tmp_path, monkeypatch
):
    # scripted validation scores: the raw best is update 3 (0.65); averaged with 0.5 they are
    # 0.6, 0.4, 0.525, 0.5625, 0.58125, 0.565625, whose best is update 1
    scores = iter([0.6, 0.2, 0.65, 0.6, 0.6, 0.55])
    monkeypatch.setattr(
        deepatlas_train, "validate", lambda *args: {"dice_mean": next(scores), "dice_wall": 0.0}
    )
    steps = {"deepatlas.max_steps": 12, "deepatlas.val_every": 1, "deepatlas.val_smoothing": 0.5}
    cfg = tiny_config(**steps).deepatlas
    train_deepatlas(cfg, tiny_dataset, tmp_path, supervised_only=True)
    validations = _validations(tmp_path)
    assert [r["dice_mean_smoothed"] for r in validations] == pytest.approx(
        [0.6, 0.4, 0.525, 0.5625, 0.58125, 0.565625]
    )
    assert [r["best"] for r in validations] == [True] + [False] * 5
    assert read_metadata(tmp_path / "best.safetensors")["step"] == 1


def test_a_killed_run_resumes_its_smoothed_validation_score(tiny_dataset, tmp_path):
    steps = {"deepatlas.max_steps": 8, "deepatlas.val_every": 2, "deepatlas.val_smoothing": 0.5}
    config = tiny_config(**steps)
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):  # killed at step 7, last checkpoint at step 6
        train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "killed", reporter=_KillAt(7))
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "killed", resume=True)
    resumed, straight = _validations(tmp_path / "killed"), _validations(tmp_path / "straight")
    assert [r["step"] for r in straight] == [4, 6, 8]
    assert resumed == straight


def test_resume_with_a_different_network_is_refused(tiny_dataset, tmp_path):
    train_deepatlas(tiny_config(**{"deepatlas.max_steps": 4}).deepatlas, tiny_dataset, tmp_path)
    changed = tiny_config(**{"deepatlas.max_steps": 6, "deepatlas.seg_filters": [4, 8, 16]})
    with pytest.raises(CheckpointError, match="seg_filters"):
        train_deepatlas(changed.deepatlas, tiny_dataset, tmp_path, resume=True)


def test_supervised_only_trains_the_segmentation_net_for_the_same_number_of_updates(
    tiny_dataset, tmp_path
):
    config = tiny_config(**{"deepatlas.max_steps": 10})
    result = train_deepatlas(config.deepatlas, tiny_dataset, tmp_path, supervised_only=True)
    # schedule of 10 steps: 2 reg + 2 seg pretrain, then reg reg seg seg reg reg -> 4 seg updates
    assert result["steps"] == segmentation_updates(config.deepatlas, 10) == 4
    assert result["unlabeled_images"] == 0
    tensors = load_file(tmp_path / "model.safetensors")
    assert all(name.startswith("seg_net.") for name in tensors)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    assert {r["phase"] for r in records} == {"supervised", "validation"}


def test_synthetic_hu_volumes_are_preprocessed_like_the_training_data(tiny_dataset, tmp_path):
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        hu = rng.uniform(-200, 300, (40, 36, 11)).astype(np.float32)
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 3.0, 1.0])), synthetic / f"s{index}.nii.gz")
    config = tiny_config(**{"deepatlas.max_steps": 4})  # pre-training only
    result = train_deepatlas(
        config.deepatlas, tiny_dataset, tmp_path / "run", synthetic_dir=synthetic
    )
    assert result["synthetic_images"] == 2
    prepared = sorted((tmp_path / "run" / "prepared" / "synthetic").glob("*.nii.gz"))
    assert [p.name for p in prepared] == ["s0.nii.gz", "s1.nii.gz"]
    array = np.asanyarray(nib.load(prepared[0]).dataobj)
    assert array.shape == (32, 32, 8) and array.min() >= -1.0 and array.max() <= 1.0


def test_too_few_labeled_cases_for_the_validation_split_is_an_input_error(tiny_dataset, tmp_path):
    config = tiny_config(**{"deepatlas.val_cases": 4})
    with pytest.raises(InputError, match="labeled cases"):
        train_deepatlas(config.deepatlas, tiny_dataset, tmp_path)


def test_two_gloo_processes_train_with_ddp(tiny_dataset, tmp_path):
    nested: dict = {}
    for dotted, value in {**TINY_NETS, "deepatlas.max_steps": 6}.items():
        section, key = dotted.split(".")
        nested.setdefault(section, {})[key] = value
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(nested))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "bladdergen",
        "train-deepatlas",
        str(tiny_dataset),
        str(run_dir),
        "-p",
        "tiny",
        "-c",
        str(config_file),
        "-q",
        "--json",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 6
    assert read_metadata(run_dir / "model.safetensors")["step"] == 6


def test_validation_scores_a_perfect_segmentation_as_dice_one(tiny_dataset):
    from bladdergen.data.dataset import PreprocessedSet
    from bladdergen.deepatlas.fields import Warper
    from bladdergen.deepatlas.losses import one_hot
    from bladdergen.deepatlas.pools import PoolImage
    from bladdergen.deepatlas.train import _Images, validate
    from bladdergen.runtime import start_runtime

    dataset = PreprocessedSet.open(tiny_dataset)
    case = dataset.case("case_001")  # labeled, with a tumor
    truth = torch.from_numpy(dataset.load_label(case).astype(np.int64))[None, None]

    class Oracle(torch.nn.Module):
        roi_size = None

        def forward(self, image):
            return one_hot(truth) * 10.0

    images = _Images([PoolImage("case_001", "validation", case.image_path, case.label_path)], [], 2)
    scores = validate(Oracle(), None, images, images, Warper(), start_runtime("cpu"))
    assert scores["dice_wall"] == 1.0 and scores["dice_tumor"] == 1.0


def test_max_steps_shorter_than_pretraining_stops_and_says_what_would_fit(tiny_dataset, tmp_path):
    config = tiny_config(**{"deepatlas.max_steps": 3})  # pre-training is 2 + 2 steps
    with pytest.raises(ConfigError, match=r"--max-steps >= 4 \(8 for one alternating cycle\)"):
        train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "run")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def _validation(wall, wall_identity, bladder, bladder_identity):
    return {
        "registration_dice": wall,
        "identity_dice": wall_identity,
        "registration_dice_bladder": bladder,
        "identity_dice_bladder": bladder_identity,
    }


def test_anatomy_gate_opens_only_when_registration_beats_the_identity_by_the_margin():
    cfg = tiny_config(**{"deepatlas.anatomy_gate_margin": 0.05}).deepatlas
    assert registration_beats_identity(_validation(0.16, 0.1, 0.46, 0.4), cfg)
    assert not registration_beats_identity(_validation(0.14, 0.1, 0.46, 0.4), cfg)
    assert not registration_beats_identity(_validation(0.16, 0.1, None, 0.4), cfg)
    assert not registration_beats_identity(_validation(None, 0.1, 0.46, 0.4), cfg)


def test_anatomy_gate_stays_closed_when_only_the_wall_beats_the_identity():
    # the measured failure: wall 0.13 vs 0.07 cleared the margin, the bladders did not overlap
    # better than unmoved (0.21 vs 0.227), and the anatomy term taught F_S misplaced walls
    cfg = tiny_config(**{"deepatlas.anatomy_gate_margin": 0.02}).deepatlas
    assert not registration_beats_identity(_validation(0.133, 0.072, 0.21, 0.227), cfg)


def test_anatomy_gate_against_the_segmenter_needs_warped_labels_as_good_as_its_own():
    cfg = tiny_config(**{"deepatlas.anatomy_gate_segmenter": True}).deepatlas
    beats_identity = _validation(0.5, 0.1, 0.7, 0.4)
    # warped labels 0.5 / 0.7 against F_S's own 0.74 / 0.9: closed; against 0.45 / 0.65: open
    assert not registration_beats_identity(
        {**beats_identity, "dice_wall": 0.74, "dice_bladder": 0.9}, cfg
    )
    assert not registration_beats_identity(
        {**beats_identity, "dice_wall": 0.45, "dice_bladder": 0.9}, cfg
    )
    assert registration_beats_identity(
        {**beats_identity, "dice_wall": 0.45, "dice_bladder": 0.65}, cfg
    )
    assert not registration_beats_identity(beats_identity, cfg)  # no score of F_S's own
    cfg.anatomy_gate_segmenter = False
    assert registration_beats_identity(
        {**beats_identity, "dice_wall": 0.74, "dice_bladder": 0.9}, cfg
    )


@pytest.mark.parametrize("augment", [False, True])
def test_deepatlas_pretraining_gives_the_baseline_s_segmentation_net(
    tiny_dataset, tmp_path, augment
):
    """Paired arms: after pre-training F_S is the supervised baseline's after as many updates
    (with augmentation too: both arms draw the same transforms)."""
    config = tiny_config(
        **{
            "deepatlas.max_steps": 4,
            "deepatlas.checkpoint_every": 4,
            "deepatlas.seg_augment": augment,
        }
    )
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "da")
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "sup", supervised_only=True)
    deepatlas = load_file(tmp_path / "da" / "model.safetensors")
    supervised = load_file(tmp_path / "sup" / "model.safetensors")
    seg_keys = [k for k in supervised if k.startswith("seg_net.")]
    assert seg_keys and all(torch.equal(deepatlas[k], supervised[k]) for k in seg_keys)


def test_with_the_baseline_s_draw_and_nothing_added_deepatlas_trains_the_baseline_s_net(
    tiny_dataset, tmp_path
):
    """seg_supervised_draw "baseline": an alternating segmentation step learns from the
    baseline's batch of the same update, so with no anatomy term and no registration
    augmentation every update equals the baseline's and so do the final weights (with
    supervised weight 1: the baseline's loss is unweighted, and Adam is scale-invariant only up
    to its epsilon)."""
    settings = {
        "deepatlas.max_steps": 12,
        "deepatlas.supervised_weight": 1.0,
        "deepatlas.checkpoint_every": 12,
        "deepatlas.seg_augment": True,
        "deepatlas.anatomy_weight": 0.0,
        "deepatlas.reg_augment_weight": 0.0,
    }
    config = tiny_config(**settings, **{"deepatlas.seg_supervised_draw": "baseline"})
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "da")
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "sup", supervised_only=True)
    deepatlas = load_file(tmp_path / "da" / "model.safetensors")
    supervised = load_file(tmp_path / "sup" / "model.safetensors")
    assert segmentation_updates(config.deepatlas, 12) > config.deepatlas.seg_pretrain_steps
    seg_keys = [k for k in supervised if k.startswith("seg_net.")]
    assert seg_keys and all(torch.equal(deepatlas[k], supervised[k]) for k in seg_keys)
    # the pair draw of the paper's DeepAtlas trains another net from the same pre-training
    paper = tiny_config(**settings, **{"deepatlas.seg_supervised_draw": "pairs"})
    train_deepatlas(paper.deepatlas, tiny_dataset, tmp_path / "pairs")
    pairs = load_file(tmp_path / "pairs" / "model.safetensors")
    assert not all(torch.equal(pairs[k], supervised[k]) for k in seg_keys)


def test_with_the_baseline_s_draw_every_segmentation_pair_moves_its_labeled_image(
    tiny_dataset, tmp_path, monkeypatch
):
    """Every alternating segmentation step adds one registration-augmented pair, also when the
    pair was drawn with its labeled image as the target."""
    import bladdergen.deepatlas.train as train_module

    seen = []

    def recording(classes):
        seen.append(classes)
        return classes

    monkeypatch.setattr(train_module, "without_tumor", recording)
    # every pair drawn as (unlabeled moving, labeled target): the draw must turn it round
    monkeypatch.setattr(
        train_module, "segmentation_pairs", lambda rng, n_labeled, *a, **k: [(n_labeled, 0)]
    )
    settings = {
        "deepatlas.max_steps": 12,
        "deepatlas.reg_augment_tumor": "ignore",  # so the spy sees each augmented pair
        "deepatlas.seg_supervised_draw": "baseline",
    }
    config = tiny_config(**settings)
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "da")
    alternating = segmentation_updates(config.deepatlas, 12) - config.deepatlas.seg_pretrain_steps
    assert alternating > 0 and len(seen) == alternating


def _record_augmentations(monkeypatch) -> list[set[int]]:
    """Spy on the trainer's augment_labeled: one entry per call, the classes of its output labels."""
    import bladdergen.deepatlas.train as train_module

    calls = []
    original = train_module.augment_labeled

    def recording(images, labels, rng, ranges):
        moved = original(images, labels, rng, ranges)
        calls.append(set(moved[1].unique().tolist()))
        return moved

    monkeypatch.setattr(train_module, "augment_labeled", recording)
    return calls


def test_with_seg_augment_every_segmentation_update_augments_its_supervised_images(
    tiny_dataset, tmp_path, monkeypatch
):
    """The alternating phase's supervised term is augmented too, not only pre-training's: the
    baseline's updates are all augmented, so DeepAtlas's must be for the same augmentation."""
    calls = _record_augmentations(monkeypatch)
    config = tiny_config(**{"deepatlas.max_steps": 12, "deepatlas.seg_augment": True})
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "da")
    cfg = config.deepatlas
    alternating = segmentation_updates(cfg, 12) - cfg.seg_pretrain_steps
    assert alternating > 0  # the run reaches the alternating phase
    # one call per segmentation update: every segmentation pair holds a labeled image
    assert len(calls) == segmentation_updates(cfg, 12)


def test_augment_warped_also_moves_the_registration_augmented_pairs(
    tiny_dataset, tmp_path, monkeypatch
):
    import bladdergen.deepatlas.train as train_module

    calls = _record_augmentations(monkeypatch)
    # every pair: the first labeled image moving onto the first unlabeled one, so every
    # alternating-phase update has one registration-augmented pair
    monkeypatch.setattr(
        train_module, "segmentation_pairs", lambda rng, n_labeled, *a, **k: [(0, n_labeled)]
    )
    settings = {"deepatlas.max_steps": 12, "deepatlas.seg_augment": True}
    config = tiny_config(**settings, **{"deepatlas.augment_warped": True})
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "da")
    cfg = config.deepatlas
    alternating = segmentation_updates(cfg, 12) - cfg.seg_pretrain_steps
    assert alternating > 0
    # pre-training: one call per update; alternating: the pair's labeled image, then the warped pair
    assert len(calls) == cfg.seg_pretrain_steps + 2 * alternating


def test_reg_augment_context_puts_each_warped_atlas_into_its_target_s_surroundings(
    tiny_dataset, tmp_path, monkeypatch
):
    import bladdergen.deepatlas.train as train_module

    targets = []

    def recording(warped, warped_bladder, target, target_bladder):
        targets.append(target.clone())
        return with_target_context(warped, warped_bladder, target, target_bladder)

    with_target_context = train_module.with_target_context
    monkeypatch.setattr(train_module, "with_target_context", recording)
    # every pair: the first labeled image moving onto the first unlabeled one
    monkeypatch.setattr(
        train_module, "segmentation_pairs", lambda rng, n_labeled, *a, **k: [(0, n_labeled)]
    )
    config = tiny_config(**{"deepatlas.max_steps": 12, "deepatlas.reg_augment_context": True})
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "da")
    cfg = config.deepatlas
    alternating = segmentation_updates(cfg, 12) - cfg.seg_pretrain_steps
    assert alternating > 0 and len(targets) == alternating
    unlabeled = PreprocessedSet.open(tiny_dataset).unlabeled_cases[0]
    first_unlabeled = torch.from_numpy(PreprocessedSet.open(tiny_dataset).load_image(unlabeled))
    assert all(torch.equal(t[0, 0], first_unlabeled) for t in targets)


def _sample_folder(root, plausible, tumor=False):
    """A `sample`-style folder: images/, labels/ (0/255/128) and checks/ per sample."""
    rng = np.random.default_rng(1)
    for sub in ("images", "labels", "checks"):
        (root / sub).mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"format": "bladdergen-samples"}))
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    for index, ok in enumerate(plausible):
        name = f"sample_{index:05d}"
        hu = rng.uniform(-200, 300, (40, 36, 11)).astype(np.float32)
        label = np.zeros(hu.shape, np.uint8)
        label[10:30, 10:26, 2:9] = 255
        label[14:26, 14:22, 2:9] = 0
        if tumor:
            label[10:14, 16:20, 4:7] = 128
        nib.save(nib.Nifti1Image(hu, affine), root / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"{name}.nii.gz")
        (root / "checks" / f"{name}.json").write_text(json.dumps({"checks": {"plausible": ok}}))


def test_plausible_synthetic_pairs_are_labeled_data_and_the_rest_unlabeled(tiny_dataset, tmp_path):
    _sample_folder(tmp_path / "samples", plausible=[True, False, True])
    config = tiny_config(**{"deepatlas.max_steps": 4, "deepatlas.synthetic_pairs": True})
    result = train_deepatlas(
        config.deepatlas, tiny_dataset, tmp_path / "run", synthetic_dir=tmp_path / "samples"
    )
    assert (result["synthetic_pairs"], result["synthetic_images"]) == (2, 1)
    assert result["labeled_training_cases"] == 3 + 2  # the real training split + the pairs
    label = tmp_path / "run/prepared/synthetic/labels/sample_00000.nii.gz"
    classes = np.asanyarray(nib.load(label).dataobj)
    assert classes.shape == (32, 32, 8) and set(np.unique(classes)) <= {0, 1}  # wall as class 1
    assert not (tmp_path / "run/prepared/synthetic/labels/sample_00001.nii.gz").exists()


def test_the_supervised_baseline_uses_synthetic_pairs_only_when_given(tiny_dataset, tmp_path):
    _sample_folder(tmp_path / "samples", plausible=[True, True])
    config = tiny_config(**{"deepatlas.max_steps": 6, "deepatlas.synthetic_pairs": True})
    plus = train_deepatlas(
        config.deepatlas,
        tiny_dataset,
        tmp_path / "plus",
        synthetic_dir=tmp_path / "samples",
        supervised_only=True,
    )
    assert (plus["synthetic_pairs"], plus["synthetic_images"]) == (2, 0)
    assert plus["labeled_training_cases"] == 3 + 2
    off = tiny_config(**{"deepatlas.max_steps": 6, "deepatlas.synthetic_pairs": False})
    alone = train_deepatlas(
        off.deepatlas,
        tiny_dataset,
        tmp_path / "alone",
        synthetic_dir=tmp_path / "samples",
        supervised_only=True,
    )
    assert (alone["synthetic_pairs"], alone["labeled_training_cases"]) == (0, 3)


def test_ignored_synthetic_tumors_reach_the_loss_as_ignored_voxels_through_augmentation(
    tiny_dataset, tmp_path, monkeypatch
):
    from bladdergen.deepatlas.losses import IGNORED

    seen = _record_augmentations(monkeypatch)
    _sample_folder(tmp_path / "samples", plausible=[True, True], tumor=True)
    settings = {"deepatlas.max_steps": 8, "deepatlas.synthetic_pairs": True}
    settings |= {"deepatlas.synthetic_pair_weight": 100.0, "deepatlas.seg_augment": True}
    settings |= {"deepatlas.synthetic_pair_tumor": "ignore", "deepatlas.tumor_case_fraction": 0}
    config = tiny_config(**settings)
    train_deepatlas(
        config.deepatlas,
        tiny_dataset,
        tmp_path / "run",
        synthetic_dir=tmp_path / "samples",
        supervised_only=True,
    )
    # at weight 100 against 3 real cases nearly every draw is a pair: its tumor arrives ignored
    assert any(IGNORED in classes for classes in seen)
    assert all(classes <= {0, 1, 2, IGNORED} for classes in seen)


def test_synthetic_pairs_are_unlabeled_images_unless_the_flag_asks_for_them(tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from bladdergen.cli.app import app

    _sample_folder(tmp_path / "samples", plausible=[True, True])
    nested: dict = {}
    for dotted, value in {**TINY_NETS, "deepatlas.max_steps": 4}.items():
        section, key = dotted.split(".")
        nested.setdefault(section, {})[key] = value
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(nested))

    def counts(run: str, *flags: str) -> tuple[int, int]:
        args = [str(tiny_dataset), str(tmp_path / run), "-s", str(tmp_path / "samples")]
        args += ["-p", "tiny", "-c", str(tmp_path / "config.yaml"), "-q", "--json", *flags]
        done = CliRunner().invoke(app, ["train-deepatlas", *args])
        assert done.exit_code == 0, done.output
        result = json.loads(done.output.strip().splitlines()[-1])
        return result["synthetic_pairs"], result["synthetic_images"]

    assert counts("default") == (0, 2)  # the paper's use: synthetic volumes are unlabeled
    assert counts("pairs", "--synthetic-pairs") == (2, 0)


def _records(run_dir, from_step):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [
        {k: v for k, v in r.items() if k != "seconds"} for r in records if r["step"] >= from_step
    ]


# Settings only the registration net and the alternating phase use: a baseline trained without
# them still hands off DeepAtlas's own pre-training.
_DEEPATLAS_ONLY = {
    "deepatlas.anatomy_weight": 0.5,
    "deepatlas.reg_augment_weight": 0.0,
    "deepatlas.lncc_kernel": 3,
    "deepatlas.reg_lr": 1e-3,
    "deepatlas.reg_steps_per_cycle": 3,
    "deepatlas.pair_tumor_sampling": True,
    "deepatlas.augment_warped": True,
    "deepatlas.reg_augment_tumor": "ignore",
    "deepatlas.seg_supervised_draw": "pairs",  # the tiny default is "baseline"
}


@pytest.mark.parametrize("rule", ["label", "ignore"])
def test_reg_augment_tumor_decides_whether_warped_tumors_reach_the_loss(
    tiny_dataset, tmp_path, monkeypatch, rule
):
    import bladdergen.deepatlas.train as train_module

    seen = []

    def recording(classes):
        out = without_tumor(classes)
        seen.append(set(out.unique().tolist()))
        return out

    without_tumor = train_module.without_tumor
    monkeypatch.setattr(train_module, "without_tumor", recording)
    config = tiny_config(**{"deepatlas.max_steps": 12, "deepatlas.reg_augment_tumor": rule})
    train_deepatlas(config.deepatlas, tiny_dataset, tmp_path / "run")
    # 12 steps: 4 of pre-training, then 4 segmentation steps (cycles of 2 + 2), each with a
    # registration-augmented pair when its moving image is labeled
    assert (0 < len(seen) <= 4) if rule == "ignore" else not seen
    assert all(2 not in classes for classes in seen)


@pytest.mark.parametrize(
    ("augment", "deepatlas_only"), [(False, {}), (True, {}), (False, _DEEPATLAS_ONLY)]
)
def test_deepatlas_from_the_baseline_s_handoff_ends_with_the_weights_of_a_full_run(
    tiny_dataset, tmp_path, augment, deepatlas_only
):
    """--from-baseline skips the supervised pre-training and loses nothing: final and best
    weights and every record from the hand-off's validation on equal a run that trained it,
    also when the baseline ran with other registration / alternating-phase settings."""
    extra = {"deepatlas.max_steps": 12, "deepatlas.val_every": 2, "deepatlas.seg_augment": augment}
    cfg = tiny_config(**extra, **deepatlas_only).deepatlas
    train_deepatlas(cfg, tiny_dataset, tmp_path / "full")
    baseline = tiny_config(**extra).deepatlas
    train_deepatlas(baseline, tiny_dataset, tmp_path / "sup", supervised_only=True)
    train_deepatlas(cfg, tiny_dataset, tmp_path / "warm", from_baseline=tmp_path / "sup")
    for name in ("model.safetensors", "best.safetensors"):
        full, warm = load_file(tmp_path / "full" / name), load_file(tmp_path / "warm" / name)
        assert sorted(full) == sorted(warm)
        assert all(torch.equal(full[k], warm[k]) for k in full), name
    handoff = cfg.reg_pretrain_steps + cfg.seg_pretrain_steps
    assert _records(tmp_path / "warm", handoff + 1) == _records(tmp_path / "full", handoff + 1)
    # the hand-off step's validation is run, not copied (it scores the registration too)
    at_handoff = [r for r in _records(tmp_path / "warm", handoff) if r["step"] == handoff]
    (validation,) = [r for r in at_handoff if r["phase"] == "validation"]
    assert "registration_dice" in validation and "from_baseline" not in validation


def test_from_baseline_refuses_a_baseline_of_other_settings(tiny_dataset, tmp_path):
    steps = {"deepatlas.max_steps": 8, "deepatlas.val_every": 2}
    cfg = tiny_config(**steps).deepatlas
    train_deepatlas(cfg, tiny_dataset, tmp_path / "sup", supervised_only=True)
    other = tiny_config(**steps, **{"deepatlas.seg_lr": 1e-3}).deepatlas
    with pytest.raises(InputError, match=r"pretraining_handoff.pt: .*seg_lr 0.003 vs 0.001"):
        train_deepatlas(other, tiny_dataset, tmp_path / "da", from_baseline=tmp_path / "sup")
    with pytest.raises(InputError, match="seed 0.*1"):
        train_deepatlas(cfg, tiny_dataset, tmp_path / "da", seed=1, from_baseline=tmp_path / "sup")
    assert not (tmp_path / "da" / "training_state.pt").exists()


def _copy_of_set(source: Path, target: Path, extra_unlabeled: bool) -> Path:
    """``source`` copied to ``target``, with one more unlabeled scan (a copy of its first
    image) when ``extra_unlabeled``."""
    shutil.copytree(source, target)
    if extra_unlabeled:
        manifest = json.loads((target / "manifest.json").read_text())
        first = manifest["cases"][0]
        shutil.copyfile(target / first["image"], target / "images" / "extra.nii.gz")
        extra = {**first, "case_id": "extra", "image": "images/extra.nii.gz", "label": None}
        manifest["cases"].append(extra)
        (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_from_baseline_takes_a_folder_with_more_unlabeled_scans_but_the_same_labeled_ones(
    tiny_dataset, tmp_path
):
    cfg = tiny_config(**{"deepatlas.max_steps": 8, "deepatlas.val_every": 2}).deepatlas
    train_deepatlas(cfg, tiny_dataset, tmp_path / "sup", supervised_only=True)
    more = _copy_of_set(tiny_dataset, tmp_path / "more", extra_unlabeled=True)
    summary = train_deepatlas(cfg, more, tmp_path / "da", from_baseline=tmp_path / "sup")
    assert summary["steps"] == 8
    # one label voxel changed in a copy: its pre-training would differ, so the hand-off is refused
    changed = _copy_of_set(tiny_dataset, tmp_path / "changed", extra_unlabeled=False)
    manifest = json.loads((changed / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c.get("label"))
    label_path = changed / case["label"]
    label = nib.load(label_path)
    voxels = np.asarray(label.dataobj).copy()
    voxels[0, 0, 0] = 255 if voxels[0, 0, 0] != 255 else 0
    nib.save(nib.Nifti1Image(voxels, label.affine, label.header), label_path)
    with pytest.raises(InputError, match=rf"case {case['case_id']}'s label differs"):
        train_deepatlas(cfg, changed, tmp_path / "da2", from_baseline=tmp_path / "sup")


def test_synthetic_pair_settings_are_compared_only_when_a_run_has_synthetic_pairs(tmp_path):
    from bladdergen.checkpoint import save_training_state
    from bladdergen.deepatlas.handoff import HANDOFF_NAME, handoff_identity, read_handoff
    from bladdergen.settings import to_mapping

    baseline = tiny_config().deepatlas  # the default pair weight, 0.04
    images_only = tiny_config(
        **{"deepatlas.synthetic_pairs": False, "deepatlas.synthetic_pair_weight": 0.1}
    ).deepatlas

    def handed_off(labeled):
        mine = handoff_identity(0, to_mapping(baseline), tmp_path, labeled, ["v"])
        save_training_state(tmp_path / HANDOFF_NAME, {"identity": mine})
        theirs = handoff_identity(0, to_mapping(images_only), tmp_path, labeled, ["v"])
        return read_handoff(tmp_path, theirs)

    assert handed_off(["a", "b"])["identity"]["labeled"] == ["a", "b"]
    with pytest.raises(InputError, match="synthetic_pair_weight 0.04 vs 0.1"):
        handed_off(["a", "b", "synthetic:sample_00000"])


def test_from_baseline_refuses_a_schedule_that_validates_off_the_baseline_s_updates(
    tiny_dataset, tmp_path
):
    # reg pre-training 2, validation every 4: DeepAtlas would validate at updates 2, 6, ...
    cfg = tiny_config(**{"deepatlas.max_steps": 8}).deepatlas
    with pytest.raises(
        InputError, match=r"reg_pretrain_steps \(2\) must be a multiple of val_every \(4\)"
    ):
        train_deepatlas(cfg, tiny_dataset, tmp_path / "da", from_baseline=tmp_path / "sup")
    assert not (tmp_path / "da").exists()


def test_a_run_from_the_baseline_killed_after_the_handoff_resumes_to_the_same_weights(
    tiny_dataset, tmp_path
):
    # hand-off at step 2 -> 4, checkpoints every 3 steps and at the hand-off: killed at step 7
    # (after the checkpoint at 6), resumed from 6
    cfg = tiny_config(**{"deepatlas.max_steps": 10, "deepatlas.val_every": 2}).deepatlas
    train_deepatlas(cfg, tiny_dataset, tmp_path / "sup", supervised_only=True)
    warm = {"from_baseline": tmp_path / "sup"}
    train_deepatlas(cfg, tiny_dataset, tmp_path / "straight", **warm)
    with pytest.raises(KeyboardInterrupt):
        train_deepatlas(cfg, tiny_dataset, tmp_path / "killed", reporter=_KillAt(7), **warm)
    train_deepatlas(cfg, tiny_dataset, tmp_path / "killed", resume=True, **warm)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert _records(tmp_path / "killed", 0) == _records(tmp_path / "straight", 0)


def test_from_baseline_refuses_a_supervised_only_run(tiny_dataset, tmp_path):
    cfg = tiny_config(**{"deepatlas.max_steps": 8, "deepatlas.val_every": 2}).deepatlas
    with pytest.raises(InputError, match="drop --supervised-only"):
        train_deepatlas(
            cfg, tiny_dataset, tmp_path / "b", supervised_only=True, from_baseline=tmp_path / "a"
        )
    assert not (tmp_path / "b").exists()


def test_the_synthetic_filter_judges_the_tumor_as_a_whole_not_per_piece():
    from bladdergen.deepatlas.train import passes_synthetic_filter, synthetic_filter_ranges

    spacing = (2.0, 2.0, 5.0)
    ranges = synthetic_filter_ranges([ring_classes()], spacing)
    two_tumors = ring_classes()
    two_tumors[7:9, 10:13, 1:3] = 2  # on the inner wall
    two_tumors[20:22, 0:2, 1] = 2  # a speck far from the bladder, as F_S's strays are
    assert passes_synthetic_filter(two_tumors, spacing, ranges)
    speck_only = ring_classes()
    speck_only[20:22, 0:2, 1] = 2
    assert not passes_synthetic_filter(speck_only, spacing, ranges)
