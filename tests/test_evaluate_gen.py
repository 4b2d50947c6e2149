"""`evaluate gen`: appearance, slice consistency, anatomy, diversity on hand-made HU volumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bladdergen.evaluate.anatomy import measure_anatomy, plausibility, real_ranges
from bladdergen.evaluate.appearance import feature_distances
from bladdergen.evaluate.config import EvaluateConfig
from bladdergen.evaluate.gen import evaluate_generation
from bladdergen.evaluate.similarity import adjacent_slice_similarity, ms_ssim
from synthetic import WINDOW, make_case, make_preprocessed_set, ring_classes

SPACING = (3.0, 3.0, 4.0)
CONFIG = EvaluateConfig(compare_size=None, max_pairs=20, montage_cases=2)


def write_hu_folder(folder: Path, seed: int, n: int = 4, shape=(32, 32, 8)) -> Path:
    """HU int16 NIfTI volumes like `sample` writes: the test phantom mapped through WINDOW."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(n):
        image, _ = make_case(shape, rng)
        hu = (image + 1) / 2 * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
        affine = np.diag([*SPACING, 1.0])
        nib.save(
            nib.Nifti1Image(np.round(hu).astype(np.int16), affine), folder / f"s{index}.nii.gz"
        )
    return folder


def test_identical_sets_have_zero_distribution_distances_and_are_flagged_as_copies(tmp_path):
    folder = write_hu_folder(tmp_path / "vols", seed=0)
    result = evaluate_generation(folder, folder, tmp_path / "out", CONFIG)
    summary = json.loads((tmp_path / "out" / "gen_summary.json").read_text())
    assert summary["appearance"]["histogram"]["wasserstein_hu"] == pytest.approx(0.0, abs=1e-9)
    assert summary["appearance"]["texture_distance"]["mmd2"] == pytest.approx(0.0, abs=1e-9)
    assert summary["appearance"]["texture_distance"]["frechet"] == pytest.approx(0.0, abs=1e-6)
    assert summary["slice_consistency"]["slice_ssim"]["difference"] == pytest.approx(0.0)
    copies = summary["diversity"]["near_copies"]
    assert [(c["case_id"], c["nearest_real"]) for c in copies] == [
        (f"s{i}", f"s{i}") for i in range(4)
    ]
    assert all(c["nearest_real_ms_ssim"] == pytest.approx(1.0) for c in copies)
    assert result["near_copies"] == 4
    assert result["plausible_fraction"] is None  # no segmentation model given


def test_brighter_synthetic_volumes_shift_the_hu_histogram_by_the_offset(tmp_path):
    real = write_hu_folder(tmp_path / "real", seed=0)
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for path in sorted(real.iterdir()):
        image = nib.load(path)
        data = np.asarray(image.dataobj).astype(np.int16) + 20
        nib.save(nib.Nifti1Image(data, image.affine), shifted / path.name)
    config = EvaluateConfig(compare_size=None, body_threshold_hu=-150, hu_range=(-200, 300))
    summary = evaluate_generation(shifted, real, tmp_path / "out", config)
    # body voxels all lie well inside the range, so the pooled histogram moves by 20 HU
    # (to within one 10 HU bin of quantisation)
    assert 10.0 <= summary["hu_wasserstein"] <= 30.0
    assert summary["texture_mmd2"] > 0.1


def test_report_links_existing_png_figures(tmp_path):
    synthetic = write_hu_folder(tmp_path / "syn", seed=1)
    real = make_preprocessed_set(tmp_path / "real", n_cases=3, seed=0)
    evaluate_generation(synthetic, real, tmp_path / "out", CONFIG)
    report = (tmp_path / "out" / "gen_report.md").read_text()
    for name in ("montage.png", "hu_histogram.png", "slice_consistency.png", "nearest_real.png"):
        assert f"({name})" in report
        Image.open(tmp_path / "out" / name).verify()
    montage = Image.open(tmp_path / "out" / "montage.png")
    assert montage.size[0] == 3 * 160  # axial, coronal, sagittal columns
    rows = (tmp_path / "out" / "gen_volumes.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 + 3


def test_volumes_on_another_grid_are_resampled_to_the_synthetic_grid(tmp_path):
    synthetic = write_hu_folder(tmp_path / "syn", seed=1, shape=(32, 32, 8))
    real = write_hu_folder(tmp_path / "real", seed=2, shape=(48, 40, 10))
    evaluate_generation(synthetic, real, tmp_path / "out", CONFIG)
    summary = json.loads((tmp_path / "out" / "gen_summary.json").read_text())
    assert summary["resampled_volumes"] == 4
    assert summary["comparison_grid"] == [32, 32, 8]


def test_constant_slices_are_perfectly_consistent_and_noise_is_not():
    rng = np.random.default_rng(0)
    flat = np.repeat(rng.random((16, 16, 1)), 6, axis=2).astype(np.float32)
    noise = rng.random((16, 16, 6)).astype(np.float32)
    assert adjacent_slice_similarity(flat) == pytest.approx({"slice_ssim": 1.0, "slice_ncc": 1.0})
    assert adjacent_slice_similarity(noise)["slice_ncc"] < 0.3


def test_ms_ssim_is_one_for_identical_volumes_and_lower_for_different_ones():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 8)).astype(np.float32)
    values = ms_ssim(a, np.stack([a, rng.random((32, 32, 8)).astype(np.float32)]))
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert values[1] < 0.5


