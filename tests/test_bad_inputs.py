"""Bad input on the command line: exit 2, one line naming the file, no traceback, inputs
unchanged, nothing written (issue 13). Every fixture is made here, tiny."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from bladdergen.cli import app
from synthetic import make_preprocessed_set

runner = CliRunner()


def _tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` (or of ``root`` itself)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {
        str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def _invoke(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output


def _assert_refused(result, output: str, *names: str) -> None:
    """Exit 2, one error line naming each of ``names``, no traceback."""
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, output
    joined = " ".join(output.split())  # Rich may wrap a long line; names survive unwrapped
    for name in names:
        assert name in joined, output


def _checkpoint(path: Path, metadata_text: str) -> Path:
    """A safetensors file whose bladdergen metadata is ``metadata_text`` (any string)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(1)}, str(path), metadata={"bladdergen": metadata_text})
    return path


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """A fresh 3-case preprocessed set (16x16x4) the test may damage."""
    return make_preprocessed_set(tmp_path / "data", n_cases=3, n_labeled=2, shape=(16, 16, 4))


@pytest.fixture()
def scan(tmp_path: Path) -> Path:
    """One small HU scan in its own folder."""
    folder = tmp_path / "scans"
    folder.mkdir()
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), path)
    return path


# ----------------------------------------------------------------------------------------------
# Checkpoint metadata that is not valid JSON or lacks a field


def test_segment_with_checkpoint_metadata_that_is_not_json_exits_2_naming_the_file(tmp_path, scan):
    model = _checkpoint(tmp_path / "model.safetensors", "{not json")
    before = _tree_hash(model) | _tree_hash(scan.parent)
    result, output = _invoke(["segment", model, scan, tmp_path / "out"])
    _assert_refused(result, output, "model.safetensors", "not valid JSON")
    assert _tree_hash(model) | _tree_hash(scan.parent) == before
    assert not (tmp_path / "out").exists()


def test_reconstruct_with_vqgan_metadata_that_is_a_list_exits_2(tmp_path, data):
    model = _checkpoint(tmp_path / "vq.safetensors", "[1, 2]")
    result, output = _invoke(["reconstruct", model, data])
    _assert_refused(result, output, "vq.safetensors", "expected an object")


def test_segment_with_deepatlas_metadata_without_config_exits_2_naming_the_field(tmp_path, scan):
    model = _checkpoint(tmp_path / "seg.safetensors", json.dumps({"kind": "deepatlas"}))
    result, output = _invoke(["segment", model, scan, tmp_path / "out"])
    _assert_refused(result, output, "seg.safetensors", "'config.deepatlas'")
    assert not (tmp_path / "out").exists()


def test_evaluate_gen_with_seg_model_metadata_without_config_exits_2(tmp_path, scan):
    model = _checkpoint(tmp_path / "seg.safetensors", json.dumps({"kind": "deepatlas"}))
    args = ["evaluate", "gen", "--synthetic", scan.parent, "--real", scan.parent]
    result, output = _invoke([*args, "--out", tmp_path / "ev", "--seg-model", model])
    _assert_refused(result, output, "seg.safetensors", "'config.deepatlas'")
    assert not (tmp_path / "ev").exists()


def test_sample_with_ldm_metadata_without_scaler_exits_2_and_writes_nothing(tmp_path):
    metadata = {"kind": "ldm", "config": {"ldm": {}}, "latent_shape": [4, 2, 2, 2]}
    model = _checkpoint(tmp_path / "ldm.safetensors", json.dumps(metadata))
    result, output = _invoke(["sample", "-n", "1", "--ldm", model, "--out", tmp_path / "out"])
    _assert_refused(result, output, "ldm.safetensors", "'scaler'")
    assert not (tmp_path / "out").exists()


def test_train_ldm_with_vqgan_metadata_without_window_exits_2(tmp_path, data):
    metadata = {"kind": "vqgan", "config": {}}
    model = _checkpoint(tmp_path / "vq.safetensors", json.dumps(metadata))
    args = ["train-ldm", data, tmp_path / "run", "--vqgan", model, "-p", "tiny"]
    result, output = _invoke(args)
    _assert_refused(result, output, "vq.safetensors", "'window'")


# ----------------------------------------------------------------------------------------------
# An output path that is a file, or a folder holding unrelated files


def test_segment_into_an_existing_file_exits_2_and_keeps_the_file(tmp_path, scan):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    result, output = _invoke(["segment", tmp_path / "no-model", scan, target])
    _assert_refused(result, output, "out.txt", "is a file")
    assert target.read_text() == "keep me"


