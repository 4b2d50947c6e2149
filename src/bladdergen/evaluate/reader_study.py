"""The reader-study kit: a blinded, shuffled mix of real and synthetic volumes for experts to score
on the paper's three axes, and the scoring of their filled-in sheets against the key.

``export`` writes, to the folder handed to readers: ``cases/<blind id>.nii.gz`` (int16 HU, all on
one grid with one affine and one HU range so headers and intensities do not reveal the source),
``cases/<blind id>.png`` (orthogonal views and every axial slice), ``sheet.csv`` (one row per case
to fill in) and ``README.md`` (the scales). The key (blind id -> real/synthetic, original case)
goes to a separate file *outside* that folder.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bladdergen.errors import InputError
from bladdergen.evaluate import figures
from bladdergen.evaluate.config import EvaluateConfig
from bladdergen.evaluate.gen import resample
from bladdergen.evaluate.inputs import open_hu_folder
from bladdergen.evaluate.stats import clean, describe
from bladdergen.fileio import atomic_path, atomic_write_json, atomic_write_text, check_output_folder
from bladdergen.progress import SILENT, Reporter

AXES = ("realistic_appearance", "slice_consistency", "anatomical_correctness")
# Four ordinal options per axis, after the paper's reader study (Medical Diffusion, Table 1).
SCALES = {
    "realistic_appearance": (
        "1 not recognisable as CT",
        "2 clearly artificial",
        "3 realistic with minor artefacts",
        "4 can't tell real or fake",
    ),
    "slice_consistency": (
        "1 slices unrelated",
        "2 many inconsistent slices",
        "3 a few inconsistent slices",
        "4 all slices consistent",
    ),
    "anatomical_correctness": (
        "1 anatomy not recognisable",
        "2 major anatomical errors",
        "3 minor anatomical errors",
        "4 anatomically correct",
    ),
}
SOURCES = ("real", "synthetic")
SHEET_COLUMNS = ("blind_id", "reader", *AXES, "guess", "comment")
KEY_COLUMNS = ("blind_id", "source", "case_id", "original_path")
SLICE_TILE = 96
VIEW_TILE = 192


# What each sub-command writes into its output folder (anything else there is refused).
EXPORT_OUTPUTS = ("cases", "sheet.csv", "README.md")
SCORE_OUTPUTS = ("reader_study_summary.json", "reader_study_report.md")


def default_key_path(out_dir: Path) -> Path:
    """``OUT_DIR-key.csv`` next to (not inside) the folder handed to readers."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}-key.csv"


