"""bladdergen segment: geometry of the output, sliding windows, features, errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bladdergen.checkpoint import save_weights
from bladdergen.cli import app
from bladdergen.config import load_config
from bladdergen.deepatlas.segment import (
    largest_bladder_component,
    load_segmentation_model,
    predict_classes,
    segment_paths,
    segmentation_features,
)
from bladdergen.deepatlas.train import train_deepatlas
from bladdergen.errors import CheckpointError

TINY_NETS = {
    "preprocess.target_size": [32, 32],
    "preprocess.target_depth": 8,
    "deepatlas.seg_filters": [4, 8, 8],
    "deepatlas.reg_filters": [4, 8, 8],
    "deepatlas.reg_pretrain_steps": 1,
    "deepatlas.seg_pretrain_steps": 2,
    "deepatlas.max_steps": 3,
    "deepatlas.val_cases": 1,  # 4 labeled cases in the tiny set
    "deepatlas.device": "cpu",
}


@pytest.fixture(scope="module")
def model_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("segment_model")
    train_deepatlas(load_config("tiny", overrides=TINY_NETS).deepatlas, tiny_dataset, run_dir)
    return run_dir


def _scan(path, shape=(40, 36, 11), affine=None, seed=0):
    """A raw HU scan stored like a scanner export (index axes pointing left, posterior)."""
    rng = np.random.default_rng(seed)
    hu = rng.uniform(-200, 300, shape).astype(np.float32)
    affine = np.diag([-0.8, -0.7, 3.5, 1.0]) if affine is None else affine
    affine[:3, 3] = [10.0, -20.0, 5.0]
    nib.save(nib.Nifti1Image(hu, affine), path)
    return affine


def test_segment_output_has_the_input_geometry_and_slice_count(model_run, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    affine = _scan(scans / "ct_a.nii.gz")
    _scan(scans / "ct_b.nii.gz", shape=(30, 30, 27), seed=1)
    result = segment_paths(model_run, scans, tmp_path / "out", device="cpu")
    assert result["segmented"] == 2
    out = nib.load(tmp_path / "out" / "ct_a.nii.gz")
    assert out.shape == (40, 36, 11)
    np.testing.assert_allclose(out.affine, affine)
    assert set(np.unique(np.asanyarray(out.dataobj))) <= {0, 128, 255}
    assert nib.load(tmp_path / "out" / "ct_b.nii.gz").shape == (30, 30, 27)
    summary = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert [c["output"].endswith(".nii.gz") for c in summary["cases"]] == [True, True]


def test_predict_classes_slides_a_window_over_a_volume_larger_than_training(model_run):
    net, metadata = load_segmentation_model(model_run)
    assert tuple(metadata["train_shape"]) == net.roi_size == (32, 32, 8)
    image = torch.rand(1, 1, 48, 40, 12) * 2 - 1
    classes = predict_classes(net, image)
    assert classes.shape == (48, 40, 12)
    assert int(classes.min()) >= 0 and int(classes.max()) <= 2


def test_segmentation_features_are_pooled_bottleneck_channels(model_run):
    net, _ = load_segmentation_model(model_run)
    features = segmentation_features(net, torch.zeros(2, 1, 32, 32, 8))
    assert features.shape == (2, 8)  # deepest filter count of seg_filters [4, 8, 8]


def test_a_checkpoint_of_another_stage_is_refused(tmp_path):
    save_weights(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {"kind": "vqgan"})
    with pytest.raises(CheckpointError, match="expected 'deepatlas'"):
        load_segmentation_model(tmp_path / "other.safetensors")


def test_segment_cli_reports_a_bad_input_in_one_line_with_exit_code_2(model_run, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a scan")
    result = CliRunner().invoke(app, ["segment", str(model_run), str(bad), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "notes.txt" in result.output and "Traceback" not in result.output


def test_segment_cli_writes_class_indices_when_asked(model_run, tmp_path):
    _scan(tmp_path / "ct.nii.gz")
    out_dir = tmp_path / "out"
    args = ["segment", str(model_run), str(tmp_path / "ct.nii.gz"), str(out_dir), "--classes"]
    result = CliRunner().invoke(app, [*args, "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert set(np.unique(np.asanyarray(nib.load(out_dir / "ct.nii.gz").dataobj))) <= {0, 1, 2}


def test_a_second_segment_into_the_folder_keeps_the_first_entries(model_run, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    _scan(first / "ct_a.nii.gz")
    _scan(second / "ct_b.nii.gz", seed=1)
    segment_paths(model_run, first, tmp_path / "out", device="cpu")
    segment_paths(model_run, second, tmp_path / "out", device="cpu")
    summary = json.loads((tmp_path / "out" / "segment.json").read_text())
    names = [Path(c["output"]).name for c in summary["cases"]]
    assert names == ["ct_a.nii.gz", "ct_b.nii.gz"]


def test_nnunet_channel_suffixes_are_dropped_from_output_names(model_run, tmp_path):
    images = tmp_path / "imagesTs"
    images.mkdir()
    _scan(images / "case_3_0000.nii.gz")
    segment_paths(model_run, images, tmp_path / "out", device="cpu")
    assert (tmp_path / "out" / "case_3.nii.gz").is_file()


def test_a_bad_input_in_the_middle_of_a_folder_leaves_the_output_folder_empty(model_run, tmp_path):
    from bladdergen.errors import InputError

    scans = tmp_path / "scans"
    scans.mkdir()
    _scan(scans / "a.nii.gz")
    (scans / "b.nii.gz").write_bytes(b"not a nifti")
    _scan(scans / "c.nii.gz", seed=2)
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"b\.nii\.gz"):
        segment_paths(model_run, scans, tmp_path / "out", device="cpu")
    assert list((tmp_path / "out").iterdir()) == []


def test_segment_into_the_input_folder_never_replaces_an_input(model_run, tmp_path):
    from bladdergen.errors import InputError

    scans = tmp_path / "scans"
    scans.mkdir()
    _scan(scans / "a.nii.gz")
    before = (scans / "a.nii.gz").read_bytes()
    with pytest.raises(InputError, match="would replace its input"):
        segment_paths(model_run, scans, scans, device="cpu", overwrite=True)
    assert (scans / "a.nii.gz").read_bytes() == before


def test_segment_with_a_z_range_writes_background_outside_the_slab(model_run, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    _scan(scans / "long.nii.gz", shape=(40, 36, 30))
    segment_paths(
        model_run,
        scans,
        tmp_path / "out",
        device="cpu",
        label_values=False,
        z_range=(10, 17),
        z_range_unit="slices",
    )
    classes = np.asarray(nib.load(tmp_path / "out" / "long.nii.gz").dataobj)
    segment_paths(model_run, scans, tmp_path / "whole", device="cpu", label_values=False)
    whole = np.asarray(nib.load(tmp_path / "whole" / "long.nii.gz").dataobj)
    assert classes.shape == whole.shape == (40, 36, 30)
    assert whole[:, :, :10].any()  # without the range the net does paint outside the slab
    # the scan's z axis already points superior (RAS), so slice indices are the file's own
    assert not classes[:, :, :10].any() and not classes[:, :, 18:].any()


def test_segment_cli_refuses_a_bad_z_unit_in_one_line(model_run, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    _scan(scans / "a.nii.gz")
    args = [str(model_run), str(scans), str(tmp_path / "out"), "--z-range=1:3", "--z-unit", "cm"]
    result = CliRunner().invoke(app, ["segment", *args])
    assert result.exit_code == 2
    assert "preprocess.z_range_unit: got 'cm'" in result.output
    assert not (tmp_path / "out").exists()


def test_largest_bladder_component_keeps_the_biggest_island_with_its_tumor():
    classes = np.zeros((12, 12, 6), np.uint8)
    classes[1:6, 1:6, 1:4] = 1  # the bladder wall: 75 voxels
    classes[6, 6, 4] = 2  # a tumor voxel touching the wall only diagonally (26-connected)
    classes[9:11, 9:11, 1] = 1  # a 4-voxel island of "wall"
    classes[0, 11, 5] = 2  # a lone "tumor" voxel
    kept = largest_bladder_component(classes)
    expected = classes.copy()
    expected[9:11, 9:11, 1] = 0
    expected[0, 11, 5] = 0
    assert np.array_equal(kept, expected)
    assert kept.dtype == classes.dtype
    assert np.array_equal(largest_bladder_component(np.zeros_like(classes)), 0 * classes)


def test_segment_keeps_one_bladder_component_unless_all_components(model_run, tmp_path):
    from scipy import ndimage

    _scan(tmp_path / "ct.nii.gz", seed=3)
    written = {}
    for name, extra in (("default", []), ("all", ["--all-components"])):
        args = ["segment", str(model_run), str(tmp_path / "ct.nii.gz"), str(tmp_path / name)]
        result = CliRunner().invoke(app, [*args, "--classes", "-q", "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        written[name] = np.asarray(nib.load(tmp_path / name / "ct.nii.gz").dataobj)
    islands = {k: ndimage.label(v > 0, np.ones((3, 3, 3)))[1] for k, v in written.items()}
    assert islands["all"] > 1  # the barely trained net speckles noise: something to remove
    assert islands["default"] == 1
    kept = written["default"] > 0
    assert np.array_equal(written["default"][kept], written["all"][kept])
    summary = json.loads((tmp_path / "default" / "segment.json").read_text())
    assert summary["largest_component_only"] is True
