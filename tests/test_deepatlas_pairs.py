"""The DeepAtlas schedule and pair sampling by label availability."""

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

from bladdergen.deepatlas.config import DeepAtlasConfig
from bladdergen.deepatlas.losses import IGNORED
from bladdergen.deepatlas.pairs import (
    labeled_batch,
    phase_of,
    registration_pairs,
    segmentation_pairs,
    segmentation_updates,
    step_rng,
    tumor_or,
)
from bladdergen.deepatlas.pools import PoolImage
from bladdergen.deepatlas.train import _Images, _supervised_draw


def test_segmentation_pairs_never_join_two_unlabeled_images():
    n_labeled, n_unlabeled = 2, 9
    seen = set()
    for step in range(300):
        for moving, target in segmentation_pairs(step_rng(0, step), n_labeled, n_unlabeled, 2):
            assert moving != target
            assert moving < n_labeled or target < n_labeled
            seen.add((moving < n_labeled, target < n_labeled))
    # all three allowed kinds occur: labeled-labeled, labeled-unlabeled, unlabeled-labeled
    assert seen == {(True, True), (True, False), (False, True)}


def _first_labeled(pair, n_labeled):
    moving, target = pair
    return moving if moving < n_labeled else target


def test_pair_tumor_sampling_draws_tumor_cases_at_the_supervised_rate():
    # 4 labeled cases, case 2 the only tumor case: the pair's first labeled image is case 2 with
    # probability 0.5 (the tumor draw) + 0.5 * 1/4 (the uniform draw) = 0.625
    pairs = [
        p
        for s in range(4000)
        for p in segmentation_pairs(step_rng(2, s), 4, 6, 1, tumor_cases=[2], tumor_fraction=0.5)
    ]
    share = sum(_first_labeled(p, 4) == 2 for p in pairs) / len(pairs)
    assert abs(share - 0.625) < 0.025  # binomial sd over 4000 draws: 0.0077
    assert all(m != t and (m < 4 or t < 4) for m, t in pairs)


def test_pair_tumor_sampling_off_leaves_the_uniform_pairs_unchanged():
    for step in range(50):
        uniform = segmentation_pairs(step_rng(4, step), 3, 5, 2)
        assert segmentation_pairs(step_rng(4, step), 3, 5, 2, tumor_cases=[1]) == uniform
        assert segmentation_pairs(step_rng(4, step), 3, 5, 2, None, 0.5) == uniform


def test_registration_pairs_cover_all_ordered_pairs_but_never_an_image_with_itself():
    pairs = [p for s in range(200) for p in registration_pairs(step_rng(3, s), 3, 2)]
    assert all(m != t for m, t in pairs)
    assert set(pairs) == {(m, t) for m in range(3) for t in range(3) if m != t}


def test_labeled_batches_use_labeled_images_only():
    assert all(i < 4 for s in range(50) for i in labeled_batch(step_rng(1, s), 4, 3))


def test_step_randomness_depends_only_on_seed_step_and_rank():
    assert segmentation_pairs(step_rng(5, 17), 3, 4, 4) == segmentation_pairs(
        step_rng(5, 17), 3, 4, 4
    )
    assert registration_pairs(step_rng(5, 17, 0), 9, 4) != registration_pairs(
        step_rng(5, 17, 1), 9, 4
    )


def test_schedule_pretrains_registration_then_segmentation_then_alternates():
    config = DeepAtlasConfig(
        reg_pretrain_steps=2, seg_pretrain_steps=1, reg_steps_per_cycle=3, seg_steps_per_cycle=2
    )
    phases = [phase_of(step, config) for step in range(11)]
    assert (
        phases
        == ["reg_pretrain"] * 2 + ["seg_pretrain"] + (["reg"] * 3 + ["seg"] * 2) * 1 + ["reg"] * 3
    )


def test_baseline_budget_counts_the_segmentation_updates_of_the_schedule():
    config = DeepAtlasConfig(
        reg_pretrain_steps=2, seg_pretrain_steps=1, reg_steps_per_cycle=3, seg_steps_per_cycle=2
    )
    # by hand: steps 0-1 reg, 2 seg, 3-5 reg, 6-7 seg, 8-10 reg, 11-12 seg, 13 reg
    assert [segmentation_updates(config, n) for n in (0, 2, 3, 6, 7, 8, 11, 12, 13, 14)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        3,
        4,
        5,
        5,
    ]


def test_weighted_tumor_draw_picks_tumor_cases_in_proportion_to_their_weights():
    # tumor cases 0 (weight 1) and 5 (weight 0.25): a tumor draw is case 0 with probability
    # 1 / 1.25 = 0.8; with fraction 1 every draw is a tumor draw
    weights = np.array([1.0, 0.25])
    picks = [tumor_or(step_rng(5, s), 9, [0, 5], 1.0, weights) for s in range(4000)]
    assert set(picks) == {0, 5}
    assert abs(picks.count(0) / len(picks) - 0.8) < 0.02  # binomial sd over 4000 draws: 0.0063


