"""``bladdergen preprocess`` on whole folders: layouts, outputs, re-runs and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from bladdergen.cli import app
from bladdergen.data.config import PreprocessConfig
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.data.preprocess_run import preprocess_folder
from bladdergen.data.volumes import write_nifti
from bladdergen.errors import InputError

AFFINE = np.array(
    [[-2.0, 0.0, 0.0, 30.0], [0.0, -2.0, 0.0, 30.0], [0.0, 0.0, 4.0, -50.0], [0, 0, 0, 1.0]]
)
CONFIG = PreprocessConfig(target_size=(8, 8), target_depth=6)


def _case(n_slices: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 16x16xN HU image with a square 'bladder' and its 0/255/128 label."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 20, (16, 16, n_slices)).astype(np.float32)
    label = np.zeros((16, 16, n_slices), np.float32)
    label[4:12, 4:12] = 255
    label[6:10, 6:10] = 0
    label[4:6, 4:6] = 128
    image[label == 255] += 40
    return image, label


def _write_case(root: Path, case_id: str, labeled: bool = True, n_slices: int = 7) -> None:
    image, label = _case(n_slices, seed=len(case_id))
    write_nifti(root / "images" / f"{case_id}.nii.gz", image, AFFINE, np.int16)
    if labeled:
        write_nifti(root / "labels" / f"{case_id}.nii.gz", label, AFFINE, np.uint8)


@pytest.fixture()
def input_dir(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    _write_case(root, "a", n_slices=7)
    _write_case(root, "b", n_slices=5)
    _write_case(root, "c", labeled=False, n_slices=6)
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_images_and_labels_layout_gives_a_set_trainers_can_open(input_dir, tmp_path):
    result = preprocess_folder(input_dir, tmp_path / "out", CONFIG)
    assert (result["cases"], result["labeled"], result["unlabeled"]) == (3, 2, 1)
    data = PreprocessedSet.open(tmp_path / "out")
    assert [c.case_id for c in data.cases] == ["a", "b", "c"]
    assert [c.case_id for c in data.unlabeled_cases] == ["c"]
    image = data.load_image(data.case("a"))
    label = data.load_label(data.case("a"))
    assert image.shape == label.shape == (8, 8, 6)
    assert image.min() >= -1 and image.max() <= 1
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    assert data.window == (-200.0, 300.0)


def test_manifest_records_sources_hashes_geometry_and_slices(input_dir, tmp_path):
    preprocess_folder(input_dir, tmp_path / "out", CONFIG)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    case_a = manifest["cases"][0]
    assert case_a["original_shape"] == [16, 16, 7]
    assert case_a["original_spacing"] == pytest.approx([2.0, 2.0, 4.0])
    assert case_a["original_orientation"] == "LPS"
    assert case_a["slices_removed"] == [3]  # N=7, T=6: floor(7 * 1 / 2) = 3
    assert manifest["cases"][1]["slices_padded"] == [5]  # N=5 padded with a copy of slice 4
    assert len(case_a["sha256_image"]) == 64 and len(case_a["sha256_label"]) == 64
    assert sum(case_a["label_voxels"].values()) == 8 * 8 * 6
    assert manifest["label_map"] == {"0": 0, "128": 2, "255": 1}
    assert manifest["cases"][2]["label"] is None and manifest["rejected"] == []


def test_float16_images_store_16_bit_values_that_read_back_as_floats(input_dir, tmp_path):
    preprocess_folder(input_dir, tmp_path / "f32", CONFIG)
    half = PreprocessConfig(target_size=(8, 8), target_depth=6, image_dtype="float16")
    preprocess_folder(input_dir, tmp_path / "f16", half)
    stored = nib.load(str(tmp_path / "f16" / "images" / "a.nii.gz"))
    assert stored.get_data_dtype() == np.int16
    full, compact = PreprocessedSet.open(tmp_path / "f32"), PreprocessedSet.open(tmp_path / "f16")
    a32, a16 = full.load_image(full.case("a")), compact.load_image(compact.case("a"))
    assert a16.dtype == np.float32
    np.testing.assert_allclose(a16, a32, atol=1 / 32767)


def test_nnunet_layout_drops_the_channel_suffix_and_keeps_test_images_unlabeled(tmp_path):
    root = tmp_path / "nnunet"
    image, label = _case()
    write_nifti(root / "imagesTr" / "bl_001_0000.nii.gz", image, AFFINE, np.int16)
    write_nifti(root / "labelsTr" / "bl_001.nii.gz", label, AFFINE, np.uint8)
    write_nifti(root / "imagesTs" / "bl_101_0000.nii.gz", image, AFFINE, np.int16)
    preprocess_folder(root, tmp_path / "out", CONFIG)
    data = PreprocessedSet.open(tmp_path / "out")
    assert [(c.case_id, c.labeled) for c in data.cases] == [("bl_001", True), ("bl_101", False)]


def test_decathlon_style_names_without_channel_suffix_are_case_ids(tmp_path):
    root = tmp_path / "msd"
    image, label = _case()
    write_nifti(root / "imagesTr" / "bladder_0001.nii.gz", image, AFFINE, np.int16)
    write_nifti(root / "imagesTr" / "bladder_x.nii.gz", image, AFFINE, np.int16)
    write_nifti(root / "labelsTr" / "bladder_0001.nii.gz", label, AFFINE, np.uint8)
    preprocess_folder(root, tmp_path / "out", CONFIG)
    data = PreprocessedSet.open(tmp_path / "out")
    assert [(c.case_id, c.labeled) for c in data.cases] == [
        ("bladder_0001", True),
        ("bladder_x", False),
    ]


def test_a_second_nnunet_channel_rejects_the_case(tmp_path):
    root = tmp_path / "nnunet"
    image, _ = _case()
    for name in ("a_0000", "b_0000", "b_0001"):
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", image, AFFINE, np.int16)
    with pytest.raises(InputError, match=r"b_0001\.nii\.gz: channel 0001 found, expected a single"):
        preprocess_folder(root, tmp_path / "out", CONFIG)
    result = preprocess_folder(root, tmp_path / "out", CONFIG, skip_bad=True)
    assert result["cases"] == 1 and result["rejected"] == ["b"]


def test_dicom_series_folder_is_one_case(real_data, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(real_data / "ct_upper_abdomen_dicom", root / "images" / "abdomen")
    result = preprocess_folder(root, tmp_path / "out", PreprocessConfig(target_size=(32, 32)))
    assert result["cases"] == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["cases"][0]["original_shape"] == [512, 512, 20]
    assert manifest["cases"][0]["slices_padded"] == [20, 21, 22, 23]


def test_rerun_with_same_inputs_is_a_no_op(input_dir, tmp_path):
    preprocess_folder(input_dir, tmp_path / "out", CONFIG)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    result = preprocess_folder(input_dir, tmp_path / "out", CONFIG)
    assert result["skipped"] is True
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before


def test_changed_settings_need_overwrite(input_dir, tmp_path):
    preprocess_folder(input_dir, tmp_path / "out", CONFIG)
    other = PreprocessConfig(target_size=(8, 8), target_depth=5)
    with pytest.raises(InputError, match="already holds a preprocessed set.*--overwrite"):
        preprocess_folder(input_dir, tmp_path / "out", other)
    result = preprocess_folder(input_dir, tmp_path / "out", other, overwrite=True)
    assert result["skipped"] is False and result["target_shape"] == [8, 8, 5]


def test_two_workers_write_the_same_files_as_one(input_dir, tmp_path):
    preprocess_folder(input_dir, tmp_path / "one", CONFIG, workers=1)
    preprocess_folder(input_dir, tmp_path / "two", CONFIG, workers=2)
    one, two = _snapshot(tmp_path / "one"), _snapshot(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name in one:
        if name.endswith(".nii.gz"):
            assert one[name] == two[name], name


# ----------------------------------------------------------------------------------------------
# Bad input: one InputError naming the file, nothing written, inputs untouched.


def _corrupt_truncated(root: Path) -> None:
    path = root / "images" / "b.nii.gz"
    path.write_bytes(path.read_bytes()[:200])


def _corrupt_unreadable(root: Path) -> None:
    (root / "images" / "b.nii.gz").write_bytes(b"not a nifti at all")


def _corrupt_2d(root: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), AFFINE), root / "images" / "b.nii.gz")


def _corrupt_4d(root: Path) -> None:
    array = np.zeros((16, 16, 5, 2), np.int16)
    nib.save(nib.Nifti1Image(array, AFFINE), root / "images" / "b.nii.gz")


def _corrupt_nan(root: Path) -> None:
    image, _ = _case(5)
    image[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(image, AFFINE), root / "images" / "b.nii.gz")


def _corrupt_shape(root: Path) -> None:
    write_nifti(root / "labels" / "b.nii.gz", np.zeros((16, 16, 4)), AFFINE, np.uint8)


def _corrupt_geometry(root: Path) -> None:
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    write_nifti(root / "labels" / "b.nii.gz", np.zeros((16, 16, 5)), shifted, np.uint8)


def _corrupt_values(root: Path) -> None:
    label = np.zeros((16, 16, 5))
    label[0, 0, 0], label[1, 1, 1] = 1, 2
    write_nifti(root / "labels" / "b.nii.gz", label, AFFINE, np.uint8)


def _corrupt_duplicate(root: Path) -> None:
    shutil.copy(root / "images" / "b.nii.gz", root / "images" / "b.nii")


def _corrupt_orphan_label(root: Path) -> None:
    shutil.copy(root / "labels" / "b.nii.gz", root / "labels" / "z.nii.gz")


BAD_INPUTS = {
    "truncated": (_corrupt_truncated, r"b\.nii\.gz: (truncated|unreadable)"),
    "unreadable": (_corrupt_unreadable, r"b\.nii\.gz: unreadable"),
    "2d": (_corrupt_2d, r"b\.nii\.gz: .*\(2D\), expected a 3D volume"),
    "4d": (_corrupt_4d, r"b\.nii\.gz: .*\(4D\), expected a 3D volume"),
    "nan": (_corrupt_nan, r"b\.nii\.gz: 1 voxels are NaN or infinite"),
    "shape": (_corrupt_shape, r"b\.nii\.gz: label shape \(16, 16, 4\) differs from image"),
    "geometry": (
        _corrupt_geometry,
        r"b\.nii\.gz: label origin \(35, 30, -50\) mm, expected \(30, 30, -50\) mm",
    ),
    "values": (_corrupt_values, r"b\.nii\.gz: found label values \{0, 1, 2\}, expected a subset"),
    "duplicate": (_corrupt_duplicate, r"duplicate case id 'b'"),
    "orphan label": (_corrupt_orphan_label, r"z\.nii\.gz: label has no matching image"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_case_stops_the_run_with_nothing_written(kind, input_dir, tmp_path):
    corrupt, message = BAD_INPUTS[kind]
    corrupt(input_dir)
    inputs_before = _snapshot(input_dir)
    with pytest.raises(InputError, match=message):
        preprocess_folder(input_dir, tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no staging folder left behind
    assert _snapshot(input_dir) == inputs_before


@pytest.mark.parametrize("kind", ["truncated", "values", "duplicate"])
def test_skip_bad_processes_the_rest_and_lists_the_rejected(kind, input_dir, tmp_path):
    BAD_INPUTS[kind][0](input_dir)
    result = preprocess_folder(input_dir, tmp_path / "out", CONFIG, skip_bad=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert result["rejected"] == ["b"]
    assert [c["case_id"] for c in manifest["cases"]] == ["a", "c"]
    assert manifest["rejected"][0]["case_id"] == "b" and manifest["rejected"][0]["error"]
    assert not (tmp_path / "out" / "images" / "b.nii.gz").exists()


def test_rerun_without_skip_bad_still_reports_the_bad_case(input_dir, tmp_path):
    _corrupt_truncated(input_dir)
    preprocess_folder(input_dir, tmp_path / "out", CONFIG, skip_bad=True)
    with pytest.raises(InputError, match=r"b\.nii\.gz"):
        preprocess_folder(input_dir, tmp_path / "out", CONFIG)
    assert preprocess_folder(input_dir, tmp_path / "out", CONFIG, skip_bad=True)["skipped"]


def test_empty_input_folder_is_refused(tmp_path):
    (tmp_path / "in" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match="no images found"):
        preprocess_folder(tmp_path / "in", tmp_path / "out", CONFIG)


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match=r"no images/ folder and no volumes, expected images/"):
        preprocess_folder(tmp_path / "in", tmp_path / "out", CONFIG)


def test_output_inside_input_is_refused(input_dir):
    with pytest.raises(InputError, match="output folder is inside the input folder"):
        preprocess_folder(input_dir, input_dir / "out", CONFIG)
    assert not (input_dir / "out").exists()


def test_output_folder_holding_the_input_is_refused_even_with_overwrite(input_dir):
    with pytest.raises(InputError, match="output folder contains the input folder"):
        preprocess_folder(input_dir, input_dir.parent, CONFIG, overwrite=True)
    assert (input_dir / "images" / "a.nii.gz").is_file()


def test_non_empty_output_folder_needs_overwrite(input_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already holds files"):
        preprocess_folder(input_dir, tmp_path / "out", CONFIG)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_bad_input_exits_2_with_one_line(input_dir, tmp_path):
    _corrupt_values(input_dir)
    result = CliRunner().invoke(app, ["preprocess", str(input_dir), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "found label values" in lines[0]


def test_cli_phantom_then_preprocess_tiny_gives_64x64x24(tmp_path):
    runner = CliRunner()
    made = runner.invoke(
        app,
        ["phantom", str(tmp_path / "ph"), "-n", "3", "--size", "64", "--unlabeled", "1", "--json"],
    )
    assert made.exit_code == 0, made.output
    done = runner.invoke(
        app, ["preprocess", str(tmp_path / "ph"), str(tmp_path / "pp"), "-p", "tiny", "--json"]
    )
    assert done.exit_code == 0, done.output
    result = json.loads(done.output.strip().splitlines()[-1])
    assert result["target_shape"] == [64, 64, 24]
    assert (result["labeled"], result["unlabeled"]) == (2, 1)
    assert (tmp_path / "pp" / "config.yaml").is_file()