def test_segment_into_a_folder_of_unrelated_files_exits_2(tmp_path, scan):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.docx").write_text("x")
    result, output = _invoke(["segment", tmp_path / "no-model", scan, out])
    _assert_refused(result, output, "notes.docx")
    assert sorted(p.name for p in out.iterdir()) == ["notes.docx"]


def test_reconstruct_into_an_existing_file_exits_2(tmp_path, data):
    target = tmp_path / "taken"
    target.write_text("keep me")
    result, output = _invoke(["reconstruct", tmp_path / "no-model", data, "--out", target])
    _assert_refused(result, output, "taken", "is a file")
    assert target.read_text() == "keep me"


def test_evaluate_seg_into_an_existing_file_exits_2(tmp_path, data):
    target = tmp_path / "report"
    target.write_text("keep me")
    labels = data / "labels"
    args = ["evaluate", "seg", "--pred", labels, "--truth", labels, "--out", target]
    result, output = _invoke(args)
    _assert_refused(result, output, "report", "is a file")
    assert target.read_text() == "keep me"


def test_evaluate_gen_into_a_folder_of_unrelated_files_exits_2(tmp_path, scan):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    args = ["evaluate", "gen", "--synthetic", scan.parent, "--real", scan.parent, "--out", out]
    result, output = _invoke(args)
    _assert_refused(result, output, "thesis.tex")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_sample_into_an_existing_file_exits_2(tmp_path):
    target = tmp_path / "samples"
    target.write_text("keep me")
    args = ["sample", "-n", "1", "--ldm", tmp_path / "no-model", "--out", target]
    result, output = _invoke(args)
    _assert_refused(result, output, "samples", "is a file")
    assert target.read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# A hand-edited or damaged preprocessed set (checked when the set is opened)


def _edit_manifest(data: Path, edit) -> None:
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest = edit(manifest)
    path.write_text(json.dumps(manifest))


def _drop_window(m):
    del m["window"]
    return m


def _cases_as_object(m):
    m["cases"] = {"case_000": m["cases"][0]}
    return m


def _list_instead_of_object(m):
    return [m]


def _escaping_case_id(m):
    m["cases"][0]["case_id"] = "../../../ESCAPED"
    return m


def _escaping_image(m):
    m["cases"][0]["image"] = "../../outside.nii.gz"
    return m


DAMAGED_MANIFESTS = {
    "missing window": (_drop_window, ["manifest.json", "window is missing", "[low HU, high HU]"]),
    "cases not a list": (_cases_as_object, ["manifest.json", "cases is a dict"]),
    "list, not object": (_list_instead_of_object, ["manifest.json", "a JSON list"]),
    "case id escapes": (_escaping_case_id, ["manifest.json", "../../../ESCAPED"]),
    "image escapes": (_escaping_image, ["manifest.json", "leaves the folder"]),
}


@pytest.mark.parametrize("kind", list(DAMAGED_MANIFESTS))
def test_reconstruct_on_a_damaged_manifest_exits_2_naming_it(kind, data, tmp_path):
    edit, names = DAMAGED_MANIFESTS[kind]
    _edit_manifest(data, edit)
    before = _tree_hash(data)
    result, output = _invoke(["reconstruct", tmp_path / "no-model", data, "--out", tmp_path / "o"])
    _assert_refused(result, output, *names)
    assert _tree_hash(data) == before
    assert not (tmp_path / "o").exists()
    assert not (tmp_path.parent / "ESCAPED").exists()


def test_a_listed_image_that_is_missing_exits_2_naming_the_image(data, tmp_path):
    (data / "images" / "case_001.nii.gz").unlink()
    result, output = _invoke(["train-vqgan", data, tmp_path / "run", "-p", "tiny"])
    _assert_refused(result, output, "case_001.nii.gz", "missing")


def test_an_image_of_another_shape_exits_2_naming_both_shapes(data, tmp_path):
    image = nib.Nifti1Image(np.zeros((16, 16, 5), np.float32), np.eye(4))
    nib.save(image, data / "images" / "case_002.nii.gz")
    result, output = _invoke(["train-ldm", data, tmp_path / "run", "--vqgan", tmp_path / "none"])
    _assert_refused(result, output, "case_002.nii.gz", "16x16x5", "16x16x4")


