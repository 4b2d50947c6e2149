"""Small statistics shared by the evaluation reports: summaries and a seeded paired bootstrap."""

from __future__ import annotations

import math

import numpy as np


def finite(values: list[float | None]) -> np.ndarray:
    """The finite values of a list (None and NaN dropped) as float64."""
    array = np.array([v for v in values if v is not None], dtype=np.float64)
    return array[np.isfinite(array)]


def describe(values: list[float | None]) -> dict[str, float | int | None]:
    """n, mean, std (sample, ddof=1), median, min, max of the finite values (None when n = 0)."""
    array = finite(values)
    if array.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {
        "n": int(array.size),
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def bootstrap_mean_ci(
    differences: np.ndarray, samples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired ``differences`` (cases resampled with
    replacement, ``samples`` times, seeded). Returns (low, high)."""
    rng = np.random.default_rng(seed)
    differences = np.asarray(differences, dtype=np.float64)
    indices = rng.integers(0, differences.size, size=(samples, differences.size))
    means = differences[indices].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def clean(value: float | None) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
