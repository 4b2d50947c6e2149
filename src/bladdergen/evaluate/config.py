"""Settings of ``bladdergen evaluate`` (defaults: the ``paper`` profile)."""

from __future__ import annotations

import dataclasses

from bladdergen.errors import ConfigError


@dataclasses.dataclass
class EvaluateConfig:
    """Metric settings shared by ``evaluate seg``, ``evaluate gen`` and the reader-study kit.

    The bootstrap is seeded by the pipeline ``seed``; all generated-volume measures work in HU.
    """

    # Segmentation: bootstrap resamples of the cases for paired differences between --pred sets.
    bootstrap_samples: int = 2000
    # Segmentation: confidence level of the bootstrap interval.
    confidence: float = 0.95
    # Segmentation: Hausdorff distance percentile (95 gives HD95, 100 the maximum).
    hd_percentile: float = 95.0
    # Generated volumes: HU range every volume is clipped to (raw and windowed data compare alike).
    hu_range: tuple[float, float] = (-200.0, 300.0)
    # Generated volumes: voxels above this HU are inside the body (histograms, texture).
    body_threshold_hu: float = -150.0
    # Generated volumes: HU histogram bins over hu_range.
    histogram_bins: int = 50
    # Generated volumes: in-plane grid (X, Y) for similarity measures; null keeps the native grid.
    compare_size: tuple[int, int] | None = (128, 128)
    # Generated volumes: random pairs per set for the within-set MS-SSIM (diversity).
    max_pairs: int = 200
    # Generated volumes: MS-SSIM to a real volume above which a synthetic one is a near-copy.
    near_copy_msssim: float = 0.95
    # Anatomy check: widening of the real wall-thickness and bladder-volume ranges (fraction).
    plausible_range_margin: float = 0.2
    # Anatomy check: probability that a new real volume's thickness and volume fall in the ranges
    # (log-normal prediction interval from the real volumes, joined with the widened [min, max]);
    # null keeps the widened [min, max] alone.
    plausible_range_coverage: float | None = 0.95
    # Report: volumes per group in the montage.
    montage_cases: int = 4

    def validate(self) -> None:
        if self.bootstrap_samples < 100:
            raise ConfigError(
                f"evaluate.bootstrap_samples: got {self.bootstrap_samples}, expected >= 100"
            )
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"evaluate.confidence: got {self.confidence}, expected in [0.5, 1)")
        if not 0.0 < self.hd_percentile <= 100.0:
            raise ConfigError(
                f"evaluate.hd_percentile: got {self.hd_percentile}, expected in (0, 100]"
            )
        if self.hu_range[0] >= self.hu_range[1]:
            raise ConfigError(f"evaluate.hu_range: got {list(self.hu_range)}, expected [low, high]")
        if self.histogram_bins < 2:
            raise ConfigError(f"evaluate.histogram_bins: got {self.histogram_bins}, expected >= 2")
        if self.compare_size is not None and min(self.compare_size) < 8:
            raise ConfigError(
                f"evaluate.compare_size: got {list(self.compare_size)}, expected >= 8 voxels each"
            )
        if self.max_pairs < 1:
            raise ConfigError(f"evaluate.max_pairs: got {self.max_pairs}, expected >= 1")
        if not 0.0 < self.near_copy_msssim <= 1.0:
            raise ConfigError(
                f"evaluate.near_copy_msssim: got {self.near_copy_msssim}, expected in (0, 1]"
            )
        if self.plausible_range_margin < 0:
            raise ConfigError(
                f"evaluate.plausible_range_margin: got {self.plausible_range_margin}, expected >= 0"
            )
        coverage = self.plausible_range_coverage
        if coverage is not None and not 0.0 < coverage < 1.0:
            raise ConfigError(
                f"evaluate.plausible_range_coverage: got {coverage}, expected in (0, 1) or null"
            )
        if self.montage_cases < 1:
            raise ConfigError(f"evaluate.montage_cases: got {self.montage_cases}, expected >= 1")


TINY: dict = {"bootstrap_samples": 500, "compare_size": [64, 64], "max_pairs": 50}
