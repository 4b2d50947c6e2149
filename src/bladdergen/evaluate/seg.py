"""``evaluate seg``: Dice, Hausdorff (HD95) and average surface distance in mm, volume difference.

Every prediction folder is matched to the truth folder by case id; each case is scored per class
(wall, tumor). Empty structures are handled explicitly, never as NaN surprises:

- both empty: Dice and distances undefined (``None``, status ``both_empty``): counted, never
  averaged in as a perfect score;
- one empty: Dice 0, distances undefined (``None``; status ``missed`` when the prediction is empty,
  ``false_positive`` when the truth is);
- otherwise ``ok``. Dice summaries use the cases whose truth holds the structure (a tumor Dice is
  over the tumor cases); beside them, the *detection rate* (share of those cases where the
  prediction overlaps the truth) and the *false-positive rate* (share of the cases without the
  structure where something is predicted). Distance summaries and paired distance differences use
  the ``ok`` cases only and say how many that is.

With several prediction folders, each is compared with the first (the reference) on the cases and
classes where both have a value: mean paired difference and a seeded percentile-bootstrap CI.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bladdergen.data.volumes import geometry_difference
from bladdergen.errors import InputError
from bladdergen.evaluate.config import EvaluateConfig
from bladdergen.evaluate.inputs import (
    CLASS_NAMES,
    CONVENTION_TEXT,
    LabelVolume,
    check_evaluate_out,
    read_label_folder,
)
from bladdergen.evaluate.stats import bootstrap_mean_ci, clean, describe, finite
from bladdergen.fileio import atomic_write_json, atomic_write_text
from bladdergen.progress import SILENT, Reporter

METRICS = ("dice", "hd_mm", "asd_mm", "volume_diff_ml")
DISTANCE_METRICS = ("hd_mm", "asd_mm")
AFFINE_TOLERANCE_MM = 1e-3


def score_structure(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, float, float],
    hd_percentile: float = 95.0,
) -> dict[str, Any]:
    """Scores of one binary structure.

    ``pred``, ``truth``: boolean masks of shape (X, Y, Z); ``spacing``: voxel size in mm.
    Returns status, dice, hd_mm (``hd_percentile``-th percentile symmetric Hausdorff distance, mm),
    asd_mm (symmetric average surface distance, mm: the mean over both surfaces' points),
    volume_truth_ml, volume_pred_ml, volume_diff_ml (pred - truth).
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    result: dict[str, Any] = {
        "volume_truth_ml": n_truth * voxel_ml,
        "volume_pred_ml": n_pred * voxel_ml,
        "volume_diff_ml": (n_pred - n_truth) * voxel_ml,
    }
    if n_pred == 0 and n_truth == 0:
        return {"status": "both_empty", "dice": None, "hd_mm": None, "asd_mm": None, **result}
    if n_pred == 0 or n_truth == 0:
        status = "missed" if n_pred == 0 else "false_positive"
        return {"status": status, "dice": 0.0, "hd_mm": None, "asd_mm": None, **result}
    dice = 2.0 * float(np.logical_and(pred, truth).sum()) / (n_pred + n_truth)
    hd, asd = _surface_distances(pred, truth, spacing, hd_percentile)
    return {"status": "ok", "dice": dice, "hd_mm": hd, "asd_mm": asd, **result}


def _surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], percentile: float
) -> tuple[float, float]:
    """(HD at ``percentile``, symmetric ASD) in mm via MONAI's surface-distance metrics."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(truth[None, None].astype(np.float32))
    spacing_list = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty structures never reach here
        hd = compute_hausdorff_distance(
            y_pred,
            y,
            include_background=True,
            percentile=None if percentile >= 100 else percentile,
            spacing=spacing_list,
        )
        asd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=spacing_list
        )
    return float(hd.item()), float(asd.item())


def check_geometry(pred: LabelVolume, truth: LabelVolume) -> None:
    """Shapes must agree and affines match within 1e-3 mm; else an InputError naming both files."""
    if pred.classes.shape != truth.classes.shape:
        raise InputError(
            f"{pred.path}: shape {pred.classes.shape} differs from the truth "
            f"{truth.path} shape {truth.classes.shape}; predictions must be on the truth's grid"
        )
    if not np.allclose(pred.affine, truth.affine, atol=AFFINE_TOLERANCE_MM):
        what = geometry_difference(pred.affine, truth.affine, AFFINE_TOLERANCE_MM)
        raise InputError(
            f"{pred.path}: {what or 'affine differs'} like the truth {truth.path}; "
            "predictions must be on the truth's grid"
        )


def _set_names(pred_dirs: list[Path]) -> list[str]:
    names = []
    for index, folder in enumerate(pred_dirs):
        name = Path(folder).resolve().name or f"set{index + 1}"
        if name in names:
            name = f"{name}-{index + 1}"
        names.append(name)
    return names


def evaluate_segmentation(
    pred_dirs: list[Path],
    truth_dir: Path,
    out_dir: Path,
    config: EvaluateConfig,
    seed: int = 0,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Score prediction folders against a truth folder and write the outputs.

    Writes ``out_dir/seg_cases.csv`` (one row per set, case and class), ``out_dir/seg_summary.json``
    and ``out_dir/seg_report.md``. Returns the summary dict. Raises InputError for missing cases,
    unreadable files, unknown label values or mismatched geometry; predictions without a truth
    case are ignored with a notice.
    """
    if not pred_dirs:
        raise InputError("--pred: give at least one prediction folder")
    check_evaluate_out(out_dir)
    truths, truth_convention = read_label_folder(truth_dir)
    reporter.notice(f"truth {truth_dir}: {CONVENTION_TEXT[truth_convention]}")
    names = _set_names(pred_dirs)
    rows: list[dict[str, Any]] = []
    conventions = {"truth": truth_convention}
    for name, folder in zip(names, pred_dirs, strict=True):
        preds, convention = read_label_folder(folder)
        conventions[name] = convention
        reporter.notice(f"predictions {folder}: {CONVENTION_TEXT[convention]}")
        missing = sorted(set(truths) - set(preds))
        extra = sorted(set(preds) - set(truths))
        if missing:
            raise InputError(
                f"{folder}: no prediction for {len(missing)} truth case(s): {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        if extra:  # e.g. unlabeled scans segmented alongside the labeled ones
            reporter.notice(
                f"{folder}: {len(extra)} prediction(s) without a truth case ignored: "
                f"{', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
            )
        with reporter.task(f"scoring {name}", total=len(truths)) as task:
            for case_id, truth in truths.items():
                pred = preds[case_id]
                check_geometry(pred, truth)
                for class_index, class_name in CLASS_NAMES.items():
                    score = score_structure(
                        pred.classes == class_index,
                        truth.classes == class_index,
                        truth.spacing,
                        config.hd_percentile,
                    )
                    rows.append({"set": name, "case_id": case_id, "class": class_name, **score})
                task.advance(1)

    summary = summarise(rows, names, config, seed)
    summary["truth"] = str(truth_dir)
    summary["predictions"] = {n: str(p) for n, p in zip(names, pred_dirs, strict=True)}
    summary["label_conventions"] = conventions
    summary["hd_percentile"] = config.hd_percentile
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "seg_cases.csv", rows_to_csv(rows))
    atomic_write_json(out_dir / "seg_summary.json", summary)
    atomic_write_text(out_dir / "seg_report.md", render_report(summary))
    return {
        "out_dir": str(out_dir),
        "cases": len(truths),
        "sets": names,
        "label_conventions": conventions,
        "dice": {
            n: {c: summary["sets"][n][c]["dice"]["mean"] for c in CLASS_NAMES.values()}
            for n in names
        },
        "files": ["seg_cases.csv", "seg_summary.json", "seg_report.md"],
    }


