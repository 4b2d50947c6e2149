"""Augmentation of labeled pairs: labels move with their image, only possible anatomy, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from bladdergen.deepatlas.augment import (
    AugmentRanges,
    augment_labeled,
    dilate_in_plane,
    with_target_context,
)

WALL_VALUE, TUMOR_VALUE = 0.3, 0.7


def _pair(size=(32, 32, 6)):
    """A hollow box (wall 1) with a tumor block (2) in it; the image holds a value per class."""
    label = np.zeros(size, np.int64)
    label[8:24, 6:22, 1:5] = 1
    label[11:21, 9:19, 1:5] = 0
    label[11:14, 9:13, 1:5] = 2
    image = np.choose(label, [-0.5, WALL_VALUE, TUMOR_VALUE]).astype(np.float32)
    return torch.from_numpy(image)[None, None], torch.from_numpy(label)[None, None]


def test_without_spatial_or_intensity_change_a_sample_is_kept_or_flipped_left_right():
    image, label = _pair()
    images, labels = torch.cat([image] * 8), torch.cat([label] * 8)
    none = AugmentRanges(rotation_deg=0.0, scale=0.0, shift=0.0, intensity=0.0)
    moved, moved_labels = augment_labeled(images, labels, np.random.default_rng(0), none)
    flipped = 0
    for sample, sample_label in zip(moved, moved_labels, strict=True):
        if torch.equal(sample_label, label[0]):
            assert torch.allclose(sample, image[0], atol=1e-6)
        else:  # X (dim 1 of C, X, Y, Z) reversed; Y and Z never
            assert torch.equal(sample_label, label[0].flip(1))
            assert torch.allclose(sample, image[0].flip(1), atol=1e-6)
            flipped += 1
    assert 0 < flipped < 8  # 8 coin tosses with this seed give both outcomes


def test_labels_stay_classes_and_move_with_their_image():
    image, label = _pair()
    ranges = AugmentRanges(rotation_deg=15.0, scale=0.1, shift=0.05, intensity=0.0)
    moved, moved_label = augment_labeled(image, label, np.random.default_rng(3), ranges)
    assert moved_label.dtype == torch.int64 and set(moved_label.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(moved_label, label)  # the pair did move
    classes, values = moved_label[0, 0].numpy(), moved[0, 0].numpy()
    # away from class borders (where bilinear image and nearest label may differ by a voxel) the
    # image value says the class its moved label says
    for cls, value in ((1, WALL_VALUE), (2, TUMOR_VALUE)):
        core = ndimage.binary_erosion(classes == cls, structure=np.ones((3, 3, 1), bool))
        assert core.sum() > 0
        assert np.allclose(values[core], value, atol=1e-4)


def test_intensity_change_is_a_gain_and_offset_within_range():
    image, label = _pair()
    ranges = AugmentRanges(rotation_deg=0.0, scale=0.0, shift=0.0, intensity=0.1)
    moved, moved_label = augment_labeled(image, label, np.random.default_rng(5), ranges)
    if not torch.equal(moved_label, label):  # undo a left-right flip
        moved = moved.flip(2)
    # two class values determine gain a and offset b of x·(1 + a) + b
    gain = float(moved[label == 2].mean() - moved[label == 1].mean()) / (TUMOR_VALUE - WALL_VALUE)
    offset = float(moved[label == 1].mean()) - gain * WALL_VALUE
    assert abs(gain - 1.0) <= 0.1 + 1e-6 and abs(offset) <= 0.05 + 1e-6
    assert torch.allclose(moved, (image * gain + offset).clamp(-1, 1), atol=1e-5)


def test_the_same_generator_state_gives_the_same_augmentation():
    image, label = _pair()
    first = augment_labeled(image, label, np.random.default_rng(11))
    again = augment_labeled(image, label, np.random.default_rng(11))
    other = augment_labeled(image, label, np.random.default_rng(12))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("key,value", [("augment_scale", 1.0), ("augment_rotation_deg", -1.0)])
def test_out_of_range_augmentation_settings_are_refused(key, value):
    from bladdergen.deepatlas.config import DeepAtlasConfig
    from bladdergen.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        DeepAtlasConfig(**{key: value}).validate()


def test_dilation_grows_masks_in_plane_only():
    mask = torch.zeros(1, 9, 9, 5, dtype=torch.bool)
    mask[0, 4, 4, 2] = True
    grown = dilate_in_plane(mask, 2)
    expected = torch.zeros_like(mask)
    expected[0, 2:7, 2:7, 2] = True  # a 5x5 square in slice 2, nothing in the other slices
    assert torch.equal(grown, expected)


def test_target_context_replaces_the_image_away_from_both_bladders():
    warped = torch.ones(1, 1, 20, 20, 3)
    target = torch.zeros(1, 1, 20, 20, 3)
    warped_bladder = torch.zeros(1, 20, 20, 3, dtype=torch.bool)
    target_bladder = torch.zeros_like(warped_bladder)
    warped_bladder[0, 3:6, 3:6, 1] = True  # grown by 1: rows and columns 2..6 of slice 1
    target_bladder[0, 12:14, 12:14, 1] = True  # grown by 2: rows and columns 10..15 of slice 1
    out = with_target_context(warped, warped_bladder, target, target_bladder)
    expected = torch.zeros_like(out)
    expected[0, 0, 2:7, 2:7, 1] = 1.0
    expected[0, 0, 10:16, 10:16, 1] = 1.0
    assert torch.equal(out, expected)
