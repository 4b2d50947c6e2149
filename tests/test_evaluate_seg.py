"""`evaluate seg`: metrics with analytically known answers, empty structures, inputs, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bladdergen.errors import InputError
from bladdergen.evaluate.config import EvaluateConfig
from bladdergen.evaluate.seg import evaluate_segmentation, score_structure

SPACING = (0.8, 0.8, 2.5)


def cube(shape, start, size):
    mask = np.zeros(shape, bool)
    x, y, z = start
    mask[x : x + size, y : y + size, z : z + size] = True
    return mask


def brute_force_asd(a, b, spacing):
    """Symmetric mean surface distance by enumerating boundary voxels (independent of MONAI)."""

    def boundary(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.array(spacing)

    pa, pb = boundary(a), boundary(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.concatenate([d.min(1), d.min(0)]).mean())


def test_cubes_offset_by_k_voxels_give_dice_hd95_in_mm_along_the_shift_axis():
    side, k = 6, 2
    truth = cube((16, 16, 12), (3, 4, 3), side)
    pred = cube((16, 16, 12), (3 + k, 4, 3), side)  # shifted along X (0.8 mm voxels)
    score = score_structure(pred, truth, SPACING)
    assert score["status"] == "ok"
    assert score["dice"] == pytest.approx((side - k) / side)
    # every surface point has its shifted twin at k voxels; the leading faces have nothing closer
    assert score["hd_mm"] == pytest.approx(k * SPACING[0])
    assert score["asd_mm"] == pytest.approx(brute_force_asd(pred, truth, SPACING), rel=1e-5)
    assert score["volume_diff_ml"] == pytest.approx(0.0)


def test_planes_offset_along_z_give_surface_distances_of_k_slice_spacings():
    truth = np.zeros((10, 10, 8), bool)
    truth[:, :, 2] = True
    pred = np.zeros_like(truth)
    pred[:, :, 5] = True
    score = score_structure(pred, truth, SPACING)
    assert score["dice"] == 0.0
    assert score["hd_mm"] == pytest.approx(3 * SPACING[2])
    assert score["asd_mm"] == pytest.approx(3 * SPACING[2])


def test_identical_structures_score_dice_one_and_zero_distances():
    mask = cube((12, 12, 8), (2, 2, 1), 5)
    score = score_structure(mask, mask.copy(), SPACING)
    assert score == {
        "status": "ok",
        "dice": 1.0,
        "hd_mm": 0.0,
        "asd_mm": 0.0,
        "volume_truth_ml": pytest.approx(125 * 0.8 * 0.8 * 2.5 / 1000),
        "volume_pred_ml": pytest.approx(125 * 0.8 * 0.8 * 2.5 / 1000),
        "volume_diff_ml": 0.0,
    }


def test_both_empty_is_counted_without_a_score_and_one_empty_has_no_distance():
    empty = np.zeros((8, 8, 4), bool)
    full = cube((8, 8, 4), (1, 1, 1), 2)
    both = score_structure(empty, empty, SPACING)
    assert (both["status"], both["dice"], both["hd_mm"], both["asd_mm"]) == (
        "both_empty",
        None,
        None,
        None,
    )
    missed = score_structure(empty, full, SPACING)
    assert (missed["status"], missed["dice"], missed["hd_mm"]) == ("missed", 0.0, None)
    extra = score_structure(full, empty, SPACING)
    assert (extra["status"], extra["asd_mm"]) == ("false_positive", None)
    assert extra["volume_diff_ml"] == pytest.approx(8 * 0.8 * 0.8 * 2.5 / 1000)


def write_labels(folder: Path, labels: dict[str, np.ndarray], spacing=SPACING) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for case_id, label in labels.items():
        nib.save(nib.Nifti1Image(label, np.diag([*spacing, 1.0])), folder / f"{case_id}.nii.gz")
    return folder


def make_cases(convention: str, shift: int = 0) -> dict[str, np.ndarray]:
    wall, tumor = (1, 2) if convention == "classes" else (255, 128)
    cases = {}
    for index in range(3):
        label = np.zeros((12, 12, 6), np.uint8)
        label[cube(label.shape, (2 + shift, 2, 1), 5)] = wall
        if index == 1:
            label[cube(label.shape, (3, 3, 2), 2)] = tumor
        cases[f"case_{index}"] = label
    return cases


def test_label_conventions_are_detected_and_scored_alike(tmp_path):
    truth = write_labels(tmp_path / "truth", make_cases("dataset"))
    pred = write_labels(tmp_path / "pred", make_cases("classes"))
    result = evaluate_segmentation([pred], truth, tmp_path / "out", EvaluateConfig())
    assert result["label_conventions"] == {"truth": "dataset", "pred": "classes"}
    assert result["dice"]["pred"] == {"wall": 1.0, "tumor": 1.0}


def test_outputs_hold_per_case_rows_and_a_paired_difference_between_sets(tmp_path):
    truth = write_labels(tmp_path / "truth", make_cases("classes"))
    exact = write_labels(tmp_path / "exact", make_cases("classes"))
    shifted = write_labels(tmp_path / "shifted", make_cases("classes", shift=1))
    out = tmp_path / "out"
    evaluate_segmentation([exact, shifted], truth, out, EvaluateConfig(bootstrap_samples=200))
    rows = (out / "seg_cases.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 * 2  # header + sets x cases x classes
    summary = json.loads((out / "seg_summary.json").read_text())
    wall_dice = next(
        c for c in summary["comparisons"] if c["class"] == "wall" and c["metric"] == "dice"
    )
    # wall cube of side 5 shifted by one voxel: Dice 4/5 on cases 0 and 2; on case 1 a 2x2x2
    # tumor inside both walls leaves 117 wall voxels each with 100 - 8 = 92 shared: 184/234
    expected = ((0.8 - 1.0) * 2 + (184 / 234 - 1.0)) / 3
    assert wall_dice["n"] == 3
    assert wall_dice["mean_difference"] == pytest.approx(expected)
    assert wall_dice["ci_low"] <= wall_dice["mean_difference"] <= wall_dice["ci_high"]
    assert "Paired differences" in (out / "seg_report.md").read_text()
    # tumor exists only in case_1: the two both-empty cases are counted, not scored
    tumor = summary["sets"]["exact"]["tumor"]
    assert tumor["status_counts"] == {"both_empty": 2, "ok": 1}
    assert (tumor["dice"]["n"], tumor["hd_mm"]["n"]) == (1, 1)
    assert (tumor["detection_rate"], tumor["false_positive_rate"]) == (1.0, 0.0)


def test_tumor_dice_is_over_tumor_cases_with_detection_and_false_positive_rates(tmp_path):
    truth_cases = make_cases("classes")  # tumor in case_1 only
    pred_cases = {k: v.copy() for k, v in truth_cases.items()}
    pred_cases["case_1"][pred_cases["case_1"] == 2] = 1  # the tumor is missed
    pred_cases["case_0"][3, 3, 2] = 2  # one false-positive tumor voxel in a tumor-free case
    truth = write_labels(tmp_path / "truth", truth_cases)
    pred = write_labels(tmp_path / "pred", pred_cases)
    result = evaluate_segmentation([pred], truth, tmp_path / "out", EvaluateConfig())
    summary = json.loads((tmp_path / "out" / "seg_summary.json").read_text())
    tumor = summary["sets"]["pred"]["tumor"]
    assert result["dice"]["pred"]["tumor"] == 0.0  # one tumor case, missed: not 2/3 from empties
    assert (tumor["detection_rate"], tumor["false_positive_rate"]) == (0.0, 0.5)
    assert tumor["status_counts"] == {"false_positive": 1, "missed": 1, "both_empty": 1}


def test_missing_prediction_case_is_an_input_error_naming_it(tmp_path):
    truth = write_labels(tmp_path / "truth", make_cases("classes"))
    cases = make_cases("classes")
    del cases["case_2"]
    pred = write_labels(tmp_path / "pred", cases)
    with pytest.raises(InputError, match="case_2"):
        evaluate_segmentation([pred], truth, tmp_path / "out", EvaluateConfig())


def test_prediction_on_another_grid_is_an_input_error(tmp_path):
    truth = write_labels(tmp_path / "truth", make_cases("classes"))
    pred = write_labels(tmp_path / "pred", make_cases("classes"), spacing=(1.0, 1.0, 2.5))
    with pytest.raises(InputError, match=r"spacing \(1, 1, 2\.5\) mm, expected \("):
        evaluate_segmentation([pred], truth, tmp_path / "out", EvaluateConfig())


def test_unknown_label_values_are_an_input_error_listing_them(tmp_path):
    truth = write_labels(tmp_path / "truth", make_cases("classes"))
    bad = make_cases("classes")
    bad["case_0"][0, 0, 0] = 7
    pred = write_labels(tmp_path / "pred", bad)
    with pytest.raises(InputError, match=r"\[0, 1, 7\]"):
        evaluate_segmentation([pred], truth, tmp_path / "out", EvaluateConfig())


def test_predictions_without_a_truth_case_are_ignored(tmp_path):
    truth = write_labels(tmp_path / "truth", make_cases("classes"))
    cases = make_cases("classes")
    cases["unlabeled_9"] = cases["case_0"]
    pred = write_labels(tmp_path / "pred", cases)
    result = evaluate_segmentation([pred], truth, tmp_path / "out", EvaluateConfig())
    assert result["cases"] == 3


def test_a_paired_difference_over_one_case_has_no_confidence_interval():
    from bladdergen.evaluate.seg import paired_difference

    rows = [
        {"set": "a", "case_id": "c1", "class": "wall", "dice": 0.5, "status": "ok"},
        {"set": "b", "case_id": "c1", "class": "wall", "dice": 0.75, "status": "ok"},
    ]
    result = paired_difference(rows, "a", "b", "wall", "dice", EvaluateConfig(), seed=0)
    assert (result["n"], result["mean_difference"]) == (1, 0.25)
    assert result["ci_low"] is None and result["ci_high"] is None


def test_the_report_prints_n_a_for_a_missing_interval():
    from bladdergen.evaluate.seg import _ci_text

    assert _ci_text({"ci_low": None, "ci_high": None}) == "n/a (n < 2)"


def test_prediction_with_another_origin_is_refused_naming_the_origin(tmp_path):
    truth = write_labels(tmp_path / "truth", make_cases("classes"))
    pred = write_labels(tmp_path / "pred", make_cases("classes"))
    for path in pred.iterdir():
        image = nib.load(path)
        affine = image.affine.copy()
        affine[0, 3] += 4.0
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), path)
    with pytest.raises(InputError, match=r"origin \(4, 0, 0\) mm, expected \(0, 0, 0\) mm"):
        evaluate_segmentation([pred], truth, tmp_path / "out", EvaluateConfig())