def test_feature_distances_vanish_for_identical_sets_and_grow_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 5))
    same = feature_distances(a, a.copy())
    assert same["mmd2"] == pytest.approx(0.0) and same["frechet"] == pytest.approx(0.0, abs=1e-6)
    near, far = feature_distances(a + 0.5, a), feature_distances(a + 3.0, a)
    assert 0 < near["mmd2"] < far["mmd2"]
    # Fréchet of a pure mean shift by d (in real-std units) is |d / std|^2 summed over features
    std = a.std(axis=0)
    assert far["frechet"] == pytest.approx(float(((3.0 / std) ** 2).sum()), rel=1e-4)


def test_ring_wall_measures_its_thickness_lumen_and_one_component():
    classes = ring_classes(outer=8, inner=5)
    m = measure_anatomy(classes, (2.0, 2.0, 5.0))
    assert m["wall_main_component"] == 1.0
    assert m["lumen_ml"] > 0
    assert m["wall_thickness_mm"] == pytest.approx(3 * 2.0, abs=1.0)  # 3 voxels of 2 mm
    assert m["tumor_touches_wall"] is None


def test_broken_wall_and_floating_tumor_are_implausible():
    classes = ring_classes()
    classes[:12] = 0  # half a ring: no lumen enclosed
    classes[20:22, 0:2, 1] = 2  # a tumor far from the wall
    m = measure_anatomy(classes, (2.0, 2.0, 5.0))
    checks = plausibility(m, real_ranges([measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))], 0.2))
    assert not checks["encloses_lumen"]
    assert not checks["tumor_on_wall"]
    assert not checks["tumor_in_bladder"]
    assert not checks["plausible"]


def test_tumor_growing_from_the_inner_wall_into_the_lumen_is_plausible():
    classes = ring_classes(outer=8, inner=5)
    classes[7:9, 10:13, 1:3] = 2  # just inside the ring (radius 3.5-5 from the centre)
    m = measure_anatomy(classes, (2.0, 2.0, 5.0))
    assert m["tumor_touches_wall"] and m["tumor_touches_lumen"]
    ranges = real_ranges([measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))], 0.2)
    assert plausibility(m, ranges)["plausible"]


def test_a_second_tumor_away_from_the_bladder_fails_although_the_first_sits_on_the_wall():
    classes = ring_classes(outer=8, inner=5)
    classes[7:9, 10:13, 1:3] = 2  # on the inner wall, as in the plausible case above
    classes[20:22, 0:2, 1] = 2  # a second piece in the corner, far from the wall
    m = measure_anatomy(classes, (2.0, 2.0, 5.0))
    # over all tumor voxels at once the first piece would carry both checks
    assert m["tumor_touches_wall"] and m["tumor_touches_lumen"]
    pieces = (m["tumor_pieces"], m["tumor_pieces_off_wall"], m["tumor_pieces_outside_bladder"])
    assert pieces == (2, 1, 1)
    checks = plausibility(m, real_ranges([measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))], 0.2))
    assert checks["tumor_on_wall"] is False and checks["tumor_in_bladder"] is False
    assert not checks["plausible"]


def test_judged_as_a_whole_a_second_distant_tumor_rides_on_the_first():
    classes = ring_classes(outer=8, inner=5)
    classes[7:9, 10:13, 1:3] = 2  # on the inner wall
    classes[20:22, 0:2, 1] = 2  # a second piece in the corner, far from the wall
    ranges = real_ranges([measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))], 0.2)
    checks = plausibility(measure_anatomy(classes, (2.0, 2.0, 5.0)), ranges, tumor_per_piece=False)
    assert checks["tumor_on_wall"] is True and checks["tumor_in_bladder"] is True
    assert checks["plausible"]


