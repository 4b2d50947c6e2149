"""bench/bench_gain.py's table: what each tumor number averages over (rows made by hand)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_gain.py"


@pytest.fixture(scope="module")
def bench_gain():
    spec = importlib.util.spec_from_file_location("bench_gain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gain"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare(bench_gain):
    """bench/compare_gain.py (it imports its sibling bench_gain, loaded first)."""
    spec = importlib.util.spec_from_file_location(
        "compare_gain", SCRIPT.with_name("compare_gain.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(case_id, tumor_voxels, tumor_dice, predicted):
    return {
        "case_id": case_id,
        "wall_dice": 0.5,
        "wall_hd95_mm": 5.0,
        "has_tumor": tumor_voxels > 0,
        "tumor_voxels": tumor_voxels,
        "tumor_dice": tumor_dice,
        "tumor_detected": bool(tumor_dice),
        "tumor_predicted": predicted,
    }


def test_tumor_dice_is_split_by_size_and_leaves_tumor_free_cases_out(bench_gain):
    small = bench_gain.SMALL_TUMOR_VOXELS - 1
    rows = [
        _row("a", small, 0.2, True),
        _row("b", 300, 0.6, True),
        _row("c", 200, 0.8, True),
        # tumor-free, nothing predicted: a "both empty" case, not a tumor Dice of 1
        _row("d", 0, None, False),
        _row("e", 0, None, True),  # tumor-free, a tumor predicted: a false positive
    ]
    (entry,) = bench_gain.summarise({"4/0/supervised": rows}, ["supervised"], [4], [0], 10)
    assert entry["tumor_cases"] == 3
    assert entry["tumor_dice"] == pytest.approx((0.2 + 0.6 + 0.8) / 3)
    assert (entry["tumor_cases_small"], entry["tumor_cases_large"]) == (1, 2)
    assert entry["tumor_dice_small"] == pytest.approx(0.2)
    assert entry["tumor_dice_large"] == pytest.approx(0.7)
    assert entry["tumor_detection_rate"] == pytest.approx(1.0)
    assert entry["tumor_false_positive_rate"] == pytest.approx(0.5)


def test_rows_scored_before_sizes_were_recorded_count_in_neither_size_group(bench_gain):
    row = _row("a", 300, 0.6, True)
    del row["tumor_voxels"]
    (entry,) = bench_gain.summarise({"4/0/supervised": [row]}, ["supervised"], [4], [0], 10)
    assert entry["tumor_dice"] == pytest.approx(0.6)
    assert (entry["tumor_cases_small"], entry["tumor_cases_large"]) == (0, 0)
    assert entry["tumor_dice_small"] is None and entry["tumor_dice_large"] is None


def test_compare_gain_pairs_one_arm_of_two_outputs_case_by_case(bench_gain, compare):
    reference = {
        "4/0/supervised": [_row("a", 300, 0.4, True), _row("b", 0, None, False)],
        "4/0/deepatlas": [_row("a", 300, 0.9, True)],  # another arm: not compared
    }
    changed = {"4/0/supervised": [_row("a", 300, 0.7, True), _row("b", 0, None, True)]}
    for rows, wall in (
        (changed["4/0/supervised"], (0.8, 0.6)),
        (reference["4/0/supervised"], (0.5, 0.5)),
    ):
        for row, value in zip(rows, wall, strict=True):
            row["wall_dice"] = value
    merged = compare.paired_runs(reference, changed, "supervised")
    table = bench_gain.summarise(merged, ["supervised", "deepatlas"], [4], [0], 200)
    changed_entry = table[1]
    # per case: wall a 0.8 - 0.5, b 0.6 - 0.5; tumor only over the tumor case a: 0.7 - 0.4
    assert changed_entry["wall_dice_diff"][0] == pytest.approx(0.2)
    assert changed_entry["wall_dice_diff"][3] == 2
    assert changed_entry["tumor_dice_diff"][0] == pytest.approx(0.3)
    assert changed_entry["tumor_false_positive_rate"] == pytest.approx(1.0)


def test_compare_gain_pairs_two_arms_of_one_output(bench_gain, compare):
    runs = {
        "2/0/supervised": [_row("a", 0, None, False)],
        "2/0/deepatlas": [_row("a", 0, None, False)],
        "2/0/deepatlas+synthetic": [_row("a", 0, None, False)],
    }
    runs["2/0/supervised"][0]["wall_dice"] = 0.1  # not one of the two sides: left out
    runs["2/0/deepatlas+synthetic"][0]["wall_dice"] = 0.75
    merged = compare.paired_runs(runs, runs, "deepatlas", "deepatlas+synthetic")
    assert merged == {
        "2/0/supervised": runs["2/0/deepatlas"],
        "2/0/deepatlas": runs["2/0/deepatlas+synthetic"],
    }
    table = bench_gain.summarise(merged, ["supervised", "deepatlas"], [2], [0], 50)
    assert table[1]["wall_dice_diff"][0] == pytest.approx(0.75 - 0.5)


def test_compare_gain_pairs_runs_at_another_labeled_count_with_the_reference_count(compare):
    reference = {"4/0/supervised": [_row("a", 0, None, False)], "2/0/supervised": []}
    changed = {"16/0/supervised": [_row("a", 0, None, False)], "4/0/supervised": []}
    merged = compare.paired_runs(reference, changed, "supervised", labeled=(4, 16))
    assert merged == {
        "4/0/supervised": reference["4/0/supervised"],
        "4/0/deepatlas": changed["16/0/supervised"],
    }


def test_a_deepatlas_job_runs_after_the_baseline_whose_handoff_it_takes(bench_gain, monkeypatch):
    order = []
    monkeypatch.setattr(bench_gain, "train_and_score", lambda job: {"key": job["key"]})
    jobs = [
        {"key": "4/0/deepatlas", "after": "4/0/supervised"},
        {"key": "4/0/supervised", "after": None},
    ]
    bench_gain.run_jobs(jobs, 1, lambda done: order.append(done["key"]))
    assert order == ["4/0/supervised", "4/0/deepatlas"]


def test_baselines_of_another_output_are_taken_only_for_the_supervised_arm(bench_gain, tmp_path):
    rows = [_row("a", 0, None, False)]
    runs = {"4/0/supervised": rows, "4/1/supervised": rows, "4/0/deepatlas": rows}
    (tmp_path / "gain.json").write_text(json.dumps({"runs": runs}))
    taken = bench_gain.take_baselines(tmp_path, [4], [0, 1])
    assert taken == {"4/0/supervised": rows, "4/1/supervised": rows}
    with pytest.raises(SystemExit, match="no run 2/0/supervised"):
        bench_gain.take_baselines(tmp_path, [2, 4], [0])


def test_threads_per_run_follow_omp_num_threads_else_share_the_cores(bench_gain, monkeypatch):
    monkeypatch.setattr(bench_gain.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert bench_gain.job_threads(1) == 1  # two bench_gain.py at once must not take 8 each
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert bench_gain.job_threads(1) == 8
    assert bench_gain.job_threads(3) == 2  # 8 cores // 3 runs


def test_only_the_supervised_pairs_arm_takes_synthetic_pairs_as_labeled_cases(bench_gain):
    from bladdergen.config import load_config

    def pairs(arm):
        return load_config(
            "tiny", overrides=bench_gain.arm_overrides(arm)
        ).deepatlas.synthetic_pairs

    assert pairs("supervised+pairs") is True
    assert [pairs(a) for a in ("supervised", "deepatlas", "deepatlas+synthetic")] == [False] * 3


def test_a_synthetic_folder_template_names_each_splits_own_pairs(bench_gain):
    template = Path("/pairs/n{labeled}_s{seed}/samples")
    assert bench_gain.synthetic_folder(template, 2, 1) == Path("/pairs/n2_s1/samples")
    assert bench_gain.synthetic_folder(Path("/pairs/one"), 4, 0) == Path("/pairs/one")
    assert bench_gain.synthetic_folder(None, 2, 0) is None


def test_compare_gain_reads_several_folders_of_one_side_as_one_set_of_runs(compare, tmp_path):
    first, second = tmp_path / "seeds012", tmp_path / "seeds345"
    baseline = [_row("a", 0, None, False)]
    for folder, runs in (
        (first, {"4/0/supervised": baseline}),
        # the baseline copied along (as --baselines does) and a new seed
        (second, {"4/0/supervised": baseline, "4/3/supervised": [_row("b", 0, None, True)]}),
    ):
        folder.mkdir()
        (folder / "gain.json").write_text(json.dumps({"runs": runs}))
    merged = compare.merged_runs([first, second])
    assert sorted(merged) == ["4/0/supervised", "4/3/supervised"]
    assert merged["4/3/supervised"][0]["case_id"] == "b"


def test_compare_gain_refuses_two_different_results_under_one_run_name(compare, tmp_path):
    folders = [tmp_path / "x", tmp_path / "y"]
    for folder, wall in zip(folders, (0.5, 0.6), strict=True):
        folder.mkdir()
        row = _row("a", 0, None, False)
        row["wall_dice"] = wall
        (folder / "gain.json").write_text(json.dumps({"runs": {"4/0/deepatlas": [row]}}))
    with pytest.raises(ValueError, match="run 4/0/deepatlas differs"):
        compare.merged_runs(folders)


def test_more_unlabeled_scans_keep_the_baselines_labeled_cases_or_stop(bench_gain, tmp_path):
    import nibabel as nib
    import numpy as np

    from synthetic import make_preprocessed_set

    # the same seed draws the same first cases: one more unlabeled scan at the end
    theirs = make_preprocessed_set(tmp_path / "theirs", n_cases=5, n_labeled=4, seed=0)
    ours = make_preprocessed_set(tmp_path / "ours", n_cases=6, n_labeled=4, seed=0)
    assert bench_gain.unlabeled_count(theirs) == 1
    assert bench_gain.unlabeled_count(ours) == 2
    bench_gain.require_same_cases(ours, theirs, labeled_only=True)
    with pytest.raises(SystemExit, match="case case_005 is not in both"):
        bench_gain.require_same_cases(ours, theirs, labeled_only=False)
    moved = make_preprocessed_set(tmp_path / "moved", n_cases=5, n_labeled=4, seed=0)
    label = nib.load(moved / "labels" / "case_000.nii.gz")
    voxels = np.asarray(label.dataobj).copy()
    voxels[0, 0, 0] = 2 if voxels[0, 0, 0] != 2 else 0
    nib.save(nib.Nifti1Image(voxels, label.affine), moved / "labels" / "case_000.nii.gz")
    with pytest.raises(SystemExit, match="case case_000's label differs"):
        bench_gain.require_same_cases(moved, theirs, labeled_only=True)
