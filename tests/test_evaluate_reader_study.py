"""Reader-study kit: blinded export, separate key, scoring round trip, sheet validation; CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from bladdergen.cli import app
from bladdergen.errors import InputError
from bladdergen.evaluate.config import EvaluateConfig
from bladdergen.evaluate.reader_study import AXES, export_reader_study, score_reader_study
from synthetic import make_preprocessed_set
from test_evaluate_gen import write_hu_folder

runner = CliRunner()


@pytest.fixture()
def study(tmp_path):
    synthetic = write_hu_folder(tmp_path / "syn", seed=3, n=4)
    real = make_preprocessed_set(tmp_path / "real", n_cases=3, seed=0)
    result = export_reader_study(
        synthetic, real, tmp_path / "study", EvaluateConfig(), n_per_group=3, seed=5
    )
    return tmp_path, result


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_export_writes_blinded_cases_on_one_grid_and_the_key_outside(study):
    tmp_path, result = study
    out = tmp_path / "study"
    key = read_rows(Path(result["key"]))
    assert Path(result["key"]).parent == tmp_path  # not inside the readers' folder
    assert sorted(r["source"] for r in key) == ["real"] * 3 + ["synthetic"] * 3
    names = sorted(p.name for p in (out / "cases").iterdir())
    assert names == sorted(
        [f"case_{i:03d}.nii.gz" for i in range(1, 7)] + [f"case_{i:03d}.png" for i in range(1, 7)]
    )
    headers = [nib.load(out / "cases" / f"case_{i:03d}.nii.gz") for i in range(1, 7)]
    assert {h.shape for h in headers} == {(32, 32, 8)}
    assert {str(h.get_data_dtype()) for h in headers} == {"int16"}
    assert all(np.array_equal(h.affine, headers[0].affine) for h in headers)
    sheet = read_rows(out / "sheet.csv")
    assert [r["blind_id"] for r in sheet] == [f"case_{i:03d}" for i in range(1, 7)]
    assert all(value == "" for row in sheet for k, value in row.items() if k != "blind_id")


def test_export_is_shuffled_reproducibly_by_seed(study, tmp_path):
    base, result = study
    again = export_reader_study(
        base / "syn", base / "real", tmp_path / "again", EvaluateConfig(), n_per_group=3, seed=5
    )

    def order(key_file):
        return [(r["blind_id"], r["source"], r["case_id"]) for r in read_rows(Path(key_file))]

    assert order(result["key"]) == order(again["key"])
    sources = [r["source"] for r in read_rows(Path(result["key"]))]
    assert sources != sorted(sources)  # mixed, not real-then-synthetic


def fill(sheet: Path, target: Path, reader: str, scores: dict[str, int], guesses: dict[str, str]):
    rows = read_rows(sheet)
    for row in rows:
        row["reader"] = reader
        for axis in AXES:
            row[axis] = str(scores[row["blind_id"]])
        row["guess"] = guesses[row["blind_id"]]
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


def test_scoring_round_trip_gives_means_per_axis_and_reader_accuracy(study):
    tmp_path, result = study
    key = {r["blind_id"]: r["source"] for r in read_rows(Path(result["key"]))}
    sheet = tmp_path / "study" / "sheet.csv"
    scores = {b: 4 if s == "real" else 2 for b, s in key.items()}
    alice = fill(sheet, tmp_path / "alice.csv", "alice", scores, key)  # always right
    bob = fill(sheet, tmp_path / "bob.csv", "bob", scores, dict.fromkeys(key, "real"))
    summary = score_reader_study([alice, bob], Path(result["key"]), tmp_path / "scored")
    for axis in AXES:
        assert summary["axes"][axis]["real"]["mean"] == 4.0
        assert summary["axes"][axis]["synthetic"]["mean"] == 2.0
        assert summary["axes"][axis]["real"]["n"] == 6
    accuracy = summary["accuracy"]
    assert accuracy["per_reader"]["alice"]["accuracy"] == 1.0
    assert accuracy["per_reader"]["bob"]["accuracy"] == 0.5
    assert accuracy["per_reader"]["bob"]["synthetic_detected"] == 0.0
    assert accuracy["overall"]["accuracy"] == 0.75
    assert (tmp_path / "scored" / "reader_study_report.md").is_file()


def test_score_outside_the_scale_is_an_input_error_naming_the_line(study):
    tmp_path, result = study
    key = {r["blind_id"]: r["source"] for r in read_rows(Path(result["key"]))}
    sheet = fill(
        tmp_path / "study" / "sheet.csv", tmp_path / "bad.csv", "x", dict.fromkeys(key, 5), key
    )
    with pytest.raises(InputError, match=r"line 2: realistic_appearance = '5'"):
        score_reader_study([sheet], Path(result["key"]))


def test_key_inside_the_readers_folder_is_refused(tmp_path):
    synthetic = write_hu_folder(tmp_path / "syn", seed=3, n=2)
    with pytest.raises(InputError, match="inside the readers' folder"):
        export_reader_study(
            synthetic,
            synthetic,
            tmp_path / "s",
            EvaluateConfig(),
            key_path=tmp_path / "s" / "k.csv",
        )


def test_cli_scores_segmentations_as_json_and_exits_2_on_a_missing_case(tmp_path):
    from test_evaluate_seg import make_cases, write_labels

    truth = write_labels(tmp_path / "truth", make_cases("dataset"))
    pred = write_labels(tmp_path / "pred", make_cases("classes"))
    ok = runner.invoke(
        app,
        [
            "evaluate",
            "seg",
            "--pred",
            str(pred),
            "--truth",
            str(truth),
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.strip().splitlines()[-1])["dice"]["pred"]["wall"] == 1.0
    (pred / "case_1.nii.gz").unlink()
    bad = runner.invoke(
        app,
        [
            "evaluate",
            "seg",
            "--pred",
            str(pred),
            "--truth",
            str(truth),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert bad.exit_code == 2
    assert "case_1" in bad.output
