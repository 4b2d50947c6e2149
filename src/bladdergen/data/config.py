"""Settings of ``bladdergen preprocess`` (defaults: the ``paper`` profile)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from bladdergen.data.dataset import DATASET_LABEL_MAP
from bladdergen.errors import ConfigError


@dataclasses.dataclass
class PhantomConfig:
    """What ``bladdergen phantom`` generates (the run's ``seed`` picks the cases).

    ``cases``: number of phantoms; ``size``: in-plane voxels (the field of view stays ~300-460 mm,
    so spacing grows as size shrinks); ``unlabeled``: the last K cases get no label file;
    ``workers``: processes (the files do not depend on it).
    """

    cases: int = 24
    size: int = 512
    unlabeled: int = 0
    workers: int = 1

    def validate(self) -> None:
        for key, low in (("cases", 1), ("size", 16), ("unlabeled", 0), ("workers", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"phantom.{key}: got {getattr(self, key)}, expected >= {low}")
        if self.unlabeled > self.cases:
            raise ConfigError(
                f"phantom.unlabeled: got {self.unlabeled}, expected at most phantom.cases "
                f"({self.cases})"
            )


PHANTOM_TINY = {"size": 128}


@dataclasses.dataclass
class PreprocessConfig:
    """How a folder of CT scans becomes a normalised training set.

    ``target_size``: in-plane voxels (X, Y) after resampling, or ``None`` to keep the scan's grid.
    ``target_depth``: axial slices after the depth policy (the paper uses 24).
    ``window``: HU range mapped linearly to [-1, 1]; values outside are clipped.
    ``label_map``: dataset label value -> class index (0 background, 1 wall, 2 tumor).
    ``depth_policy``: ``paper`` (SPEC §1.1), ``resample`` or ``crop`` (:mod:`bladdergen.data.depth`).
    ``image_dtype``: ``float16`` halves the image files; NIfTI has no float16 type, so they hold
    16-bit integers with a 1/32767 scale factor (readers get floats back).
    ``workers``: processes over cases (``--workers``); it does not change the output.
    ``crop_mm``: keep only the central (X, Y) millimetres in-plane before resampling (the bladder
    sits near the middle of a pelvic slice), so a small grid still resolves a 2-5 mm wall; ``None``
    keeps the whole field of view. ``segment`` puts background back outside the crop.
    ``z_range``: keep only part of a long scan (e.g. the bladder slab of a chest-abdomen-pelvis
    CT) before the depth policy: ``[low, high]`` in ``z_range_unit`` ``mm`` (world z of the slice
    centres, RAS: inferior -> superior, inclusive) or ``slices`` (0-based indices of the
    reoriented stack, inferior first, inclusive); ``None`` keeps every slice. ``segment`` writes
    background outside the range.
    """

    target_size: tuple[int, int] | None = (512, 512)
    crop_mm: tuple[float, float] | None = None
    target_spacing: tuple[float, float] | None = None
    target_depth: int = 24
    depth_policy: Literal["paper", "resample", "crop"] = "paper"
    window: tuple[float, float] = (-200.0, 300.0)
    orientation: Literal["RAS", "LPS"] = "RAS"
    label_map: dict[int, int] = dataclasses.field(default_factory=lambda: dict(DATASET_LABEL_MAP))
    image_dtype: Literal["float32", "float16"] = "float32"
    z_range: tuple[float, float] | None = None
    z_range_unit: Literal["mm", "slices"] = "mm"
    workers: int = 1

    def validate(self) -> None:
        if self.target_depth < 1:
            raise ConfigError(f"preprocess.target_depth: got {self.target_depth}, expected >= 1")
        if self.window[0] >= self.window[1]:
            raise ConfigError(f"preprocess.window: got {list(self.window)}, expected [low, high]")
        if self.workers < 1:
            raise ConfigError(f"preprocess.workers: got {self.workers}, expected >= 1")
        if self.target_size is not None and self.target_spacing is not None:
            raise ConfigError("preprocess: set target_size or target_spacing, not both")
        if self.crop_mm is not None and min(self.crop_mm) <= 0:
            raise ConfigError(f"preprocess.crop_mm: got {list(self.crop_mm)}, expected > 0 mm")
        if self.z_range_unit not in ("mm", "slices"):
            raise ConfigError(
                f"preprocess.z_range_unit: got {self.z_range_unit!r}, expected 'mm' or 'slices'"
            )
        if self.z_range is not None:
            low, high = self.z_range
            if low > high:
                raise ConfigError(
                    f"preprocess.z_range: got {list(self.z_range)}, expected [low, high] with "
                    "low <= high"
                )
            if self.z_range_unit == "slices" and (low < 0 or low != int(low) or high != int(high)):
                raise ConfigError(
                    f"preprocess.z_range: got {list(self.z_range)} slices, expected whole "
                    "slice indices >= 0"
                )
        if sorted(set(self.label_map.values())) != [0, 1, 2]:
            raise ConfigError(
                f"preprocess.label_map: got {self.label_map}, expected values 0, 1 and 2 "
                "(background, wall, tumor)"
            )


# 64x64 over the central 192 mm: 3 mm voxels, so the bladder wall stays visible on CPU budgets.
TINY = {"target_size": [64, 64], "crop_mm": [192.0, 192.0]}
