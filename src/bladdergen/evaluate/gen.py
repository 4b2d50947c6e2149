"""``evaluate gen``: numbers and pictures for the paper's three reading axes, plus diversity.

- appearance: HU histograms and texture statistics inside the body (synthetic vs real), and MMD /
  Fréchet distances between feature distributions (hand-crafted texture features always; the
  segmentation network's features with ``--seg-model``);
- slice consistency: SSIM and NCC between adjacent axial slices, synthetic vs real;
- anatomy (with ``--seg-model``): the fraction of volumes whose predicted bladder is plausible;
- paired labels (``sample`` with a trained label decoder writes ``labels/`` and ``checks/``): the
  fraction of generated label maps that pass the anatomy checks, and with ``--seg-model`` how well
  the generated label matches its image: Dice of the model's segmentation of the generated image
  against the generated label (wall; tumor over the samples whose label has one);
- diversity and memorisation: MS-SSIM among synthetic and among real volumes, and each synthetic
  volume's nearest real volume, flagged as a near-copy above ``near_copy_msssim``.

Grids: the *native* grid is the first synthetic volume's shape (what ``sample`` writes, the model's
input grid); the *comparison* grid is ``compare_size`` in-plane with the native depth. Real volumes
on another grid are resampled (linear) keeping their physical extent.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bladdergen.data.intensity import hu_to_unit
from bladdergen.errors import InputError
from bladdergen.evaluate import figures
from bladdergen.evaluate.anatomy import (
    ANATOMY_FIELDS,
    MIN_MAIN_COMPONENT,
    Segmenter,
    measure_anatomy,
    plausibility,
    real_ranges,
)
from bladdergen.evaluate.appearance import (
    TEXTURE_FEATURES,
    bin_centres,
    body_mask,
    feature_distances,
    histogram_distances,
    hu_histogram,
    texture_features,
)
from bladdergen.evaluate.config import EvaluateConfig
from bladdergen.evaluate.inputs import HUVolume, check_evaluate_out, open_hu_folder
from bladdergen.evaluate.similarity import (
    adjacent_slice_similarity,
    ms_ssim,
    pairwise_ms_ssim,
    to_unit_range,
)
from bladdergen.evaluate.stats import clean, describe
from bladdergen.fileio import atomic_write_json, atomic_write_text
from bladdergen.progress import SILENT, Reporter

GROUPS = ("synthetic", "real")
MONTAGE_TILE = 160


@dataclasses.dataclass
class VolumeAnalysis:
    """Everything ``evaluate gen`` keeps of one volume after reading it once."""

    group: str
    case_id: str
    path: Path
    compare: np.ndarray  # (X, Y, Z) in [0, 1] on the comparison grid
    histogram: np.ndarray
    texture: dict[str, float]
    slices: dict[str, float]
    model_features: np.ndarray | None = None
    anatomy: dict[str, Any] | None = None
    paired: dict[str, Any] | None = None  # a synthetic volume's own label map and its scores
    views: list | None = None
    nearest: dict[str, Any] = dataclasses.field(default_factory=dict)


def resample(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Linear resampling of a (X, Y, Z) array to ``shape`` (corners aligned to the extent)."""
    if volume.shape == tuple(shape):
        return volume
    factors = [t / s for t, s in zip(shape, volume.shape, strict=True)]
    out = ndimage.zoom(volume, factors, order=1, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # zoom rounds the output size; crop/pad the odd voxel
        out = out[: shape[0], : shape[1], : shape[2]]
        out = np.pad(out, [(0, t - s) for t, s in zip(shape, out.shape, strict=True)], mode="edge")
    return out


def regridded_spacing(volume: HUVolume, shape: tuple[int, int, int]) -> tuple[float, float, float]:
    """Voxel size (mm) after resampling ``volume`` to ``shape`` with the same physical extent."""
    return tuple(
        sp * n / t for sp, n, t in zip(volume.spacing, volume.hu.shape, shape, strict=True)
    )


def analyse_volume(
    volume: HUVolume,
    group: str,
    native_shape: tuple[int, int, int],
    compare_shape: tuple[int, int, int],
    config: EvaluateConfig,
    segmenter: Segmenter | None,
    keep_views: bool,
) -> VolumeAnalysis:
    """Read-once analysis of one HU volume (see the module docstring for the grids)."""
    hu = np.clip(volume.hu.astype(np.float32), *config.hu_range)
    native = resample(hu, native_shape)
    native_spacing = regridded_spacing(volume, native_shape)
    compare = resample(native, compare_shape)
    compare_spacing = regridded_spacing(volume, compare_shape)
    mask = body_mask(compare, config.body_threshold_hu)
    unit01 = to_unit_range(compare, config.hu_range)
    analysis = VolumeAnalysis(
        group=group,
        case_id=volume.case_id,
        path=volume.path,
        compare=unit01,
        histogram=hu_histogram(compare, mask, config.hu_range, config.histogram_bins),
        texture=texture_features(
            compare,
            compare_spacing,
            config.body_threshold_hu,
            config.hu_range,
            config.histogram_bins,
        ),
        slices=adjacent_slice_similarity(unit01),
    )
    predicted = None
    if segmenter is not None:
        image = hu_to_unit(native, segmenter.window)
        analysis.model_features = segmenter.features(image)
        predicted = segmenter.classes(image)
        analysis.anatomy = measure_anatomy(predicted, native_spacing)
    if group == "synthetic":
        analysis.paired = paired_label_scores(volume.path, native_shape, predicted)
    if keep_views:
        analysis.views = figures.orthogonal_views(
            native, native_spacing, config.hu_range, MONTAGE_TILE
        )
    return analysis


def paired_label_scores(
    image_path: Path, native_shape: tuple[int, int, int], predicted: np.ndarray | None
) -> dict[str, Any] | None:
    """The generated label map beside a sample (``labels/<name>``, ``checks/<name>.json``):
    whether ``sample`` found it plausible, and the Dice of the segmenter's ``predicted`` classes
    against it (None without a segmenter; tumor None when neither has a tumor). None when the
    sample has no label map."""
    from bladdergen.data.preprocess import PreprocessConfig, label_values_to_classes
    from bladdergen.diffusion.layout import sample_label_and_checks
    from bladdergen.evaluate.inputs import detect_convention, load_nifti, read_array

    label_path, checks_path = sample_label_and_checks(image_path)
    if not label_path.is_file():
        return None
    values = read_array(load_nifti(label_path), label_path).astype(np.int64)
    if detect_convention({int(v) for v in np.unique(values)}, label_path) == "dataset":
        values = label_values_to_classes(values, PreprocessConfig().label_map, label_path)
    if values.shape != tuple(native_shape):
        factors = [t / n for t, n in zip(native_shape, values.shape, strict=True)]
        values = ndimage.zoom(values, factors, order=0, mode="nearest", grid_mode=True)
    plausible = None
    if checks_path.is_file():
        import json

        plausible = bool(json.loads(checks_path.read_text(encoding="utf-8"))["checks"]["plausible"])
    scores: dict[str, Any] = {"plausible": plausible, "dice_wall": None, "dice_tumor": None}
    if predicted is not None and predicted.shape == values.shape:
        for cls, key in ((1, "dice_wall"), (2, "dice_tumor")):
            total = int((predicted == cls).sum() + (values == cls).sum())
            if total:
                scores[key] = 2.0 * float(((predicted == cls) & (values == cls)).sum()) / total
    return scores


def paired_summary(analyses: list[VolumeAnalysis]) -> dict[str, Any] | None:
    """Over the synthetic volumes that came with a label map; None when none did."""
    paired = [a.paired for a in analyses if a.paired is not None]
    if not paired:
        return None

    def mean(key: str) -> float | None:
        values = [p[key] for p in paired if p[key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "pairs": len(paired),
        "plausible_fraction": mean("plausible"),
        "segmenter_dice_wall": mean("dice_wall"),
        "segmenter_dice_tumor": mean("dice_tumor"),
    }


def evaluate_generation(
    synthetic_dir: Path,
    real_dir: Path,
    out_dir: Path,
    config: EvaluateConfig,
    segmenter: Segmenter | None = None,
    seed: int = 0,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Compare generated volumes with real ones and write the report.

    ``synthetic_dir``: HU NIfTI files (``sample`` output); ``real_dir``: HU NIfTI files or a
    preprocessed set. Writes ``gen_volumes.csv``, ``gen_summary.json``, ``gen_report.md`` and
    PNG figures to ``out_dir``; returns the headline numbers. Raises InputError for unreadable or
    empty folders.
    """
    check_evaluate_out(out_dir)
    loaders = {}
    kinds = {}
    loaders["synthetic"], kinds["synthetic"] = open_hu_folder(synthetic_dir)
    loaders["real"], kinds["real"] = open_hu_folder(real_dir)
    if kinds["real"] == "preprocessed":
        reporter.notice(f"real {real_dir}: preprocessed set, mapped back to HU with its window")
    if segmenter is None:
        reporter.notice(
            "no --seg-model: anatomy check skipped; feature distance uses hand-crafted "
            "texture features only"
        )
    analyses: dict[str, list[VolumeAnalysis]] = {"synthetic": [], "real": []}
    native_shape: tuple[int, int, int] | None = None
    compare_shape: tuple[int, int, int] | None = None
    resampled = 0
    total = sum(len(v) for v in loaders.values())
    with reporter.task("analysing volumes", total=total) as task:
        for group in GROUPS:
            for index, (_, load) in enumerate(loaders[group]):
                volume = load()
                if native_shape is None:
                    native_shape = tuple(int(n) for n in volume.hu.shape)
                    if native_shape[2] < 2:
                        raise InputError(
                            f"{volume.path}: {native_shape[2]} axial slice(s), expected >= 2"
                        )
                    size = config.compare_size or native_shape[:2]
                    compare_shape = (int(size[0]), int(size[1]), native_shape[2])
                if volume.hu.shape != native_shape:
                    resampled += 1
                analyses[group].append(
                    analyse_volume(
                        volume,
                        group,
                        native_shape,
                        compare_shape,
                        config,
                        segmenter,
                        keep_views=index < config.montage_cases,
                    )
                )
                task.advance(1)
    if resampled:
        reporter.notice(
            f"{resampled} volume(s) not on the synthetic grid {native_shape}: resampled linearly"
        )
    summary: dict[str, Any] = {
        "synthetic": str(synthetic_dir),
        "real": str(real_dir),
        "real_kind": kinds["real"],
        "counts": {g: len(analyses[g]) for g in GROUPS},
        "native_grid": list(native_shape),
        "comparison_grid": list(compare_shape),
        "hu_range": list(config.hu_range),
        "resampled_volumes": resampled,
        "seg_model": None
        if segmenter is None
        else str(getattr(segmenter, "metadata", {}).get("checkpoint", "given")),
    }
    summary["appearance"] = appearance_summary(analyses, config)
    summary["slice_consistency"] = slice_summary(analyses)
    summary["anatomy"] = anatomy_summary(analyses, config) if segmenter is not None else None
    summary["paired_labels"] = paired_summary(analyses["synthetic"])
    with reporter.task("MS-SSIM diversity and nearest real", total=len(analyses["synthetic"])) as t:
        summary["diversity"] = diversity_summary(analyses, config, seed, t)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = write_figures(analyses, summary, config, out_dir)
    summary["figures"] = images
    atomic_write_text(out_dir / "gen_volumes.csv", volumes_csv(analyses))
    atomic_write_json(out_dir / "gen_summary.json", summary)
    atomic_write_text(out_dir / "gen_report.md", render_report(summary))
    anatomy = summary["anatomy"]
    return {
        "out_dir": str(out_dir),
        "synthetic": summary["counts"]["synthetic"],
        "real": summary["counts"]["real"],
        "hu_wasserstein": summary["appearance"]["histogram"]["wasserstein_hu"],
        "texture_mmd2": summary["appearance"]["texture_distance"]["mmd2"],
        "slice_ssim": {g: summary["slice_consistency"]["slice_ssim"][g]["mean"] for g in GROUPS},
        "plausible_fraction": None if anatomy is None else anatomy["synthetic"]["plausible"],
        "paired_labels": summary["paired_labels"],
        "ms_ssim": {g: summary["diversity"][g]["mean"] for g in GROUPS},
        "near_copies": len(summary["diversity"]["near_copies"]),
        "files": ["gen_volumes.csv", "gen_summary.json", "gen_report.md", *images.values()],
    }


def appearance_summary(
    analyses: dict[str, list[VolumeAnalysis]], config: EvaluateConfig
) -> dict[str, Any]:
    """Histogram distances, texture statistics per group, and feature-distribution distances."""
    centres = bin_centres(config.hu_range, config.histogram_bins)
    pooled = {g: np.mean([a.histogram for a in analyses[g]], axis=0) for g in GROUPS}
    histogram = histogram_distances(pooled["synthetic"], pooled["real"], centres)
    # Reference scale: each real volume against the pooled histogram of the *other* real volumes.
    real = analyses["real"]
    if len(real) > 1:
        loo = [
            histogram_distances(
                a.histogram, np.mean([b.histogram for b in real if b is not a], axis=0), centres
            )["wasserstein_hu"]
            for a in real
        ]
        histogram["real_leave_one_out_wasserstein_hu"] = float(np.mean(loo))
    else:
        histogram["real_leave_one_out_wasserstein_hu"] = None
    histogram["pooled"] = {g: pooled[g].tolist() for g in GROUPS}
    histogram["bin_centres_hu"] = centres.tolist()
    texture = {}
    for name in TEXTURE_FEATURES:
        values = {g: [a.texture[name] for a in analyses[g]] for g in GROUPS}
        entry = {g: describe(values[g]) for g in GROUPS}
        spread = np.std(values["real"] + values["synthetic"])
        entry["standardised_difference"] = (
            float((np.mean(values["synthetic"]) - np.mean(values["real"])) / spread)
            if spread > 0
            else 0.0
        )
        texture[name] = entry
    matrices = {
        g: np.array([[a.texture[n] for n in TEXTURE_FEATURES] for a in analyses[g]]) for g in GROUPS
    }
    result = {
        "histogram": histogram,
        "texture": texture,
        "texture_distance": feature_distances(matrices["synthetic"], matrices["real"]),
        "model_feature_distance": None,
    }
    if analyses["synthetic"][0].model_features is not None:
        features = {g: np.stack([a.model_features for a in analyses[g]]) for g in GROUPS}
        result["model_feature_distance"] = feature_distances(
            features["synthetic"], features["real"]
        )
    return result


def slice_summary(analyses: dict[str, list[VolumeAnalysis]]) -> dict[str, Any]:
    """Adjacent-slice SSIM and NCC per group, and synthetic - real mean differences."""
    result = {}
    for key in ("slice_ssim", "slice_ncc"):
        entry = {g: describe([a.slices[key] for a in analyses[g]]) for g in GROUPS}
        entry["difference"] = entry["synthetic"]["mean"] - entry["real"]["mean"]
        result[key] = entry
    return result


def anatomy_summary(
    analyses: dict[str, list[VolumeAnalysis]], config: EvaluateConfig
) -> dict[str, Any]:
    """Plausibility checks per volume; per group the fraction passing each check."""
    ranges = real_ranges(
        [a.anatomy for a in analyses["real"]],
        config.plausible_range_margin,
        config.plausible_range_coverage,
    )
    result: dict[str, Any] = {"real_ranges": ranges, "min_main_component": MIN_MAIN_COMPONENT}
    result["range_coverage"] = config.plausible_range_coverage
    for group in GROUPS:
        checks = []
        for analysis in analyses[group]:
            analysis.anatomy["checks"] = plausibility(analysis.anatomy, ranges)
            checks.append(analysis.anatomy["checks"])
        # a check that does not apply (None: no tumor predicted) is left out, not passed
        result[group] = {name: _applicable_mean([c[name] for c in checks]) for name in checks[0]}
    return result


def _applicable_mean(values: list[bool | None]) -> float | None:
    applicable = [float(v) for v in values if v is not None]
    return float(np.mean(applicable)) if applicable else None


def diversity_summary(
    analyses: dict[str, list[VolumeAnalysis]], config: EvaluateConfig, seed: int, task
) -> dict[str, Any]:
    """MS-SSIM among each group, nearest real per synthetic volume, near-copy flags."""
    stacks = {g: np.stack([a.compare for a in analyses[g]]) for g in GROUPS}
    result: dict[str, Any] = {
        g: describe(pairwise_ms_ssim(stacks[g], config.max_pairs, seed).tolist()) for g in GROUPS
    }
    real_ids = [a.case_id for a in analyses["real"]]
    for analysis in analyses["synthetic"]:
        values = ms_ssim(analysis.compare, stacks["real"])
        best = int(np.argmax(values))
        analysis.nearest = {
            "nearest_real": real_ids[best],
            "nearest_real_ms_ssim": float(values[best]),
            "near_copy": bool(values[best] > config.near_copy_msssim),
        }
        task.advance(1)
    # Reference: how close real patients come to each other (nearest other real volume).
    for index, analysis in enumerate(analyses["real"]):
        if len(real_ids) > 1:
            others = np.delete(stacks["real"], index, axis=0)
            values = ms_ssim(analysis.compare, others)
            other_ids = [c for i, c in enumerate(real_ids) if i != index]
            best = int(np.argmax(values))
            analysis.nearest = {
                "nearest_real": other_ids[best],
                "nearest_real_ms_ssim": float(values[best]),
                "near_copy": None,
            }
    nearest = {
        g: describe([a.nearest.get("nearest_real_ms_ssim") for a in analyses[g]]) for g in GROUPS
    }
    result["nearest_real"] = nearest
    result["near_copy_threshold"] = config.near_copy_msssim
    result["near_copies"] = [
        {"case_id": a.case_id, **a.nearest} for a in analyses["synthetic"] if a.nearest["near_copy"]
    ]
    return result


def write_figures(
    analyses: dict[str, list[VolumeAnalysis]],
    summary: dict[str, Any],
    config: EvaluateConfig,
    out_dir: Path,
) -> dict[str, str]:
    """Montage of synthetic next to real volumes and the distribution plots; returns file names."""
    rows = [(f"{a.group}: {a.case_id}", a.views) for g in GROUPS for a in analyses[g] if a.views]
    figures.montage(rows, out_dir / "montage.png", MONTAGE_TILE)
    histogram = summary["appearance"]["histogram"]
    centres = np.array(histogram["bin_centres_hu"])
    figures.line_plot(
        out_dir / "hu_histogram.png",
        "HU inside the body (fraction of voxels per bin)",
        "HU",
        {g: (centres, np.array(histogram["pooled"][g])) for g in GROUPS},
    )
    figures.strip_plot(
        out_dir / "slice_consistency.png",
        "Adjacent-slice SSIM per volume (bar: mean)",
        "SSIM between axial slices z and z+1",
        {g: [a.slices["slice_ssim"] for a in analyses[g]] for g in GROUPS},
    )
    figures.strip_plot(
        out_dir / "nearest_real.png",
        "MS-SSIM to the nearest real volume (real: nearest other real)",
        f"MS-SSIM (near-copy above {config.near_copy_msssim:g})",
        {g: [a.nearest["nearest_real_ms_ssim"] for a in analyses[g] if a.nearest] for g in GROUPS},
    )
    return {
        "montage": "montage.png",
        "hu_histogram": "hu_histogram.png",
        "slice_consistency": "slice_consistency.png",
        "nearest_real": "nearest_real.png",
    }


def volumes_csv(analyses: dict[str, list[VolumeAnalysis]]) -> str:
    """One row per volume: texture features, slice consistency, nearest real, anatomy, and for a
    sample with a generated label map whether ``sample`` found it plausible and the segmenter's
    Dice against it (``label_*``: which pairs a segmenter trained on real scans agrees with)."""
    columns = [
        "group",
        "case_id",
        *TEXTURE_FEATURES,
        "slice_ssim",
        "slice_ncc",
        "nearest_real",
        "nearest_real_ms_ssim",
        "near_copy",
        *ANATOMY_FIELDS,
        "plausible",
        "label_plausible",
        "label_dice_wall",
        "label_dice_tumor",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for group in GROUPS:
        for a in analyses[group]:
            row: dict[str, Any] = {"group": group, "case_id": a.case_id}
            row.update(a.texture)
            row.update(a.slices)
            row.update(a.nearest)
            if a.anatomy is not None:
                row.update({k: a.anatomy[k] for k in ANATOMY_FIELDS})
                row["plausible"] = a.anatomy["checks"]["plausible"]
            if a.paired is not None:
                row.update({f"label_{k}": v for k, v in a.paired.items()})
            writer.writerow(
                {
                    k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v)
                    for k, v in row.items()
                }
            )
    return buffer.getvalue()


def _f(value: float | None, digits: int = 3) -> str:
    value = clean(value)
    return "–" if value is None else f"{value:.{digits}f}"


def _range(values: list[float] | None) -> str:
    return "–" if not values else f"{values[0]:.1f}–{values[1]:.1f}"


def _mean_sd(stats: dict[str, Any], digits: int = 3) -> str:
    return f"{_f(stats['mean'], digits)} ± {_f(stats['std'], digits)} (n={stats['n']})"


def _ranges_rule(coverage: float | None) -> str:
    widened = "the real volumes' [min, max] widened"
    if coverage is None:
        return widened
    return f"{widened}, joined with the {coverage:.0%} prediction interval of a new real volume"


def render_report(summary: dict[str, Any]) -> str:
    """The Markdown report of a generated-volume evaluation (figures linked relatively)."""
    counts = summary["counts"]
    appearance = summary["appearance"]
    histogram = appearance["histogram"]
    lines = [
        "# Generated-volume evaluation",
        "",
        f"{counts['synthetic']} synthetic volumes (`{summary['synthetic']}`) against "
        f"{counts['real']} real volumes (`{summary['real']}`, {summary['real_kind']}). "
        f"HU clipped to {summary['hu_range']}; similarity measures on the grid "
        f"{summary['comparison_grid']} (X, Y, Z); {summary['resampled_volumes']} volume(s) "
        f"resampled to the synthetic grid {summary['native_grid']}.",
        "",
        "![synthetic and real volumes](montage.png)",
        "",
        "## 1. Realistic appearance",
        "",
        f"- HU histogram inside the body, pooled: Wasserstein-1 **{_f(histogram['wasserstein_hu'], 1)} HU**"
        f", Jensen–Shannon distance **{_f(histogram['jensen_shannon'])}**. Reference: a real volume "
        f"against the other real volumes, Wasserstein-1 "
        f"{_f(histogram['real_leave_one_out_wasserstein_hu'], 1)} HU.",
        f"- Texture-feature distribution distance (standardised by the real set): MMD² "
        f"**{_f(appearance['texture_distance']['mmd2'], 4)}**, Fréchet "
        f"**{_f(appearance['texture_distance']['frechet'], 2)}**.",
    ]
    model = appearance["model_feature_distance"]
    if model is None:
        lines.append("- Segmentation-network feature distance: not computed (no `--seg-model`).")
    else:
        lines.append(
            f"- Segmentation-network feature distance: MMD² **{_f(model['mmd2'], 4)}**, "
            f"Fréchet **{_f(model['frechet'], 2)}**."
        )
    lines += [
        "",
        "![HU histograms](hu_histogram.png)",
        "",
        "| feature | synthetic mean ± sd | real mean ± sd | standardised difference |",
        "|---|---|---|---|",
    ]
    for name, entry in appearance["texture"].items():
        lines.append(
            f"| {name} | {_mean_sd(entry['synthetic'], 2)} | {_mean_sd(entry['real'], 2)} | "
            f"{_f(entry['standardised_difference'], 2)} |"
        )
    slices = summary["slice_consistency"]
    lines += [
        "",
        "## 2. Consistency between slices",
        "",
        "Similarity of each axial slice with the next, averaged over the volume.",
        "",
        "| measure | synthetic | real | synthetic − real |",
        "|---|---|---|---|",
    ]
    for key, label in (("slice_ssim", "SSIM"), ("slice_ncc", "NCC")):
        entry = slices[key]
        lines.append(
            f"| {label} | {_mean_sd(entry['synthetic'])} | {_mean_sd(entry['real'])} | "
            f"{_f(entry['difference'])} |"
        )
    lines += [
        "",
        "![slice consistency](slice_consistency.png)",
        "",
        "## 3. Anatomical correctness",
        "",
    ]
    anatomy = summary["anatomy"]
    if anatomy is None:
        lines.append("Not checked: needs a trained segmentation model (`--seg-model RUN`).")
    else:
        ranges = anatomy["real_ranges"]
        lines += [
            f"Segmentation model: `{summary['seg_model']}`. Fraction of volumes passing each "
            "check on the model's segmentation (only as good as the model: compare with the real "
            f"column). Real ranges ({_ranges_rule(anatomy.get('range_coverage'))}): wall "
            f"thickness {_range(ranges.get('wall_thickness_mm'))} mm, bladder volume "
            f"{_range(ranges.get('bladder_ml'))} ml.",
            "",
            "| check | synthetic | real |",
            "|---|---|---|",
        ]
        for check in anatomy["synthetic"]:
            lines.append(
                f"| {check} | {_f(anatomy['synthetic'][check], 2)} | "
                f"{_f(anatomy['real'][check], 2)} |"
            )
    paired = summary.get("paired_labels")
    if paired is not None:
        lines += [
            "",
            f"Generated label maps ({paired['pairs']} samples): plausible (every anatomy check "
            f"against the training labels' ranges) {_f(paired['plausible_fraction'], 2)}; the "
            "segmentation model on the generated images against the generated labels: wall Dice "
            f"{_f(paired['segmenter_dice_wall'])}, tumor Dice {_f(paired['segmenter_dice_tumor'])}.",
        ]
    diversity = summary["diversity"]
    lines += [
        "",
        "## 4. Diversity and memorisation",
        "",
        "3D MS-SSIM between volumes (lower: more diverse). Medical Diffusion reports 0.744 between "
        "real brain MRI pairs, a different organ and modality.",
        "",
        "| pairs | MS-SSIM |",
        "|---|---|",
        f"| synthetic–synthetic | {_mean_sd(diversity['synthetic'])} |",
        f"| real–real | {_mean_sd(diversity['real'])} |",
        f"| synthetic → nearest real | {_mean_sd(diversity['nearest_real']['synthetic'])} |",
        f"| real → nearest other real | {_mean_sd(diversity['nearest_real']['real'])} |",
        "",
        f"Near-copies (MS-SSIM to a real volume above {diversity['near_copy_threshold']:g}): "
        f"**{len(diversity['near_copies'])}**"
        + (
            ": "
            + ", ".join(f"{c['case_id']} ≈ {c['nearest_real']}" for c in diversity["near_copies"])
            if diversity["near_copies"]
            else "."
        ),
        "",
        "![nearest real](nearest_real.png)",
    ]
    return "\n".join(lines) + "\n"