def export_reader_study(
    synthetic_dir: Path,
    real_dir: Path,
    out_dir: Path,
    config: EvaluateConfig,
    n_per_group: int | None = None,
    key_path: Path | None = None,
    seed: int = 0,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Write a blinded reader study (see the module docstring) and its separate key.

    ``n_per_group``: volumes drawn (seeded) from each group; default: as many as the smaller group
    holds, so the mix is balanced. Raises InputError when a group has fewer volumes than asked or
    the key would land inside ``out_dir``.
    """
    out_dir = Path(out_dir)
    key_path = Path(key_path) if key_path is not None else default_key_path(out_dir)
    if out_dir.resolve() in key_path.resolve().parents:
        raise InputError(
            f"--key {key_path}: inside the readers' folder {out_dir}; put the key elsewhere"
        )
    if (out_dir / "sheet.csv").exists():
        raise InputError(
            f"{out_dir}: already holds a reader study (sheet.csv); choose a new folder"
        )
    check_output_folder(out_dir, EXPORT_OUTPUTS, "reader-study export")
    loaders = {}
    loaders["synthetic"], _ = open_hu_folder(synthetic_dir)
    loaders["real"], _ = open_hu_folder(real_dir)
    available = min(len(loaders["synthetic"]), len(loaders["real"]))
    n = available if n_per_group is None else n_per_group
    for source in SOURCES:
        if n < 1 or n > len(loaders[source]):
            raise InputError(
                f"-n {n}: the {source} folder holds {len(loaders[source])} volume(s), "
                f"expected 1 <= n <= {len(loaders[source])}"
            )
    rng = np.random.default_rng(seed)
    chosen = [
        (source, loaders[source][i])
        for source in SOURCES
        for i in sorted(rng.choice(len(loaders[source]), n, replace=False))
    ]
    order = rng.permutation(len(chosen))
    width = max(3, len(str(len(chosen))))
    grid: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    key_rows = []
    (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    with reporter.task("writing blinded cases", total=len(chosen)) as task:
        for position, index in enumerate(order):
            source, (case_id, load) = chosen[index]
            volume = load()
            if grid is None:  # the first volume written fixes the grid for all
                first_synthetic = loaders["synthetic"][0][1]()
                grid = tuple(int(s) for s in first_synthetic.hu.shape)
                spacing = first_synthetic.spacing
            blind_id = f"case_{position + 1:0{width}d}"
            hu = np.clip(resample(volume.hu.astype(np.float32), grid), *config.hu_range)
            hu = np.round(hu).astype(np.int16)
            image = nib.Nifti1Image(hu, np.diag([*spacing, 1.0]))
            with atomic_path(out_dir / "cases" / f"{blind_id}.nii.gz") as tmp:
                nib.save(image, str(tmp))
            figures.save_png(
                reading_sheet(hu, spacing, config.hu_range, blind_id),
                out_dir / "cases" / f"{blind_id}.png",
            )
            key_rows.append(
                {
                    "blind_id": blind_id,
                    "source": source,
                    "case_id": case_id,
                    "original_path": str(volume.path),
                }
            )
            task.advance(1)
    blind_ids = [row["blind_id"] for row in key_rows]
    atomic_write_text(
        out_dir / "sheet.csv",
        _csv(SHEET_COLUMNS, [{"blind_id": b} for b in blind_ids]),
    )
    atomic_write_text(out_dir / "README.md", instructions(len(blind_ids)))
    atomic_write_text(key_path, _csv(KEY_COLUMNS, key_rows))
    return {
        "out_dir": str(out_dir),
        "key": str(key_path),
        "cases": len(blind_ids),
        "per_group": n,
        "grid": list(grid),
        "files": ["sheet.csv", "README.md", "cases/"],
    }


def reading_sheet(
    hu: np.ndarray, spacing: tuple[float, float, float], hu_range: tuple[float, float], title: str
) -> Image.Image:
    """One picture per case: orthogonal middle views on top, then every axial slice (top to bottom =
    Z from the last slice to the first, i.e. superior first for RAS volumes)."""
    views = figures.orthogonal_views(hu, spacing, hu_range, VIEW_TILE)
    low, high = hu_range
    grey = (np.clip((hu - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    n_slices = hu.shape[2]
    columns = max(3 * VIEW_TILE // SLICE_TILE, 1)
    rows = -(-n_slices // columns)
    header = 16
    sheet = Image.new("RGB", (3 * VIEW_TILE, header + VIEW_TILE + rows * SLICE_TILE), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (4, 2),
        f"{title}  (axial | coronal | sagittal; then all axial slices)",
        fill=(0, 0, 0),
        font=ImageFont.load_default(),
    )
    for column, view in enumerate(views):
        sheet.paste(view.convert("RGB"), (column * VIEW_TILE, header))
    for position, z in enumerate(range(n_slices - 1, -1, -1)):
        pixels = np.ascontiguousarray(np.flipud(grey[:, :, z].T))
        tile = Image.fromarray(pixels, mode="L").resize((SLICE_TILE, SLICE_TILE))
        row, column = divmod(position, columns)
        sheet.paste(
            tile.convert("RGB"), (column * SLICE_TILE, header + VIEW_TILE + row * SLICE_TILE)
        )
    return sheet


def instructions(n_cases: int) -> str:
    """The readers' README: what to look at and how to fill the sheet."""
    lines = [
        "# Reader study",
        "",
        f"{n_cases} CT volumes of the pelvis, some real and some generated, in random order. "
        "Each `cases/<id>.nii.gz` opens in 3D Slicer or ITK-SNAP (HU); `cases/<id>.png` shows "
        "the middle axial, coronal and sagittal slices and every axial slice.",
        "",
        "Copy `sheet.csv`, put your name in the `reader` column, and score each case from 1 to 4 "
        "on each axis. In `guess` write `real` or `synthetic`. Leave a cell empty if unsure.",
        "",
    ]
    for axis, options in SCALES.items():
        lines.append(f"**{axis}**: " + "; ".join(options))
        lines.append("")
    return "\n".join(lines)


def _csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: unreadable CSV ({error})") from None


def read_key(path: Path) -> dict[str, str]:
    """Blind id -> ``real`` / ``synthetic`` from a key file written by :func:`export_reader_study`."""
    key = {}
    for line, row in enumerate(_read_csv(path, ("blind_id", "source")), start=2):
        if row["source"] not in SOURCES:
            raise InputError(
                f"{path} line {line}: source {row['source']!r}, expected real or synthetic"
            )
        key[row["blind_id"]] = row["source"]
    return key


def read_sheet(path: Path, key: dict[str, str]) -> list[dict[str, Any]]:
    """Filled sheet rows as dicts with int scores (None when empty) and a normalised guess."""
    path = Path(path)
    rows = []
    for line, row in enumerate(_read_csv(path, ("blind_id", *AXES, "guess")), start=2):
        blind_id = row["blind_id"].strip()
        if blind_id not in key:
            raise InputError(f"{path} line {line}: blind_id {blind_id!r} is not in the key")
        entry: dict[str, Any] = {
            "blind_id": blind_id,
            "reader": (row.get("reader") or "").strip() or path.stem,
            "source": key[blind_id],
        }
        for axis in AXES:
            text = (row[axis] or "").strip()
            if not text:
                entry[axis] = None
                continue
            if text not in {"1", "2", "3", "4"}:
                raise InputError(
                    f"{path} line {line}: {axis} = {text!r}, expected an integer 1-4 or empty"
                )
            entry[axis] = int(text)
        guess = (row["guess"] or "").strip().lower()
        if guess not in ("", *SOURCES):
            raise InputError(
                f"{path} line {line}: guess = {guess!r}, expected real, synthetic or empty"
            )
        entry["guess"] = guess or None
        rows.append(entry)
    return rows


def score_reader_study(
    sheets: list[Path], key_path: Path, out_dir: Path | None = None
) -> dict[str, Any]:
    """Mean score per axis for real vs synthetic volumes and readers' accuracy at telling them
    apart, from filled sheets and the key. Writes ``reader_study_summary.json`` and
    ``reader_study_report.md`` to ``out_dir`` when given; returns the summary."""
    from scipy.stats import mannwhitneyu

    if not sheets:
        raise InputError("give at least one filled sheet")
    key = read_key(key_path)
    rows = [row for sheet in sheets for row in read_sheet(sheet, key)]
    readers = sorted({r["reader"] for r in rows})
    axes: dict[str, Any] = {}
    for axis in AXES:
        by_source = {s: [r[axis] for r in rows if r["source"] == s] for s in SOURCES}
        entry: dict[str, Any] = {s: describe(by_source[s]) for s in SOURCES}
        real = [v for v in by_source["real"] if v is not None]
        synthetic = [v for v in by_source["synthetic"] if v is not None]
        entry["mann_whitney_p"] = (
            clean(mannwhitneyu(synthetic, real, alternative="two-sided").pvalue)
            if real and synthetic
            else None
        )
        entry["per_reader"] = {
            reader: {
                s: describe([r[axis] for r in rows if r["reader"] == reader and r["source"] == s])[
                    "mean"
                ]
                for s in SOURCES
            }
            for reader in readers
        }
        axes[axis] = entry
    accuracy = {reader: _accuracy([r for r in rows if r["reader"] == reader]) for reader in readers}
    summary = {
        "sheets": [str(s) for s in sheets],
        "key": str(key_path),
        "readers": readers,
        "ratings": len(rows),
        "axes": axes,
        "accuracy": {"overall": _accuracy(rows), "per_reader": accuracy},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        check_output_folder(out_dir, SCORE_OUTPUTS, "reader-study score")
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "reader_study_summary.json", summary)
        atomic_write_text(out_dir / "reader_study_report.md", render_report(summary))
    return summary


def _accuracy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fraction of answered guesses that were right; sensitivity = synthetic called synthetic,
    specificity = real called real (None where nothing was answered)."""
    answered = [r for r in rows if r["guess"] is not None]

    def fraction(selected: list[dict[str, Any]]) -> float | None:
        return (
            sum(r["guess"] == r["source"] for r in selected) / len(selected) if selected else None
        )

    return {
        "answered": len(answered),
        "accuracy": fraction(answered),
        "synthetic_detected": fraction([r for r in answered if r["source"] == "synthetic"]),
        "real_recognised": fraction([r for r in answered if r["source"] == "real"]),
    }


def render_report(summary: dict[str, Any]) -> str:
    """The Markdown report of a scored reader study."""

    def f(value: float | None, digits: int = 2) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "# Reader study",
        "",
        f"{summary['ratings']} ratings by {len(summary['readers'])} reader(s): "
        f"{', '.join(summary['readers'])}. Scores 1-4 (4 best).",
        "",
        "| axis | real mean ± sd (n) | synthetic mean ± sd (n) | Mann-Whitney p |",
        "|---|---|---|---|",
    ]
    for axis, entry in summary["axes"].items():
        real, synthetic = entry["real"], entry["synthetic"]
        lines.append(
            f"| {axis} | {f(real['mean'])} ± {f(real['std'])} ({real['n']}) | "
            f"{f(synthetic['mean'])} ± {f(synthetic['std'])} ({synthetic['n']}) | "
            f"{f(entry['mann_whitney_p'], 3)} |"
        )
    lines += [
        "",
        "Telling real from synthetic (0.5 = chance for a balanced mix):",
        "",
        "| reader | answered | accuracy | synthetic detected | real recognised |",
        "|---|---|---|---|---|",
    ]
    per_reader = summary["accuracy"]["per_reader"]
    for name, acc in [*per_reader.items(), ("all", summary["accuracy"]["overall"])]:
        lines.append(
            f"| {name} | {acc['answered']} | {f(acc['accuracy'])} | "
            f"{f(acc['synthetic_detected'])} | {f(acc['real_recognised'])} |"
        )
    return "\n".join(lines) + "\n"