def test_judged_as_a_whole_a_tumor_only_off_the_wall_still_fails():
    classes = ring_classes(outer=8, inner=5)
    classes[20:22, 0:2, 1] = 2  # the only tumor, in the corner
    ranges = real_ranges([measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))], 0.2)
    checks = plausibility(measure_anatomy(classes, (2.0, 2.0, 5.0)), ranges, tumor_per_piece=False)
    assert checks["tumor_on_wall"] is False and checks["tumor_in_bladder"] is False
    assert not checks["plausible"]


def test_a_tumor_speck_floating_in_the_urine_is_in_the_bladder_but_off_the_wall():
    classes = ring_classes(outer=8, inner=5)
    classes[11:13, 11:13, 1] = 2  # the ring's centre: urine all around, 3 voxels from the wall
    m = measure_anatomy(classes, (2.0, 2.0, 5.0))
    assert (m["tumor_pieces_off_wall"], m["tumor_pieces_outside_bladder"]) == (1, 0)
    checks = plausibility(m, real_ranges([measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))], 0.2))
    assert checks["tumor_on_wall"] is False and checks["tumor_in_bladder"] is True


def _ring_sector(classes: np.ndarray, low: float, high: float) -> np.ndarray:
    """Voxels at distance [low, high) from the ring's centre with x beyond it by 3 or more."""
    x, y = np.meshgrid(*[np.arange(n) for n in classes.shape[:2]], indexing="ij")
    r = np.sqrt((x - 11.5) ** 2 + (y - 11.5) ** 2)
    return (r >= low) & (r < high) & (x - 11.5 >= 3) & (np.abs(y - 11.5) < 2)


def test_a_tumor_through_the_whole_wall_closes_the_bladder_and_is_plausible():
    classes = ring_classes(outer=8, inner=5)
    classes[_ring_sector(classes, 5, 8), 1:3] = 2  # transmural: the wall is tumor there
    m = measure_anatomy(classes, (2.0, 2.0, 5.0))
    # The urine is the disc inside the ring on every slice, tumor or not: 2 x 2 x 5 mm voxels.
    x, y = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    lumen_voxels = int((np.sqrt((x - 11.5) ** 2 + (y - 11.5) ** 2) < 5).sum()) * 4
    assert m["lumen_ml"] == pytest.approx(lumen_voxels * 0.02)
    assert m["tumor_touches_lumen"] and m["tumor_touches_outside"]
    ranges = real_ranges([measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))], 0.2)
    assert plausibility(m, ranges)["plausible"]


def _sized(thickness_mm: float, bladder_ml: float) -> dict:
    return {"wall_voxels": 1, "wall_thickness_mm": thickness_mm, "bladder_ml": bladder_ml}


def test_real_ranges_are_the_log_normal_prediction_interval_of_a_new_volume():
    # logs 0, 1, 2: mean 1, standard deviation 1, n = 3; Student's t at 0.975 with 2 degrees of
    # freedom is 4.3027 (table value), so the interval is exp(1 ± 4.3027 * sqrt(4 / 3))
    measured = [_sized(np.e**k, np.e**k) for k in (0, 1, 2)]
    half = 4.3027 * np.sqrt(4 / 3)
    ranges = real_ranges(measured, margin=0.2)
    for key in ("wall_thickness_mm", "bladder_ml"):
        assert ranges[key] == pytest.approx([np.exp(1 - half), np.exp(1 + half)], rel=1e-4)


def test_real_ranges_keep_the_widened_min_max_where_it_is_wider():
    # clustered cases (logs within 0.01): the interval is narrower than [min, max] +- 20 %
    measured = [_sized(3.0, 100.0), _sized(3.01, 101.0), _sized(3.02, 100.5)]
    ranges = real_ranges(measured, margin=0.2)
    assert ranges["wall_thickness_mm"] == pytest.approx([3.0 * 0.8, 3.02 * 1.2])
    assert ranges["bladder_ml"] == pytest.approx([100.0 * 0.8, 101.0 * 1.2])


def test_real_ranges_without_coverage_or_with_one_case_are_the_widened_min_max():
    measured = [_sized(2.0, 50.0), _sized(4.0, 200.0)]
    assert real_ranges(measured, 0.2, coverage=None) == {
        "wall_thickness_mm": pytest.approx([1.6, 4.8]),
        "bladder_ml": pytest.approx([40.0, 240.0]),
    }
    assert real_ranges(measured[:1], 0.2)["bladder_ml"] == pytest.approx([40.0, 60.0])


