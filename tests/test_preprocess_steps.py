"""Per-image preprocessing: orientation, resampling, window, label mapping, and the way back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bladdergen.data.config import PreprocessConfig
from bladdergen.data.preprocess import (
    classes_to_label_values,
    label_values_to_classes,
    prepare_image,
    prepare_label,
    restore_label,
)
from bladdergen.data.volumes import Volume
from bladdergen.errors import InputError

# A scanner-style LPS-index affine: x and y index axes point left and posterior.
LPS_AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 120.0], [0.0, -0.7, 0.0, 90.0], [0.0, 0.0, 4.0, -300.0], [0, 0, 0, 1.0]]
)


def _corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates (mm) of the 8 outer voxel corners, sorted for comparison."""
    grid = np.array(
        [
            [i, j, k]
            for i in (-0.5, shape[0] - 0.5)
            for j in (-0.5, shape[1] - 0.5)
            for k in (-0.5, shape[2] - 0.5)
        ]
    )
    world = grid @ affine[:3, :3].T + affine[:3, 3]
    return np.array(sorted(map(tuple, np.round(world, 6))))


def _volume(shape: tuple[int, int, int], affine: np.ndarray = LPS_AFFINE) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.uniform(-300, 400, shape).astype(np.float32), affine, Path("img.nii.gz"))


def test_label_values_0_255_128_become_classes_0_1_2():
    values = np.array([0, 255, 128, 255, 0], dtype=np.float32)
    classes = label_values_to_classes(values, PreprocessConfig().label_map)
    assert classes.tolist() == [0, 1, 2, 1, 0]
    assert classes.dtype == np.uint8


def test_classes_0_1_2_go_back_to_0_255_128():
    assert classes_to_label_values(np.array([0, 1, 2])).tolist() == [0, 255, 128]


def test_a_configured_label_map_is_used_both_ways():
    label_map = {0: 0, 1: 1, 2: 2}
    assert label_values_to_classes(np.array([2, 1, 0]), label_map).tolist() == [2, 1, 0]
    assert classes_to_label_values(np.array([2, 1, 0]), label_map).tolist() == [2, 1, 0]


def test_unexpected_label_values_name_the_file_and_the_values():
    with pytest.raises(InputError, match=r"labels/x.nii.gz: found label values \{0, 1, 2\}"):
        label_values_to_classes(np.array([0, 1, 2]), {0: 0, 255: 1, 128: 2}, "labels/x.nii.gz")


def test_reorientation_to_ras_keeps_every_voxel_at_its_world_position():
    volume = _volume((6, 5, 24))
    prepared = prepare_image(volume, PreprocessConfig(target_size=None, window=(-300, 400)))
    assert prepared.record["original"]["orientation"] == "LPS"
    assert prepared.record["output"]["orientation"] == "RAS"
    # Voxel (1, 2, 3) of the input sits at the same world point as its reoriented copy.
    world = LPS_AFFINE @ np.array([1, 2, 3, 1.0])
    index = np.linalg.solve(prepared.affine, world)[:3]
    i, j, k = np.round(index).astype(int)
    np.testing.assert_allclose(index, [i, j, k], atol=1e-9)
    expected = (volume.array[1, 2, 3] + 300) / 700 * 2 - 1
    assert prepared.image[i, j, k] == pytest.approx(expected, abs=1e-5)


def test_inplane_resampling_keeps_the_world_corners_of_the_volume():
    volume = _volume((40, 36, 24))
    prepared = prepare_image(volume, PreprocessConfig(target_size=(20, 18)))
    assert prepared.image.shape == (20, 18, 24)
    np.testing.assert_allclose(
        _corners(prepared.affine, prepared.image.shape), _corners(LPS_AFFINE, (40, 36, 24))
    )
    assert prepared.record["resample_inplane"]["spacing_out"] == pytest.approx([1.6, 1.4])


def test_removing_slices_keeps_the_world_extent_of_the_slab():
    volume = _volume((8, 8, 30))
    prepared = prepare_image(volume, PreprocessConfig(target_size=None))
    np.testing.assert_allclose(
        _corners(prepared.affine, prepared.image.shape), _corners(LPS_AFFINE, (8, 8, 30))
    )
    assert prepared.record["output"]["spacing"][2] == pytest.approx(4.0 * 30 / 24)


def test_target_spacing_sets_the_inplane_voxel_count():
    prepared = prepare_image(
        _volume((40, 36, 24)), PreprocessConfig(target_size=None, target_spacing=(1.6, 1.4))
    )
    assert prepared.image.shape[:2] == (20, 18)