def _value(row: dict[str, Any], metric: str) -> float | None:
    """A row's metric for summaries: Dice only where the truth holds the structure, distances only
    where both structures exist (``ok``), so that empty cases do not flatter the means."""
    if metric in DISTANCE_METRICS and row["status"] != "ok":
        return None
    if metric == "dice" and row["status"] in ("both_empty", "false_positive"):
        return None
    return row[metric]


def detection_rates(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Detection rate over the cases whose truth holds the structure (prediction overlaps it) and
    false-positive rate over the cases whose truth does not (anything predicted), with their n."""
    present = [r for r in rows if r["status"] in ("ok", "missed")]
    absent = [r for r in rows if r["status"] in ("both_empty", "false_positive")]
    detected = sum(1 for r in present if r["status"] == "ok" and (r["dice"] or 0) > 0)
    false_pos = sum(1 for r in absent if r["status"] == "false_positive")
    return {
        "cases_with_structure": len(present),
        "cases_without_structure": len(absent),
        "detection_rate": detected / len(present) if present else None,
        "false_positive_rate": false_pos / len(absent) if absent else None,
    }


def summarise(
    rows: list[dict[str, Any]], names: list[str], config: EvaluateConfig, seed: int
) -> dict[str, Any]:
    """Per set and class: metric summaries and status counts; paired differences to the first set."""
    sets: dict[str, Any] = {}
    for name in names:
        sets[name] = {}
        for class_name in CLASS_NAMES.values():
            selected = [r for r in rows if r["set"] == name and r["class"] == class_name]
            statuses: dict[str, int] = {}
            for row in selected:
                statuses[row["status"]] = statuses.get(row["status"], 0) + 1
            sets[name][class_name] = {
                "status_counts": statuses,
                **detection_rates(selected),
                **{metric: describe([_value(r, metric) for r in selected]) for metric in METRICS},
            }
    comparisons = []
    reference = names[0]
    for name in names[1:]:
        for class_name in CLASS_NAMES.values():
            for metric in ("dice", "hd_mm", "asd_mm"):
                comparisons.append(
                    paired_difference(rows, reference, name, class_name, metric, config, seed)
                )
    return {"sets": sets, "reference": reference, "comparisons": comparisons}


MIN_CI_CASES = 2


def paired_difference(
    rows: list[dict[str, Any]],
    reference: str,
    other: str,
    class_name: str,
    metric: str,
    config: EvaluateConfig,
    seed: int,
) -> dict[str, Any]:
    """Mean of (other - reference) over cases where both values exist, with a bootstrap CI.

    The CI needs at least :data:`MIN_CI_CASES` paired cases; with fewer it is None (reported as
    n/a): resampling one difference would give a zero-width interval that claims certainty.
    """
    by_case = {
        (r["set"], r["case_id"]): _value(r, metric)
        for r in rows
        if r["class"] == class_name and r["set"] in (reference, other)
    }
    case_ids = sorted({case for (_, case) in by_case})
    differences = finite(
        [
            by_case[(other, c)] - by_case[(reference, c)]
            if by_case.get((other, c)) is not None and by_case.get((reference, c)) is not None
            else None
            for c in case_ids
        ]
    )
    result: dict[str, Any] = {
        "set": other,
        "reference": reference,
        "class": class_name,
        "metric": metric,
        "n": int(differences.size),
        "mean_difference": None,
        "ci_low": None,
        "ci_high": None,
        "confidence": config.confidence,
    }
    if differences.size:
        result["mean_difference"] = float(differences.mean())
    if differences.size >= MIN_CI_CASES:
        low, high = bootstrap_mean_ci(
            differences, config.bootstrap_samples, config.confidence, seed
        )
        result.update(ci_low=low, ci_high=high)
    return result


CSV_COLUMNS = (
    "set",
    "case_id",
    "class",
    "status",
    "dice",
    "hd_mm",
    "asd_mm",
    "volume_truth_ml",
    "volume_pred_ml",
    "volume_diff_ml",
)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The per-case rows as CSV text (undefined distances are empty cells)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: (
                    ""
                    if row[k] is None
                    else f"{row[k]:.6g}"
                    if isinstance(row[k], float)
                    else row[k]
                )
                for k in CSV_COLUMNS
            }
        )
    return buffer.getvalue()


def _fmt(value: float | None, digits: int = 3) -> str:
    value = clean(value)
    return "–" if value is None else f"{value:.{digits}f}"


def render_report(summary: dict[str, Any]) -> str:
    """The Markdown report of a segmentation evaluation."""
    percentile = summary["hd_percentile"]
    hd_name = "HD" if percentile >= 100 else f"HD{percentile:g}"
    lines = [
        "# Segmentation evaluation",
        "",
        f"Truth: `{summary['truth']}` — labels read as "
        f"{CONVENTION_TEXT[summary['label_conventions']['truth']]}.",
        "",
    ]
    for name, path in summary["predictions"].items():
        lines.append(
            f"- **{name}**: `{path}` — {CONVENTION_TEXT[summary['label_conventions'][name]]}"
        )
    lines += [
        "",
        f"Distances in mm using each truth file's voxel spacing. {hd_name} and ASD summarise the "
        "cases where both structures exist (n); Dice summarises the cases whose truth has the "
        "structure (n; a missed one counts 0). Detection: share of those cases where the "
        "prediction overlaps the truth; false-positive rate: share of the cases without the "
        "structure where something is predicted. Both-empty cases are counted, not scored.",
        "",
        f"| set | class | Dice mean ± sd (n) | Dice median | {hd_name} mm (n) | ASD mm (n) | "
        "volume diff ml | detection | false-positive rate | both empty | missed | false positive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, classes in summary["sets"].items():
        for class_name, stats in classes.items():
            counts = stats["status_counts"]
            lines.append(
                f"| {name} | {class_name} | {_fmt(stats['dice']['mean'])} ± "
                f"{_fmt(stats['dice']['std'])} ({stats['dice']['n']}) | "
                f"{_fmt(stats['dice']['median'])} | "
                f"{_fmt(stats['hd_mm']['mean'], 2)} ({stats['hd_mm']['n']}) | "
                f"{_fmt(stats['asd_mm']['mean'], 2)} ({stats['asd_mm']['n']}) | "
                f"{_fmt(stats['volume_diff_ml']['mean'], 2)} | "
                f"{_fmt(stats['detection_rate'], 2)} | {_fmt(stats['false_positive_rate'], 2)} | "
                f"{counts.get('both_empty', 0)} | {counts.get('missed', 0)} | "
                f"{counts.get('false_positive', 0)} |"
            )
    if summary["comparisons"]:
        confidence = summary["comparisons"][0]["confidence"]
        lines += [
            "",
            f"## Paired differences against `{summary['reference']}`",
            "",
            f"Mean of (set − reference) over cases where both have a value; "
            f"{confidence:.0%} percentile-bootstrap CI over cases.",
            "",
            "| set | class | metric | n | mean difference | CI |",
            "|---|---|---|---|---|---|",
        ]
        for c in summary["comparisons"]:
            lines.append(
                f"| {c['set']} | {c['class']} | {c['metric']} | {c['n']} | "
                f"{_fmt(c['mean_difference'], 4)} | {_ci_text(c)} |"
            )
    return "\n".join(lines) + "\n"


def _ci_text(comparison: dict[str, Any]) -> str:
    if comparison["ci_low"] is None:
        return f"n/a (n < {MIN_CI_CASES})"
    return f"[{_fmt(comparison['ci_low'], 4)}, {_fmt(comparison['ci_high'], 4)}]"
