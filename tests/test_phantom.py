"""The procedural pelvic phantoms: determinism, geometry, labels and intensities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from bladdergen.data.phantom import generate_phantoms, make_phantom
from bladdergen.data.volumes import read_volume
from bladdergen.errors import InputError


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms") / "ph"
    generate_phantoms(out, n=6, seed=3, size=96, unlabeled=2)
    return out


def test_same_seed_gives_byte_identical_files(phantom_dir, tmp_path):
    generate_phantoms(tmp_path / "again", n=6, seed=3, size=96, unlabeled=2)
    for path in sorted(phantom_dir.rglob("*.*")):
        twin = tmp_path / "again" / path.relative_to(phantom_dir)
        assert twin.read_bytes() == path.read_bytes(), path.name


def test_two_workers_write_the_same_files(phantom_dir, tmp_path):
    generate_phantoms(tmp_path / "par", n=6, seed=3, size=96, unlabeled=2, workers=2)
    for path in sorted(phantom_dir.rglob("*.*")):
        assert (tmp_path / "par" / path.relative_to(phantom_dir)).read_bytes() == path.read_bytes()


def test_another_seed_gives_other_cases():
    assert not np.array_equal(
        make_phantom(0, seed=1, size=32).image, make_phantom(0, seed=2, size=32).image
    )


def test_last_cases_are_left_unlabeled(phantom_dir):
    images = sorted(p.name for p in (phantom_dir / "images").iterdir())
    labels = sorted(p.name for p in (phantom_dir / "labels").iterdir())
    assert images == [f"case_{i:03d}.nii.gz" for i in range(6)]
    assert labels == [f"case_{i:03d}.nii.gz" for i in range(4)]


def test_images_are_int16_hu_with_a_scanner_style_affine(phantom_dir):
    import nibabel as nib

    image = nib.load(str(phantom_dir / "images" / "case_000.nii.gz"))
    assert image.get_data_dtype() == np.int16
    volume = read_volume(phantom_dir / "images" / "case_000.nii.gz")
    assert volume.axcodes == "LPS"
    assert volume.array.min() >= -1024 and volume.array.max() > 500  # air and bone present


def test_slice_counts_spread_around_24_with_clinical_spacing(phantom_dir):
    manifest = json.loads((phantom_dir / "phantoms.json").read_text())
    slices = [c["shape"][2] for c in manifest["cases"]]
    assert min(slices) < 24 < max(slices)
    assert all(18 <= n <= 32 for n in slices)
    for case in manifest["cases"]:
        sx, sy, sz = case["spacing_mm"]
        assert 0.6 <= sx * 96 / 512 <= 0.9 and sx == sy  # 0.6-0.9 mm at 512 voxels
        assert 3.0 <= sz <= 5.0


def test_labels_use_0_128_255_and_both_tumor_kinds_occur(phantom_dir):
    manifest = json.loads((phantom_dir / "phantoms.json").read_text())
    assert {c["has_tumor"] for c in manifest["cases"] if c["labeled"]} == {True, False}
    for case in manifest["cases"][:4]:
        label = read_volume(phantom_dir / "labels" / f"{case['case_id']}.nii.gz").array
        values = set(np.unique(label).astype(int).tolist())
        assert values == ({0, 128, 255} if case["has_tumor"] else {0, 255})


def _lumen(wall: np.ndarray) -> np.ndarray:
    """Voxels enclosed by the wall within their own slice (4-connected background)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(wall, structure=structure) & ~wall


def test_wall_is_2_to_5_mm_thick_around_urine_at_paper_resolution():
    case = make_phantom(1, seed=0, size=512, with_tumor=False)
    spacing = case.params["spacing_mm"][0]
    wall = case.label == 255
    lumen = _lumen(wall)
    z = int(np.argmax(lumen.sum(axis=(0, 1))))  # the slice with the widest lumen
    i, j = np.round(ndimage.center_of_mass(lumen[:, :, z])).astype(int)
    # Along the row through the lumen centre the wall is crossed twice: two runs of voxels.
    row = wall[:, j, z].astype(int)
    edges = np.flatnonzero(np.diff(np.r_[0, row, 0]))
    runs = edges[1::2] - edges[::2]
    assert len(runs) == 2
    thickness = runs * spacing
    # the drawn thickness (2-5 mm) times the shape factor, sampled on the voxel grid
    assert np.all(thickness >= 1.5) and np.all(thickness <= 6.5), thickness


def test_tissues_have_their_hounsfield_units():
    case = make_phantom(0, seed=0, size=256, with_tumor=True)
    image, label = case.image, case.label
    assert 25 <= np.median(image[label == 255]) <= 55  # bladder wall ~40 HU (+ partial volume)
    assert 40 <= np.median(image[label == 128]) <= 80  # tumor ~50-70 HU
    urine = image[ndimage.binary_erosion(_lumen(label > 0), iterations=2)]
    assert -5 <= np.median(urine) <= 25  # urine ~10 HU
    # CT noise of the drawn standard deviation (8-20 HU), not a flat region
    assert np.std(urine) == pytest.approx(case.params["noise_sd_hu"], rel=0.3)
    assert np.median(image[:8, :8]) < -900  # air in the corners, outside the body
    assert np.any((image > -130) & (image < -70))  # fat
    assert np.percentile(image, 99.5) > 200  # bone


def test_bad_counts_are_refused(tmp_path):
    with pytest.raises(InputError, match="--unlabeled: got 5, expected 0..3"):
        generate_phantoms(tmp_path / "x", n=3, unlabeled=5, size=32)
    with pytest.raises(InputError, match="-n: got 0"):
        generate_phantoms(tmp_path / "x", n=0, size=32)


def test_non_empty_output_needs_overwrite(phantom_dir):
    with pytest.raises(InputError, match="not empty.*--overwrite"):
        generate_phantoms(phantom_dir, n=1, size=32)


def test_bladders_of_two_phantoms_do_not_line_up_without_registration():
    from pathlib import Path

    from bladdergen.data.config import PreprocessConfig
    from bladdergen.data.preprocess import prepare_image, prepare_label
    from bladdergen.data.volumes import Volume

    config = PreprocessConfig(target_size=(64, 64))
    bladders = []
    for index in range(2, 6):
        case = make_phantom(index, seed=0, size=64)
        prepared = prepare_image(
            Volume(case.image.astype(np.float32), case.affine, Path("i")), config
        )
        label = Volume(case.label.astype(np.float32), case.affine, Path("l"))
        classes = prepare_label(label, prepared.record, config.label_map)
        bladders.append((classes > 0) | _lumen(classes > 0))
    dice = [
        2 * (a & b).sum() / (a.sum() + b.sum())
        for i, a in enumerate(bladders)
        for b in bladders[i + 1 :]
    ]
    # On the common 64x64x24 grid the bladders overlap only partly: position, size, rotation and
    # shape differ per case, so aligning them is a real registration problem.
    assert np.mean(dice) < 0.7 and max(dice) < 0.9
    assert min(dice) > 0.0  # but they are in the same region of the pelvis


def test_phantom_command_takes_its_settings_from_the_profile_and_records_them(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from bladdergen.cli.app import app

    out = tmp_path / "ph"
    result = CliRunner().invoke(app, ["phantom", str(out), "-n", "2", "-p", "tiny", "-q"])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["phantom"]["size"] == 128  # the tiny profile's phantom size
    assert written["phantom"]["cases"] == 2  # the flag wins over the profile
    assert len(list((out / "images").glob("*.nii.gz"))) == 2