def test_window_maps_hu_linearly_onto_minus_one_to_one():
    array = np.zeros((2, 2, 24), np.float32)
    array[0, 0, :], array[1, 0, :], array[0, 1, :], array[1, 1, :] = -200, 300, 50, 1000
    prepared = prepare_image(
        Volume(array, np.eye(4), Path("w.nii")), PreprocessConfig(target_size=None)
    )
    assert prepared.image[:, :, 0].tolist() == [[-1.0, 0.0], [1.0, 1.0]]


def test_record_is_json_serialisable():
    prepared = prepare_image(_volume((10, 10, 20)), PreprocessConfig(target_size=(8, 8)))
    assert json.loads(json.dumps(prepared.record))["depth"]["padded_slices"] == [20, 21, 22, 23]


@pytest.mark.parametrize("n_slices", [20, 24, 25, 30])
def test_restore_label_returns_a_label_to_the_original_grid(n_slices):
    shape = (12, 10, n_slices)
    rng = np.random.default_rng(n_slices)
    values = rng.choice([0, 128, 255], size=shape).astype(np.float32)
    config = PreprocessConfig(target_size=None)
    prepared = prepare_image(_volume(shape), config)
    classes = prepare_label(
        Volume(values, LPS_AFFINE, Path("l")), prepared.record, config.label_map
    )
    restored = classes_to_label_values(restore_label(classes, prepared.record))
    assert restored.shape == shape
    removed = prepared.record["depth"]["removed_slices"]
    kept = [k for k in range(n_slices) if k not in removed]
    np.testing.assert_array_equal(restored[..., kept], values[..., kept])
    for k in removed:  # a removed slice comes back as its lower neighbour (nearest kept slice)
        np.testing.assert_array_equal(restored[..., k], values[..., k - 1])


def test_restore_label_undoes_inplane_resampling_by_nearest_neighbour():
    shape = (16, 16, 24)
    values = np.zeros(shape, np.float32)
    values[4:12, 4:12, :] = 255  # blocks aligned with the 2x coarser grid survive exactly
    config = PreprocessConfig(target_size=(8, 8))
    prepared = prepare_image(_volume(shape), config)
    classes = prepare_label(
        Volume(values, LPS_AFFINE, Path("l")), prepared.record, config.label_map
    )
    assert classes.shape == (8, 8, 24)
    restored = classes_to_label_values(restore_label(classes, prepared.record))
    np.testing.assert_array_equal(restored, values)


# ----------------------------------------------------------------------------------------------
# Central field-of-view crop (crop_mm)

RAS_1MM = np.diag([1.0, 1.0, 3.0, 1.0])


def test_crop_keeps_the_central_window_in_millimetres_and_its_world_position():
    volume = _volume((100, 80, 24), RAS_1MM)
    config = PreprocessConfig(target_size=None, crop_mm=(40.0, 30.0))
    prepared = prepare_image(volume, config)
    # 40 of 100 voxels starting at (100 - 40) // 2 = 30; 30 of 80 starting at 25.
    assert prepared.image.shape == (40, 30, 24)
    assert np.allclose(prepared.affine[:3, 3], [30.0, 25.0, 0.0])
    expected = prepare_image(
        Volume(volume.array[30:70, 25:55], RAS_1MM, volume.source),
        PreprocessConfig(target_size=None),
    ).image
    assert np.array_equal(prepared.image, expected)


def test_crop_wider_than_the_scan_keeps_the_whole_axis():
    config = PreprocessConfig(target_size=None, crop_mm=(500.0, 20.0))
    prepared = prepare_image(_volume((50, 60, 24), RAS_1MM), config)
    assert prepared.image.shape == (50, 20, 24)
    assert prepared.record["crop_inplane"]["start"] == [0, 20]


def test_restored_label_after_a_crop_is_background_outside_the_window():
    volume = _volume((100, 80, 24), RAS_1MM)
    config = PreprocessConfig(target_size=(20, 15), crop_mm=(40.0, 30.0))
    record = prepare_image(volume, config).record
    classes = np.ones((20, 15, 24), dtype=np.uint8)
    restored = restore_label(classes, record)
    assert restored.shape == (100, 80, 24)
    assert restored[30:70, 25:55].min() == 1
    assert restored.sum() == 40 * 30 * 24  # nothing outside the 40 x 30 window


def test_label_is_cropped_like_its_image():
    volume = _volume((100, 80, 24), RAS_1MM)
    label = np.zeros((100, 80, 24), dtype=np.float32)
    label[30, 25, 0] = 255  # the first voxel inside the window
    label[29, 25, 0] = 128  # just outside it
    config = PreprocessConfig(target_size=None, crop_mm=(40.0, 30.0))
    record = prepare_image(volume, config).record
    classes = prepare_label(Volume(label, RAS_1MM, Path("lab.nii.gz")), record, config.label_map)
    assert classes.shape == (40, 30, 24)
    assert classes[0, 0, 0] == 1 and classes.sum() == 1
