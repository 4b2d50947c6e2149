"""Reconstruction check of a trained VQ-GAN: encode -> quantise -> decode a preprocessed set.

Reports per case and on average PSNR and SSIM (on the [-1, 1] intensities, data range 2), the
fraction of the codebook the set uses and its perplexity, next to two baselines that keep a
comparable amount of information: down- then up-sampling by the VQ-GAN's own factors, (a)
trilinear both ways and (b) box average down, trilinear up. Usable from Python (``evaluate``)
and from ``bladdergen reconstruct``.

On labeled cases it also reports what segmentation needs from the reconstruction, in HU: the mean
absolute error inside the bladder wall, inside the tumor and in the urine (the lumen: the wall's
filled axial outline minus wall and tumor), and the tumor-to-urine contrast kept (reconstructed
tumor-minus-urine HU over the true one; 1 is perfect), against the trilinear baseline; and, with a
trained label decoder, its Dice against the true labels and whether its label map passes the
anatomy plausibility check that ``sample`` applies (against the set's own label ranges). The
decoder's label maps of *real* latents are the ceiling for sampled ones: an LDM that reproduced the
real latents exactly would pass the check no more often.

With a ``segmenter`` (a segmentation model trained on real cases, ``--seg-model``) it also scores
how well the reconstruction keeps what that model reads: its wall Dice on the input and on the
reconstruction against the true labels, and on the reconstruction against the label decoder's map.
The last is the ceiling for ``evaluate gen``'s paired-label score: a segmenter that cannot find
the decoded wall in the decoded image of a *real* latent will not find it in a sampled one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bladdergen.data.dataset import PreprocessedSet
from bladdergen.data.intensity import unit_to_hu
from bladdergen.data.volumes import write_nifti
from bladdergen.errors import InputError
from bladdergen.evaluate.anatomy import Segmenter
from bladdergen.fileio import atomic_write_json, check_inside, check_output_folder, json_safe
from bladdergen.progress import SILENT, Reporter
from bladdergen.runtime import resolve_device
from bladdergen.vqgan.load import load_vqgan

DATA_RANGE = 2.0  # intensities live in [-1, 1]
SUMMARY_NAME = "reconstruct.json"
OWNED_OUTPUTS = ("images", SUMMARY_NAME)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for intensities in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """3D SSIM (MONAI, Gaussian window) of two (1, 1, X, Y, Z) volumes, data range 2.

    The window is 7 voxels, shrunk to the smallest odd size that fits a thin axis.
    """
    from monai.metrics import SSIMMetric

    smallest = min(a.shape[2:])
    win = min(7, smallest if smallest % 2 else smallest - 1)
    metric = SSIMMetric(spatial_dims=3, data_range=DATA_RANGE, win_size=max(win, 1))
    return float(metric(a.float(), b.float()).mean())


def resample_baseline(x: torch.Tensor, factors: tuple[int, int, int], mode: str) -> torch.Tensor:
    """(B, 1, X, Y, Z) -> down by ``factors`` -> trilinear back up to (X, Y, Z).

    ``mode``: ``"trilinear"`` (interpolated down-sampling) or ``"area"`` (box average down).
    """
    small = tuple(n // f for n, f in zip(x.shape[2:], factors, strict=True))
    if mode == "area":
        down = F.avg_pool3d(x, kernel_size=factors, stride=factors)
    else:
        down = F.interpolate(x, size=small, mode="trilinear", align_corners=False)
    return F.interpolate(down, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)


def reconstruct_set(
    vqgan: Path,
    data_dir: Path,
    device: str = "auto",
    out_dir: Path | None = None,
    reporter: Reporter = SILENT,
    segmenter: Segmenter | None = None,
) -> dict[str, Any]:
    """Reconstruct every case of ``data_dir`` with the VQ-GAN at ``vqgan`` (run folder or file).

    With ``out_dir``: writes ``out_dir/images/<case>.nii.gz`` (reconstructions in HU with the set's
    window, int16, input geometry) and ``out_dir/reconstruct.json`` (the returned summary; an
    infinite PSNR of an exact copy is null there). ``out_dir`` must be new, empty or an earlier
    reconstruct output. Raises InputError / CheckpointError for a bad data folder, a bad
    checkpoint, an unusable output folder, or volumes the model cannot take.
    """
    if out_dir is not None:
        check_output_folder(Path(out_dir), OWNED_OUTPUTS, "reconstruct")
    dataset = PreprocessedSet.open(Path(data_dir))
    if segmenter is not None and tuple(segmenter.window) != tuple(dataset.window):
        raise InputError(
            f"--seg-model: the segmentation model reads HU window {list(segmenter.window)}, "
            f"{data_dir} was preprocessed with {list(dataset.window)}; expected the same window"
        )
    torch_device = resolve_device(device)
    model, metadata = load_vqgan(Path(vqgan), device=torch_device)
    factors = tuple(model.config.downsample)
    counts = torch.zeros(model.config.n_codes, dtype=torch.long)
    decodes_labels = model.label_decoder is not None and bool(metadata.get("labels_trained"))
    ranges = {}
    if decodes_labels:  # the ranges train-ldm records for sample's check, from this set's labels
        from bladdergen.diffusion.train import training_anatomy_ranges

        ranges = training_anatomy_ranges(dataset)
    cases = []
    with reporter.task("reconstruct", total=len(dataset.cases)) as task:
        for case in dataset.cases:
            image = dataset.load_image(case)
            model.latent_shape(image.shape)  # InputError naming the shape if it cannot be taken
            x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(torch_device)
            with torch.no_grad():
                x_hat, indices = model.reconstruct(x)
            x_hat = x_hat.float().clamp(-1.0, 1.0)
            counts += torch.bincount(indices.flatten().cpu(), minlength=model.config.n_codes)
            trilinear = resample_baseline(x, factors, "trilinear")
            area = resample_baseline(x, factors, "area")
            record = {
                "case_id": case.case_id,
                "psnr": psnr(x_hat, x),
                "ssim": ssim(x_hat, x),
                "trilinear_psnr": psnr(trilinear, x),
                "trilinear_ssim": ssim(trilinear, x),
                "area_psnr": psnr(area, x),
                "area_ssim": ssim(area, x),
                # smoothness along Z: generated volumes can be no less smooth than this
                "slice_ssim": adjacent_slice_ssim(x_hat),
                "truth_slice_ssim": adjacent_slice_ssim(x),
            }
            if case.labeled:
                classes = dataset.load_label(case)
                truth_hu = unit_to_hu(image, dataset.window)
                for name, volume in (("", x_hat), ("trilinear_", trilinear)):
                    recon_hu = unit_to_hu(volume[0, 0].cpu().numpy(), dataset.window)
                    record |= {
                        name + k: v
                        for k, v in structure_errors(recon_hu, truth_hu, classes).items()
                    }
                predicted = None
                if decodes_labels:
                    predicted = decoded_label_map(model, indices)
                    record["label_dice_wall"] = _dice(predicted == 1, classes == 1)
                    record["label_dice_tumor"] = _dice(predicted == 2, classes == 2)
                    spacing = dataset.spacing(case)
                    record["label_plausible"] = _plausible(predicted, spacing, ranges)
                    record["label_plausible_truth"] = _plausible(classes, spacing, ranges)
                if segmenter is not None:
                    on_input = segmenter.classes(image) == 1
                    on_recon = segmenter.classes(x_hat[0, 0].cpu().numpy()) == 1
                    record["segmenter_dice_wall_input"] = _dice(on_input, classes == 1)
                    record["segmenter_dice_wall"] = _dice(on_recon, classes == 1)
                    if predicted is not None:
                        record["segmenter_dice_wall_decoded"] = _dice(on_recon, predicted == 1)
            cases.append(record)
            if out_dir is not None:
                target = check_inside(out_dir, Path(out_dir) / "images" / f"{case.case_id}.nii.gz")
                hu = unit_to_hu(x_hat[0, 0].cpu().numpy(), dataset.window)
                write_nifti(target, hu, dataset.affine(case), np.int16)
            task.advance(1, psnr=record["psnr"])
    probs = counts.double() / counts.sum()
    nonzero = probs[probs > 0]
    summary: dict[str, Any] = {
        "vqgan": metadata["path"],
        "weights_sha256": metadata.get("weights_sha256"),
        "data_dir": str(dataset.root),
        "n_cases": len(cases),
        "downsample": list(factors),
        "psnr": _mean(cases, "psnr"),
        "ssim": _mean(cases, "ssim"),
        "trilinear_psnr": _mean(cases, "trilinear_psnr"),
        "trilinear_ssim": _mean(cases, "trilinear_ssim"),
        "area_psnr": _mean(cases, "area_psnr"),
        "area_ssim": _mean(cases, "area_ssim"),
        "slice_ssim": _mean(cases, "slice_ssim"),
        "truth_slice_ssim": _mean(cases, "truth_slice_ssim"),
        "code_usage": float((counts > 0).double().mean()),
        "codes_used": int((counts > 0).sum()),
        "n_codes": model.config.n_codes,
        "perplexity": float(torch.exp(-(nonzero * nonzero.log()).sum())),
        "window_matches_training": list(dataset.window) == list(metadata.get("window", [])),
        "structures": {
            key: _mean(cases, key)
            for key in STRUCTURE_KEYS
            if any(c.get(key) is not None for c in cases)
        },
        "cases": cases,
    }
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / SUMMARY_NAME, json_safe(summary))
    return summary


STRUCTURE_KEYS = [
    prefix + key
    for key in (
        "wall_hu_error",
        "tumor_hu_error",
        "urine_hu_error",
        "tumor_urine_contrast_kept",
    )
    for prefix in ("", "trilinear_")
] + ["label_dice_wall", "label_dice_tumor", "label_plausible", "label_plausible_truth"]
STRUCTURE_KEYS += [
    "segmenter_dice_wall_input",
    "segmenter_dice_wall",
    "segmenter_dice_wall_decoded",
]


def adjacent_slice_ssim(volume: torch.Tensor) -> float:
    """Mean SSIM between adjacent axial slices of a (1, 1, X, Y, Z) volume in [-1, 1], on the
    window mapped to [0, 1] (``evaluate gen``'s measure, there on its own HU range)."""
    from bladdergen.evaluate.similarity import adjacent_slice_similarity

    unit = ((volume[0, 0].float().cpu().numpy() + 1.0) / 2.0).clip(0.0, 1.0)
    return adjacent_slice_similarity(unit)["slice_ssim"]


@torch.no_grad()
def decoded_label_map(model, indices: torch.Tensor) -> np.ndarray:
    """(X, Y, Z) uint8 classes the label decoder draws for one case's code ``indices`` (1, x, y, z)."""
    return model.decode_label_classes(model.codebook.embed(indices))[0].cpu().numpy()


def _plausible(classes: np.ndarray, spacing, ranges: dict[str, list[float]]) -> float:
    """1.0 when the (X, Y, Z) class map passes every anatomy check, else 0.0 (a mean is a rate)."""
    from bladdergen.evaluate.anatomy import measure_anatomy, plausibility

    measurement = measure_anatomy(classes, tuple(float(v) for v in spacing))
    return float(plausibility(measurement, ranges)["plausible"])


def structure_errors(
    recon_hu: np.ndarray, truth_hu: np.ndarray, classes: np.ndarray
) -> dict[str, float | None]:
    """Mean |HU error| inside wall, tumor and urine, and the tumor-to-urine contrast kept, of one
    (X, Y, Z) reconstruction against the truth; None where a structure is absent."""
    from bladdergen.data.bladder import lumen

    wall, tumor = classes == 1, classes == 2
    urine = lumen(classes)
    error = np.abs(recon_hu.astype(np.float64) - truth_hu)

    def mean(values: np.ndarray, mask: np.ndarray) -> float | None:
        return float(values[mask].mean()) if mask.any() else None

    result = {
        "wall_hu_error": mean(error, wall),
        "tumor_hu_error": mean(error, tumor),
        "urine_hu_error": mean(error, urine),
        "tumor_urine_contrast_kept": None,
    }
    if tumor.any() and urine.any():
        true_contrast = truth_hu[tumor].mean() - truth_hu[urine].mean()
        if abs(true_contrast) > 1.0:  # HU: a contrast to keep at all
            kept = recon_hu[tumor].mean() - recon_hu[urine].mean()
            result["tumor_urine_contrast_kept"] = float(kept / true_contrast)
    return result


def _dice(predicted: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (nothing to score)."""
    total = int(predicted.sum() + truth.sum())
    return None if total == 0 else 2.0 * float((predicted & truth).sum()) / total


def _mean(cases: list[dict[str, Any]], key: str) -> float | None:
    values = [c[key] for c in cases if c.get(key) is not None]
    return float(np.mean(values)) if values else None
