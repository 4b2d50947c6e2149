"""Scripts and pipelines (issue 13): strict --json stdout, nnU-Net raw in and out, single-file
and z-range preprocessing, stale staging folders, the preprocessed set's recorded settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from bladdergen.cli import app
from bladdergen.cli.common import emit_result, handle_errors
from bladdergen.config import load_config
from bladdergen.data.config import PreprocessConfig
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.data.inputs import discover_cases, nnunet_label_map, output_names
from bladdergen.data.preprocess import prepare_image, restore_label
from bladdergen.data.preprocess_run import preprocess_folder
from bladdergen.data.volumes import Volume
from bladdergen.errors import InputError

TINY = load_config("tiny", overrides={"preprocess.target_depth": 4}).preprocess


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


# ----------------------------------------------------------------------------------------------
# --json: exactly one JSON document on stdout


def _printing_app() -> typer.Typer:
    demo = typer.Typer()

    @demo.command()
    @handle_errors
    def run() -> None:
        print("a third-party library talking")  # e.g. MONAI's FID
        emit_result({"loss": float("nan"), "nested": [float("inf"), 1.5]}, True, False, "done")

    return demo


def test_json_stdout_holds_only_the_result_even_when_a_library_prints():
    result = CliRunner().invoke(_printing_app(), [])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"loss": None, "nested": [None, 1.5]}
    assert "a third-party library talking" in result.stderr


# ----------------------------------------------------------------------------------------------
# nnU-Net raw in and out


def _nnunet_raw(root: Path, labels: dict) -> Path:
    """imagesTr/case_1_0000 with labelsTr/case_1 holding 0/1/2, and dataset.json ``labels``."""
    hu = np.full((12, 12, 4), -100.0, np.float32)
    label = np.zeros((12, 12, 4), np.uint8)
    label[4:8, 4:8, :] = 1
    label[5, 5, 1] = 2
    _save(root / "imagesTr" / "case_1_0000.nii.gz", hu)
    _save(root / "labelsTr" / "case_1.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    return root


def test_dataset_json_labels_map_nnunet_values_to_classes(tmp_path):
    root = _nnunet_raw(tmp_path / "raw", {"background": 0, "bladder_wall": 1, "tumour": 2})
    assert nnunet_label_map(root) == {0: 0, 1: 1, 2: 2}


def test_preprocess_honours_dataset_json_so_nnunet_labels_0_1_2_are_accepted(tmp_path):
    root = _nnunet_raw(tmp_path / "raw", {"background": 0, "wall": 1, "tumor": 2})
    preprocess_folder(root, tmp_path / "out", TINY)
    dataset = PreprocessedSet.open(tmp_path / "out")
    assert dataset.label_map == {0: 0, 1: 1, 2: 2}
    record = dataset.manifest["cases"][0]
    assert record["case_id"] == "case_1"
    assert record["label_voxels"]["tumor"] > 0


def test_dataset_json_with_an_unknown_label_name_is_refused_naming_it(tmp_path):
    root = _nnunet_raw(tmp_path / "raw", {"background": 0, "liver": 1, "tumor": 2})
    with pytest.raises(InputError, match=r"dataset\.json: label 'liver' = 1"):
        nnunet_label_map(root)


def test_output_names_drop_the_nnunet_channel_suffix(tmp_path):
    paths = [tmp_path / "case_1_0000.nii.gz", tmp_path / "case_2_0000.nii.gz"]
    assert list(output_names(paths).values()) == ["case_1", "case_2"]


def test_output_names_keep_numbered_names_that_are_not_all_channel_0000(tmp_path):
    paths = [tmp_path / "scan_0000.nii.gz", tmp_path / "scan_0001.nii.gz"]
    assert list(output_names(paths).values()) == ["scan_0000", "scan_0001"]


# ----------------------------------------------------------------------------------------------
# preprocess: a single file, a folder of files; z-range


def test_a_single_nifti_file_is_one_unlabeled_case(tmp_path):
    path = _save(tmp_path / "patient_7.nii.gz", np.zeros((8, 8, 4), np.float32))
    cases, problems = discover_cases(path)
    assert [(c.case_id, c.label) for c in cases] == [("patient_7", None)] and not problems


def test_a_folder_of_volume_files_gives_one_case_per_file(tmp_path):
    for name in ("b", "a"):
        _save(tmp_path / "in" / f"{name}.nii.gz", np.zeros((8, 8, 4), np.float32))
    cases, _ = discover_cases(tmp_path / "in")
    assert [c.case_id for c in cases] == ["a", "b"]


def test_preprocess_of_one_file_writes_a_set_of_one_case(tmp_path):
    path = _save(tmp_path / "in" / "ct.nii.gz", np.zeros((8, 8, 4), np.float32))
    result = preprocess_folder(path, tmp_path / "out", TINY)
    assert result["cases"] == 1 and result["unlabeled"] == 1
    assert path.parent.exists() and sorted(p.name for p in path.parent.iterdir()) == ["ct.nii.gz"]


def _stack(depth: int, z0: float = -50.0, dz: float = 5.0) -> Volume:
    """Slice k holds the value k everywhere; slice centres at z0 + k * dz mm."""
    array = np.broadcast_to(np.arange(depth, dtype=np.float32), (6, 6, depth)).copy()
    affine = np.diag([1.0, 1.0, dz, 1.0])
    affine[2, 3] = z0
    return Volume(array=array, affine=affine, source=Path("scan.nii.gz"))


def _config(**kwargs) -> PreprocessConfig:
    base = {"target_size": None, "window": (-1.0, 20.0), "depth_policy": "crop"}
    return PreprocessConfig(**{**base, **kwargs})


def test_z_range_in_mm_keeps_the_slices_whose_centres_lie_inside(tmp_path):
    # centres at -50, -45, ..., 5 mm; [-40, -25] holds slices 2, 3, 4, 5
    config = _config(z_range=(-40.0, -25.0), target_depth=4)
    prepared = prepare_image(_stack(12), config)
    unit_values = prepared.image[0, 0, :]
    hu_values = (unit_values + 1) / 2 * 21 - 1
    assert np.allclose(hu_values, [2, 3, 4, 5], atol=1e-4)
    assert prepared.affine[2, 3] == pytest.approx(-40.0)


def test_z_range_in_slices_is_inclusive_and_restored_with_background_outside():
    config = _config(z_range=(3, 6), z_range_unit="slices", target_depth=4)
    prepared = prepare_image(_stack(10), config)
    classes = np.ones(prepared.image.shape, np.uint8)
    restored = restore_label(classes, prepared.record)
    assert restored.shape == (6, 6, 10)
    assert restored[0, 0, :].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]


def test_z_range_that_misses_the_scan_is_refused_naming_the_file():
    config = _config(z_range=(100.0, 200.0), target_depth=4)
    with pytest.raises(InputError, match=r"scan\.nii\.gz: z_range \[100\.0, 200\.0\] mm keeps no"):
        prepare_image(_stack(10), config)


def test_preprocess_cli_takes_a_z_range_in_slices(tmp_path):
    path = _save(tmp_path / "in" / "long.nii.gz", np.zeros((8, 8, 30), np.float32))
    args = ["preprocess", path, tmp_path / "out", "-p", "tiny", "--z-range", "10:13"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--z-unit", "slices", "--json"]])
    assert result.exit_code == 0, result.output
    record = PreprocessedSet.open(tmp_path / "out").manifest["cases"][0]
    assert record["steps"]["crop_depth"] == {
        "applied": True,
        "start": 10,
        "depth_in": 30,
        "depth_out": 4,
    }


# ----------------------------------------------------------------------------------------------
# Stale staging folders; the recorded preprocess settings


def test_a_successful_preprocess_removes_staging_folders_of_killed_runs(tmp_path):
    path = _save(tmp_path / "in" / "ct.nii.gz", np.zeros((8, 8, 4), np.float32))
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".out.staging-{dead_pid}"
    (stale / "images").mkdir(parents=True)
    preprocess_folder(path, tmp_path / "out", TINY)
    assert not stale.exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_a_staging_folder_of_a_running_process_is_left_alone(tmp_path):
    from bladdergen.data.preprocess_run import remove_stale_staging

    live = tmp_path / f".out.staging-{os.getppid()}"
    live.mkdir()
    assert remove_stale_staging(tmp_path / "out") == []
    assert live.exists()


def test_preprocess_config_returns_the_settings_recorded_in_the_manifest(tmp_path):
    path = _save(tmp_path / "in" / "ct.nii.gz", np.zeros((8, 8, 4), np.float32))
    config = _config(target_depth=3, window=(-150.0, 250.0), label_map={0: 0, 2: 1, 9: 2})
    preprocess_folder(path, tmp_path / "out", config)
    recorded = PreprocessedSet.open(tmp_path / "out").preprocess_config()
    assert recorded.target_depth == 3
    assert recorded.window == (-150.0, 250.0)
    assert recorded.label_map == {0: 0, 2: 1, 9: 2}


def test_preprocess_config_of_a_set_without_settings_is_an_input_error(tmp_path):
    from synthetic import make_preprocessed_set

    data = make_preprocessed_set(tmp_path / "data", n_cases=2, n_labeled=1, shape=(8, 8, 4))
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["settings"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"manifest\.json: settings: is missing"):
        PreprocessedSet.open(data).preprocess_config()


def test_preprocess_takes_a_bare_dicom_series_folder(real_data, tmp_path):
    """The real DICOM series (TotalSegmentator test files) as IN_DIR: one case, its slices read."""
    series = real_data / "ct_upper_abdomen_dicom"
    before = sorted(p.name for p in series.iterdir())
    result = CliRunner().invoke(
        app, ["preprocess", str(series), str(tmp_path / "out"), "--profile", "tiny", "--json"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["cases"]) == 1
    assert manifest["cases"][0]["steps"]["output"]["shape"][2] == 24  # tiny depth policy
    assert sorted(p.name for p in series.iterdir()) == before  # the input is untouched
