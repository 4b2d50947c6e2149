"""Appearance: HU histograms and texture statistics inside the body, and distances between the
synthetic and real distributions of them (Wasserstein, Jensen-Shannon, MMD, Fréchet).

Volumes are HU arrays of shape (X, Y, Z), already clipped to the evaluation ``hu_range``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage, stats
from scipy.spatial.distance import jensenshannon

TEXTURE_FEATURES = (
    "mean_hu",
    "std_hu",
    "p05_hu",
    "p50_hu",
    "p95_hu",
    "skewness",
    "kurtosis",
    "gradient_hu_per_mm",
    "local_std_hu",
    "entropy_bits",
    "body_fraction",
)


def body_mask(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Voxels above ``threshold_hu`` (air and the clipped window floor are outside)."""
    return hu > threshold_hu


def hu_histogram(
    hu: np.ndarray, mask: np.ndarray, hu_range: tuple[float, float], bins: int
) -> np.ndarray:
    """Normalised histogram (sums to 1; zeros if the mask is empty) of HU inside ``mask``."""
    counts, _ = np.histogram(hu[mask], bins=bins, range=hu_range)
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


def bin_centres(hu_range: tuple[float, float], bins: int) -> np.ndarray:
    """Centres (HU) of the histogram bins."""
    edges = np.linspace(hu_range[0], hu_range[1], bins + 1)
    return (edges[:-1] + edges[1:]) / 2


def texture_features(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    threshold_hu: float,
    hu_range: tuple[float, float],
    bins: int,
) -> dict[str, float]:
    """Intensity and texture statistics of one volume inside the body (names: TEXTURE_FEATURES).

    ``gradient_hu_per_mm``: mean in-plane gradient magnitude; ``local_std_hu``: mean standard
    deviation in 3x3x1 in-plane windows (noise and fine texture); ``entropy_bits``: of the body
    HU histogram.
    """
    mask = body_mask(hu, threshold_hu)
    body_fraction = float(mask.mean())
    if not mask.any():
        return {name: 0.0 for name in TEXTURE_FEATURES} | {"body_fraction": body_fraction}
    values = hu[mask].astype(np.float64)
    gx = ndimage.sobel(hu, axis=0, mode="nearest") / (8.0 * spacing[0])
    gy = ndimage.sobel(hu, axis=1, mode="nearest") / (8.0 * spacing[1])
    gradient = np.sqrt(gx**2 + gy**2)
    local_mean = ndimage.uniform_filter(hu, size=(3, 3, 1), mode="nearest")
    local_sq = ndimage.uniform_filter(hu.astype(np.float64) ** 2, size=(3, 3, 1), mode="nearest")
    local_std = np.sqrt(np.maximum(local_sq - local_mean.astype(np.float64) ** 2, 0.0))
    histogram = hu_histogram(hu, mask, hu_range, bins)
    nonzero = histogram[histogram > 0]
    std = float(values.std())
    return {
        "mean_hu": float(values.mean()),
        "std_hu": std,
        "p05_hu": float(np.percentile(values, 5)),
        "p50_hu": float(np.percentile(values, 50)),
        "p95_hu": float(np.percentile(values, 95)),
        "skewness": float(stats.skew(values)) if std > 0 else 0.0,
        "kurtosis": float(stats.kurtosis(values)) if std > 0 else 0.0,
        "gradient_hu_per_mm": float(gradient[mask].mean()),
        "local_std_hu": float(local_std[mask].mean()),
        "entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
        "body_fraction": body_fraction,
    }


def histogram_distances(
    synthetic: np.ndarray, real: np.ndarray, centres: np.ndarray
) -> dict[str, float]:
    """Distances between two normalised histograms over the same bins: Wasserstein-1 in HU and
    Jensen-Shannon distance (base 2, in [0, 1])."""
    return {
        "wasserstein_hu": float(stats.wasserstein_distance(centres, centres, synthetic, real)),
        "jensen_shannon": float(jensenshannon(synthetic, real, base=2)),
    }


def standardise(synthetic: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale (N, F) feature matrices by the real set's mean and std (std 0 -> 1)."""
    mean = real.mean(axis=0)
    std = real.std(axis=0)
    std[std == 0] = 1.0
    return (synthetic - mean) / std, (real - mean) / std


def mmd_rbf(a: np.ndarray, b: np.ndarray) -> float:
    """Squared maximum mean discrepancy (biased V-statistic: >= 0, 0 for identical sets) with a
    Gaussian kernel between (N, F) and (M, F) samples; bandwidth = median pairwise squared
    distance of the pooled samples."""
    pooled = np.concatenate([a, b])
    sq = ((pooled[:, None, :] - pooled[None, :, :]) ** 2).sum(-1)
    off_diagonal = sq[~np.eye(len(pooled), dtype=bool)]
    bandwidth = float(np.median(off_diagonal)) or 1.0
    kernel = np.exp(-sq / bandwidth)
    n = len(a)
    value = kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2.0 * kernel[:n, n:].mean()
    return max(float(value), 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (N, F) and (M, F) features (MONAI FIDMetric)."""
    import torch
    from monai.metrics import FIDMetric

    with warnings.catch_warnings():
        # fewer volumes than features gives a singular covariance; sqrtm still returns the
        # usable (approximate) root, and the docs say so
        warnings.simplefilter("ignore")
        value = FIDMetric()(
            torch.from_numpy(a.astype(np.float64)), torch.from_numpy(b.astype(np.float64))
        )
    return max(float(value), 0.0)  # sqrtm round-off can give -1e-7 for identical sets


def feature_distances(synthetic: np.ndarray, real: np.ndarray) -> dict[str, float | None]:
    """MMD² and Fréchet distance between standardised (N, F) feature sets (None if a set has < 2)."""
    if len(synthetic) < 2 or len(real) < 2:
        return {"mmd2": None, "frechet": None}
    a, b = standardise(np.asarray(synthetic, float), np.asarray(real, float))
    return {"mmd2": mmd_rbf(a, b), "frechet": frechet_distance(a, b)}