def test_a_volume_beyond_the_real_cases_but_inside_the_interval_passes_the_size_check():
    # six cases 86-214 ml (the bench's labeled phantoms): [min, max] +- 20 % ends at 257 ml, the
    # 95 % interval of a new case at ~316 ml; 300 ml passes, 10x the largest case does not
    volumes = [86.4, 108.6, 112.3, 147.4, 149.5, 214.0]
    ranges = real_ranges([_sized(3.3, v) for v in volumes], margin=0.2)
    assert 214.0 * 1.2 < 300.0 < ranges["bladder_ml"][1] < 2140.0
    ring = measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))
    for volume, expected in ((300.0, True), (2140.0, False), (20.0, False)):
        checks = plausibility({**ring, "wall_thickness_mm": 3.3, "bladder_ml": volume}, ranges)
        assert checks["volume_in_range"] is expected


def test_a_tumor_only_on_the_outside_of_the_wall_is_not_in_the_bladder():
    classes = ring_classes(outer=8, inner=5)
    classes[_ring_sector(classes, 8, 10), 1:3] = 2  # on the outer surface, away from the urine
    m = measure_anatomy(classes, (2.0, 2.0, 5.0))
    assert m["tumor_touches_wall"] and not m["tumor_touches_lumen"]
    ranges = real_ranges([measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))], 0.2)
    checks = plausibility(m, ranges)
    assert checks["tumor_on_wall"] and not checks["tumor_in_bladder"] and not checks["plausible"]