def test_nan_voxels_in_a_preprocessed_set_exit_2_before_training(data, tmp_path):
    path = data / "images" / "case_001.nii.gz"
    array = np.asarray(nib.load(path).dataobj, dtype=np.float32).copy()
    array[0, 0, 0] = np.nan
    array[1, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    result, output = _invoke(["train-vqgan", data, tmp_path / "run", "-p", "tiny"])
    _assert_refused(result, output, "case_001.nii.gz", "2 voxels are NaN or infinite")


# ----------------------------------------------------------------------------------------------
# Headers that claim more than the file holds


def _claiming_header(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI file whose header claims ``shape`` int16 voxels but holds only 8 bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 8)
    return path


def test_a_header_claiming_gigabytes_in_a_tiny_file_is_refused_naming_the_file(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("BLADDERGEN_MAX_VOXELS", str(10**10))  # the size check, not the limit
    folder = tmp_path / "in"
    folder.mkdir()
    _claiming_header(folder / "big.nii", (1600, 1600, 1000))
    result, output = _invoke(["preprocess", folder, tmp_path / "out", "-p", "tiny"])
    _assert_refused(result, output, "big.nii", "1600x1600x1000", "bytes")
    assert not (tmp_path / "out").exists()


def test_a_header_claiming_4000_cubed_voxels_is_refused_by_the_voxel_limit(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _claiming_header(folder / "huge.nii", (4000, 4000, 4000))
    result, output = _invoke(["preprocess", folder, tmp_path / "out", "-p", "tiny"])
    _assert_refused(result, output, "huge.nii", "64000000000 voxels", "BLADDERGEN_MAX_VOXELS")


def test_the_voxel_limit_is_set_by_an_environment_variable(tmp_path, monkeypatch):
    from bladdergen.data.volumes import read_volume
    from bladdergen.errors import InputError

    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    monkeypatch.setenv("BLADDERGEN_MAX_VOXELS", "63")
    with pytest.raises(InputError, match=r"small\.nii\.gz: header claims shape 4x4x4 = 64 voxels"):
        read_volume(path)
    monkeypatch.setenv("BLADDERGEN_MAX_VOXELS", "64")
    assert read_volume(path).shape == (4, 4, 4)


# ----------------------------------------------------------------------------------------------
# Messages print as given; simple value checks


@pytest.mark.parametrize("name", ["a[/]b", "[red]x"])
def test_a_path_with_rich_markup_characters_is_printed_as_given(tmp_path, name):
    missing = tmp_path / name
    result, output = _invoke(["train-vqgan", missing, tmp_path / "run", "-p", "tiny"])
    _assert_refused(result, output, f"{missing}: not a preprocessed set")


def test_sample_with_a_negative_seed_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result, output = _invoke(["sample", "-n", "1", "--ldm", tmp_path, "--out", out, "--seed", "-1"])
    _assert_refused(result, output, "--seed: got -1", "expected a whole number >= 0")
    assert not out.exists()


def test_train_vqgan_with_zero_steps_exits_2(data, tmp_path):
    result, output = _invoke(["train-vqgan", data, tmp_path / "run", "--max-steps", "0"])
    _assert_refused(result, output, "vqgan.max_steps: got 0", "expected >= 1")
    assert not (tmp_path / "run").exists()


def test_preprocess_of_a_file_that_is_not_a_volume_says_so(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("x")
    result, output = _invoke(["preprocess", text, tmp_path / "out"])
    _assert_refused(result, output, "notes.txt", "is a file but not a volume")


def test_a_bad_z_range_option_exits_2_naming_the_option(tmp_path, scan):
    result, output = _invoke(["preprocess", scan, tmp_path / "out", "--z-range", "5"])
    _assert_refused(result, output, "--z-range: got '5'", "LOW:HIGH")


def test_the_voxel_limit_also_guards_mha_files_before_reading_them(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from bladdergen.data.volumes import read_volume
    from bladdergen.errors import InputError

    path = tmp_path / "scan.mha"
    sitk.WriteImage(sitk.Image([4, 4, 3], sitk.sitkInt16), str(path))
    monkeypatch.setenv("BLADDERGEN_MAX_VOXELS", "47")
    with pytest.raises(InputError, match=r"scan\.mha: header claims shape 4x4x3 = 48 voxels"):
        read_volume(path)


def test_reader_study_export_into_a_folder_of_unrelated_files_exits_2(tmp_path, scan):
    out = tmp_path / "study"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["evaluate", "reader-study", "export", "--synthetic", scan.parent, "--real"]
    args += [scan.parent, "--out", out, "--key", tmp_path / "key.csv"]
    result, output = _invoke(args)
    _assert_refused(result, output, "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "key.csv").exists()