def test_supervised_draws_weigh_synthetic_tumor_pairs_as_they_weigh_synthetic_pairs(tmp_path):
    # 2 real cases (case 0 with a tumor) and 4 synthetic pairs, all with a tumor, weight 0.25.
    # Any-case draw: synthetic with probability 4 * 0.25 / (2 + 1) = 1/3. Tumor draw (tumor cases
    # 0 and the 4 pairs, weights 1 and 4 * 0.25): synthetic with probability 1/2. With
    # tumor_case_fraction 0.5 a draw is synthetic with probability 0.5/3 + 0.5/2 = 5/12 (0.417);
    # a uniform tumor draw would give 0.5/3 + 0.5 * 4/5 = 0.567.
    def pool_image(name, source, tumor):
        label = np.zeros((2, 2, 2), np.uint8)
        label[0, 0, 0] = 2 if tumor else 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / f"{name}.nii.gz")
        return PoolImage(name, source, tmp_path / "unused.nii.gz", tmp_path / f"{name}.nii.gz")

    real = [pool_image("real0", "labeled", True), pool_image("real1", "labeled", False)]
    pairs = [pool_image(f"pair{i}", "synthetic", True) for i in range(4)]
    images = _Images(real + pairs, [], capacity=8)
    images.synthetic_weight = 0.25
    cfg = replace(DeepAtlasConfig(), batch_size=1, tumor_case_fraction=0.5)
    draws = [i for s in range(6000) for i in _supervised_draw(step_rng(6, s), images, cfg)]
    assert abs(sum(i >= 2 for i in draws) / len(draws) - 5 / 12) < 0.02  # sd 0.0064


def _pool_image(tmp_path, name, source, label):
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / f"{name}.nii.gz")
    return PoolImage(name, source, tmp_path / "unused.nii.gz", tmp_path / f"{name}.nii.gz")


def test_ignoring_synthetic_tumors_marks_only_the_pairs_tumor_voxels(tmp_path):
    label = np.array([0, 1, 2, 2], np.uint8).reshape(1, 1, 4)
    images = _Images(
        [
            _pool_image(tmp_path, "real", "labeled", label),
            _pool_image(tmp_path, "pair", "synthetic", label),
        ],
        [],
        capacity=4,
    )
    images.ignore_synthetic_tumor = True
    classes = images.loss_labels([0, 1], torch.device("cpu"))
    assert classes[0].flatten().tolist() == [0, 1, 2, 2]
    assert classes[1].flatten().tolist() == [0, 1, IGNORED, IGNORED]
    assert images.labels([1], torch.device("cpu")).flatten().tolist() == [0, 1, 2, 2]
    # a pair's ignored tumor is no tumor case for the tumor-aware draws
    assert images.tumor_cases() == [0]
    images.ignore_synthetic_tumor = False
    assert images.loss_labels([1], torch.device("cpu")).flatten().tolist() == [0, 1, 2, 2]
    assert images.tumor_cases() == [0, 1]


def test_keeping_some_unlabeled_images_keeps_the_synthetic_pair_settings(tmp_path):
    label = np.array([0, 2], np.uint8).reshape(1, 1, 2)
    images = _Images(
        [_pool_image(tmp_path, "pair", "synthetic", label)],
        [_pool_image(tmp_path, f"u{i}", "unlabeled", label) for i in range(2)],
        capacity=4,
    )
    images.synthetic_weight, images.ignore_synthetic_tumor = 0.25, True
    subset = images.with_unlabeled(["u1"])
    assert [p.case_id for p in subset.items] == ["pair", "u1"]
    assert (subset.synthetic_weight, subset.ignore_synthetic_tumor) == (0.25, True)


def test_an_unknown_synthetic_pair_tumor_rule_is_refused_with_the_choices():
    from bladdergen.errors import ConfigError

    with pytest.raises(ConfigError, match="got 'drop', expected one of label, ignore"):
        DeepAtlasConfig(synthetic_pair_tumor="drop").validate()


def test_an_unknown_reg_augment_tumor_rule_is_refused_with_the_choices():
    from bladdergen.errors import ConfigError

    with pytest.raises(ConfigError, match="reg_augment_tumor: got 'drop', expected one of label"):
        DeepAtlasConfig(reg_augment_tumor="drop").validate()


def test_without_tumor_marks_tumor_voxels_ignored_and_keeps_the_other_classes():
    from bladdergen.deepatlas.losses import without_tumor

    classes = torch.tensor([0, 1, 2, 2, 1, IGNORED]).view(1, 1, 6, 1, 1)
    expected = torch.tensor([0, 1, IGNORED, IGNORED, 1, IGNORED]).view(1, 1, 6, 1, 1)
    assert torch.equal(without_tumor(classes), expected)


def test_an_unknown_supervised_draw_is_refused_with_the_choices():
    from bladdergen.errors import ConfigError

    with pytest.raises(ConfigError, match="seg_supervised_draw: got 'all', expected one of pairs"):
        DeepAtlasConfig(seg_supervised_draw="all").validate()
