"""Reading and writing volumes: NIfTI, SimpleITK formats, DICOM series, and bad files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from bladdergen.data.volumes import read_volume, write_nifti
from bladdergen.errors import InputError

AFFINE = np.array(
    [[-0.75, 0.0, 0.0, 100.0], [0.0, -0.75, 0.0, 80.0], [0.0, 0.0, 3.0, -250.0], [0, 0, 0, 1.0]]
)


def test_nifti_round_trip_keeps_values_affine_and_dtype(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) - 60
    path = write_nifti(tmp_path / "a.nii.gz", array, AFFINE, np.int16)
    assert nib.load(str(path)).get_data_dtype() == np.int16
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-5)
    assert volume.axcodes == "LPS"
    assert volume.spacing == pytest.approx((0.75, 0.75, 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]  # no temporary file left


def test_mha_lps_geometry_becomes_a_ras_affine(tmp_path):
    # SimpleITK (LPS world): identity direction, origin (10, 20, 30), spacing (0.5, 0.6, 2).
    image = sitk.GetImageFromArray(np.zeros((7, 6, 5), np.int16))  # numpy (Z, Y, X)
    image.SetOrigin((10.0, 20.0, 30.0))
    image.SetSpacing((0.5, 0.6, 2.0))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    volume = read_volume(tmp_path / "a.mha")
    assert volume.array.shape == (5, 6, 7)
    expected = np.array(
        [[-0.5, 0, 0, -10.0], [0, -0.6, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1.0]]
    )
    np.testing.assert_allclose(volume.affine, expected, atol=1e-6)


def test_dicom_series_folder_reads_as_one_volume(real_data):
    volume = read_volume(real_data / "ct_upper_abdomen_dicom")
    assert volume.array.shape == (512, 512, 20)
    assert volume.spacing == pytest.approx((0.977, 0.977, 2.0), abs=0.01)
    assert volume.array.dtype == np.float32
    # HU: air outside the body near -1000, soft tissue present.
    assert volume.array.min() <= -900
    assert np.median(volume.array[200:300, 200:300]) > -100


def test_real_nifti_world_corners_survive_the_tiny_preprocessing(real_data):
    from bladdergen.data.config import PreprocessConfig
    from bladdergen.data.preprocess import prepare_image

    volume = read_volume(real_data / "ct_abdomen_pelvis.nii.gz")
    assert volume.array.shape == (122, 101, 112)
    prepared = prepare_image(
        volume, PreprocessConfig(target_size=(64, 64), depth_policy="resample")
    )
    assert prepared.image.shape == (64, 64, 24)

    def extent(affine, shape):
        corners = np.array(
            [
                [i, j, k, 1]
                for i in (-0.5, shape[0] - 0.5)
                for j in (-0.5, shape[1] - 0.5)
                for k in (-0.5, shape[2] - 0.5)
            ]
        )
        world = corners @ affine.T
        return np.sort(world[:, :3], axis=0)

    np.testing.assert_allclose(
        extent(prepared.affine, prepared.image.shape),
        extent(volume.affine, volume.array.shape),
        atol=1e-3,
    )

    from bladdergen.data.preprocess import restore_label

    classes = np.zeros(prepared.image.shape, np.uint8)
    classes[30:34, 30:34, 10:14] = 1
    restored = restore_label(classes, prepared.record)
    assert restored.shape == (122, 101, 112)
    # the block covers 4/64 x 4/64 x 4/24 of the extent, so that share of the original voxels
    assert 0.7 < restored.sum() / (122 * 101 * 112 * (4 / 64) ** 2 * (4 / 24)) < 1.3


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_volume(tmp_path / "nope.nii.gz")


def test_truncated_nifti_is_an_input_error_naming_the_file(tmp_path):
    path = write_nifti(tmp_path / "t.nii.gz", np.ones((20, 20, 20), np.float32), AFFINE)
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(InputError, match=r"t\.nii\.gz: truncated"):
        read_volume(path)


def test_garbage_file_is_an_input_error(tmp_path):
    path = tmp_path / "g.nii.gz"
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=r"g\.nii\.gz: unreadable"):
        read_volume(path)


def test_2d_image_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(InputError, match=r"flat\.nii: .*2D.*expected a 3D volume"):
        read_volume(tmp_path / "flat.nii")


def test_4d_image_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(InputError, match=r"4D\), expected a 3D volume"):
        read_volume(tmp_path / "t.nii")


def test_nan_voxels_are_refused(tmp_path):
    array = np.zeros((4, 4, 4), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="2 voxels are NaN or infinite"):
        read_volume(tmp_path / "nan.nii.gz")