class ThresholdNet(torch.nn.Module):
    """Stand-in segmentation net: class by intensity band, features = pooled band fractions."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 1, X, Y, Z) in [-1, 1]
        wall = (image > -0.05) & (image < 0.15)
        tumor = image >= 0.15
        background = ~(wall | tumor)
        return torch.cat([background, wall, tumor], dim=1).float()


class StandInSegmenter:
    window = WINDOW

    def __init__(self) -> None:
        self.net = ThresholdNet()

    def classes(self, image: np.ndarray) -> np.ndarray:
        logits = self.net(torch.from_numpy(image)[None, None])
        return logits.argmax(1)[0].numpy().astype(np.uint8)

    def features(self, image: np.ndarray) -> np.ndarray:
        return self.net(torch.from_numpy(image)[None, None]).mean(dim=(2, 3, 4))[0].numpy()


def test_segmentation_model_enables_anatomy_and_network_feature_distance(tmp_path):
    folder = write_hu_folder(tmp_path / "vols", seed=0)
    result = evaluate_generation(
        folder, folder, tmp_path / "out", CONFIG, segmenter=StandInSegmenter()
    )
    summary = json.loads((tmp_path / "out" / "gen_summary.json").read_text())
    # the same volumes on both sides: every synthetic volume lies inside the real ranges
    assert result["plausible_fraction"] == summary["anatomy"]["real"]["plausible"] == 1.0
    assert summary["anatomy"]["synthetic"]["one_connected_wall"] == 1.0
    assert summary["appearance"]["model_feature_distance"]["mmd2"] == pytest.approx(0.0)
    report = (tmp_path / "out" / "gen_report.md").read_text()
    assert "Fraction of volumes passing each check" in report
    # the report names the range rule it used: the default joins the prediction interval
    assert "joined with the 95% prediction interval of a new real volume" in report
    assert summary["anatomy"]["range_coverage"] == 0.95


def test_report_without_coverage_names_the_widened_range_alone():
    from bladdergen.evaluate.gen import _ranges_rule

    assert _ranges_rule(None) == "the real volumes' [min, max] widened"


def test_sample_folder_with_its_own_manifest_is_read_as_hu_nifti(tmp_path):
    from bladdergen.evaluate.inputs import read_hu_folder

    folder = write_hu_folder(tmp_path / "syn", seed=1, n=2)
    (folder / "manifest.json").write_text(json.dumps({"format": "bladdergen-samples"}))
    volumes, kind = read_hu_folder(folder)
    assert kind == "nifti"
    assert [v.case_id for v in volumes] == ["s0", "s1"]
    assert volumes[0].hu.dtype == np.float32 and volumes[0].hu.min() >= WINDOW[0]


def test_preprocessed_real_set_is_mapped_back_to_hu_with_its_window(tmp_path):
    from bladdergen.evaluate.inputs import read_hu_folder

    real = make_preprocessed_set(tmp_path / "real", n_cases=1, seed=0)
    volumes, kind = read_hu_folder(real)
    assert kind == "preprocessed"
    # background voxels clipped at -1 in [-1, 1] are the window floor in HU
    assert volumes[0].hu.min() == pytest.approx(WINDOW[0])
    assert volumes[0].hu.max() <= WINDOW[1]


def test_generated_label_maps_are_scored_against_the_segmentation_of_their_images(tmp_path):
    folder = write_hu_folder(tmp_path / "synth", seed=0)
    segmenter = StandInSegmenter()
    (folder / "labels").mkdir()
    (folder / "checks").mkdir()
    dataset_values = np.array([0, 255, 128], np.uint8)  # classes 0/1/2 -> 0/255/128
    for index, plausible in ((0, True), (1, False), (2, False)):
        hu = np.asarray(nib.load(folder / f"s{index}.nii.gz").dataobj).astype(np.float32)
        image = (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) * 2 - 1
        classes = segmenter.classes(image)
        if index == 2:
            classes = np.zeros_like(classes)  # a label map that misses its image's wall
        label = nib.Nifti1Image(dataset_values[classes], np.diag([*SPACING, 1.0]))
        nib.save(label, folder / "labels" / f"s{index}.nii.gz")
        (folder / "checks" / f"s{index}.json").write_text(
            json.dumps({"checks": {"plausible": plausible}})
        )
    # s3 has no label map: it is not a pair
    result = evaluate_generation(folder, folder, tmp_path / "out", CONFIG, segmenter=segmenter)
    paired = result["paired_labels"]
    assert paired["pairs"] == 3
    assert paired["plausible_fraction"] == pytest.approx(1 / 3)
    assert paired["segmenter_dice_wall"] == pytest.approx(2 / 3)  # Dice 1, 1 and 0
    assert "Generated label maps (3 samples)" in (tmp_path / "out/gen_report.md").read_text()


def test_volumes_csv_lists_each_pairs_plausibility_and_segmenter_dice(tmp_path):
    folder = write_hu_folder(tmp_path / "synth", seed=0)
    segmenter = StandInSegmenter()
    (folder / "labels").mkdir()
    (folder / "checks").mkdir()
    hu = np.asarray(nib.load(folder / "s0.nii.gz").dataobj).astype(np.float32)
    classes = segmenter.classes((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) * 2 - 1)
    wall = classes == 1
    assert wall.sum() >= 2
    # keep half of the segmenter's wall voxels as the label's wall: Dice 2 * (n/2) / (n + n/2)
    kept = np.zeros_like(wall)
    kept.flat[np.flatnonzero(wall)[: wall.sum() // 2]] = True
    label = np.where(kept, 255, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, np.diag([*SPACING, 1.0])), folder / "labels" / "s0.nii.gz")
    (folder / "checks" / "s0.json").write_text(json.dumps({"checks": {"plausible": False}}))
    evaluate_generation(folder, folder, tmp_path / "out", CONFIG, segmenter=segmenter)
    with open(tmp_path / "out" / "gen_volumes.csv", newline="") as handle:
        rows = {(r["group"], r["case_id"]): r for r in csv.DictReader(handle)}
    pair = rows[("synthetic", "s0")]
    half = int(wall.sum()) // 2
    assert float(pair["label_dice_wall"]) == pytest.approx(2 * half / (wall.sum() + half), rel=1e-5)
    assert pair["label_plausible"] == "False"
    assert pair["label_dice_tumor"] == ""  # neither the label nor the segmentation has a tumor
    assert rows[("synthetic", "s1")]["label_dice_wall"] == ""  # no label map: not a pair


def test_anatomy_measures_are_the_same_on_a_volume_padded_with_background():
    classes = ring_classes()
    classes[11:13, 3:5, 1:3] = 2  # a tumor on the inner wall
    padded = np.pad(classes, ((40, 25), (3, 60), (0, 0)))
    assert measure_anatomy(padded, SPACING) == measure_anatomy(classes, SPACING)


def test_tumor_checks_are_not_applicable_when_no_tumor_is_predicted():
    m = measure_anatomy(ring_classes(), (2.0, 2.0, 5.0))
    checks = plausibility(m, real_ranges([m], 0.2))
    assert (checks["tumor_on_wall"], checks["tumor_in_bladder"]) == (None, None)
    assert checks["plausible"]  # decided by the checks that apply
