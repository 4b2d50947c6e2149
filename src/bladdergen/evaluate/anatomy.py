"""Anatomy plausibility of a volume from a trained segmentation model, and the model adapter.

A bladder is *plausible* when the predicted wall is one connected piece (its largest component
holds at least ``MIN_MAIN_COMPONENT`` of the wall voxels), it encloses a lumen in the axial slices,
its wall thickness and its volume lie within the range measured the same way on the real volumes
(:func:`real_ranges`: where a new real volume lies with 95 % probability), and every tumor piece
touches the wall and lies in the bladder: it borders the lumen or sits within the wall, not only
on the wall's outside (bladder tumors grow from the urothelium, the inner surface). Per piece,
because a rule over all tumor voxels at once let a second tumor on the skin through whenever
another one sat on the bladder wall (docs/benchmarks.md, "The LDM's training seed"). Wall and
tumor are taken together as the bladder's tissue: a tumor often replaces the wall's whole
thickness (transmural), so the outline of the wall alone is open there and the wall alone falls
apart into pieces; measured that way, a third of the real phantoms' label maps failed. The check
is only as good as the model: an under-trained model mislabels real and synthetic volumes alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy import ndimage, stats

from bladdergen.data.bladder import filled_bladder
from bladdergen.errors import InputError

MIN_MAIN_COMPONENT = 0.9
# a new real volume's thickness and volume lie in real_ranges' range with this probability
RANGE_COVERAGE = 0.95
ANATOMY_FIELDS = (
    "wall_voxels",
    "wall_main_component",
    "lumen_ml",
    "bladder_ml",
    "wall_thickness_mm",
    "tumor_voxels",
    "tumor_touches_wall",
    "tumor_touches_lumen",
    "tumor_touches_outside",
    "tumor_pieces",
    "tumor_pieces_off_wall",
    "tumor_pieces_outside_bladder",
)


class Segmenter(Protocol):
    """What ``evaluate gen`` needs from a segmentation model."""

    window: tuple[float, float]

    def classes(self, image: np.ndarray) -> np.ndarray:
        """(X, Y, Z) image in [-1, 1] -> (X, Y, Z) class indices (0 bg, 1 wall, 2 tumor)."""

    def features(self, image: np.ndarray) -> np.ndarray:
        """(X, Y, Z) image in [-1, 1] -> (F,) feature vector."""


class DeepAtlasSegmenter:
    """Adapter over ``bladdergen.deepatlas.segment``'s model functions (CPU or GPU)."""

    def __init__(self, net: Any, metadata: dict[str, Any], window: tuple[float, float], device):
        self.net = net
        self.metadata = metadata
        self.window = window
        self.device = device

    def _tensor(self, image: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(
            self.device
        )

    def classes(self, image: np.ndarray) -> np.ndarray:
        import torch

        from bladdergen.deepatlas.segment import predict_classes

        with torch.no_grad():
            out = predict_classes(self.net, self._tensor(image))
        return np.asarray(out.cpu() if hasattr(out, "cpu") else out).astype(np.uint8)

    def features(self, image: np.ndarray) -> np.ndarray:
        import torch

        from bladdergen.deepatlas.segment import segmentation_features

        with torch.no_grad():
            out = segmentation_features(self.net, self._tensor(image))
        return np.asarray(out.cpu() if hasattr(out, "cpu") else out, dtype=np.float64).reshape(-1)


def load_segmenter(path: Path, device: str, default_window: tuple[float, float]) -> Segmenter:
    """Load a trained segmentation model (run folder or checkpoint) through the DeepAtlas stage.

    The HU window comes from the checkpoint metadata when it records one, else ``default_window``.
    """
    try:
        from bladdergen.deepatlas.segment import load_segmentation_model
    except ImportError as error:
        raise InputError(
            f"--seg-model {path}: this installation has no segmentation model loader "
            f"(bladdergen.deepatlas.segment: {error}); run without --seg-model"
        ) from None

    from bladdergen.runtime import resolve_device

    torch_device = resolve_device(device)
    net, metadata = load_segmentation_model(path, torch_device)
    window = metadata.get("window") if isinstance(metadata, dict) else None
    if window is None and isinstance(metadata, dict):
        window = (metadata.get("config", {}).get("preprocess", {}) or {}).get("window")
    window = tuple(float(w) for w in (window or default_window))
    return DeepAtlasSegmenter(
        net, metadata if isinstance(metadata, dict) else {}, window, torch_device
    )


def measure_anatomy(classes: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, Any]:
    """Bladder measurements of one (X, Y, Z) class map; ``spacing`` in mm.

    ``wall_main_component``: fraction of wall voxels in the largest 26-connected piece of wall and
    tumor together;
    ``lumen_ml``: the urine, the axial-slice holes enclosed by wall and tumor together, in ml;
    ``bladder_ml``: wall + tumor + lumen; ``wall_thickness_mm``: in-plane thickness from the wall's
    distance-transform ridge (2 x ridge distance - one voxel); ``tumor_touches_wall``,
    ``tumor_touches_lumen`` and ``tumor_touches_outside``: a tumor voxel is 26-adjacent to a wall
    voxel, a lumen voxel, or a voxel outside the bladder's filled outline (None when there is no
    tumor); ``tumor_pieces``: 26-connected pieces of tumor, ``tumor_pieces_off_wall`` how many of
    them touch no wall voxel, ``tumor_pieces_outside_bladder`` how many neither border the lumen
    nor stay inside the bladder's filled outline (the plausibility checks read these two).
    """
    classes = _around_foreground(np.asarray(classes))
    wall = classes == 1
    tumor = classes == 2
    voxel_ml = float(np.prod(spacing)) / 1000.0
    result: dict[str, Any] = {
        "wall_voxels": int(wall.sum()),
        "wall_main_component": 0.0,
        "lumen_ml": 0.0,
        "bladder_ml": 0.0,
        "wall_thickness_mm": None,
        "tumor_voxels": int(tumor.sum()),
        "tumor_touches_wall": None,
        "tumor_touches_lumen": None,
        "tumor_touches_outside": None,
        "tumor_pieces": 0,
        "tumor_pieces_off_wall": 0,
        "tumor_pieces_outside_bladder": 0,
    }
    neighbours = np.ones((3, 3, 3), bool)
    if tumor.any():
        near_wall = ndimage.binary_dilation(wall, structure=neighbours)
        result["tumor_touches_wall"] = bool((tumor & near_wall).any())
        result["tumor_touches_lumen"] = False  # replaced below when wall and tumor enclose urine
        result["tumor_touches_outside"] = True
        pieces, n_pieces = ndimage.label(tumor, structure=neighbours)
        result["tumor_pieces"] = n_pieces
        on_wall = np.unique(pieces[tumor & near_wall])  # labels of the pieces touching the wall
        result["tumor_pieces_off_wall"] = n_pieces - len(on_wall)
        result["tumor_pieces_outside_bladder"] = n_pieces  # replaced below when there is a wall
    if not wall.any():
        return result
    components, _ = ndimage.label(wall | tumor, structure=neighbours)
    wall_per_piece = np.bincount(components[wall], minlength=components.max() + 1)[1:]
    result["wall_main_component"] = float(wall_per_piece.max() / wall_per_piece.sum())
    filled = filled_bladder(classes)  # a slice of tumor alone is bladder tissue too
    ridges = []
    in_plane = (spacing[0], spacing[1])
    for z in range(wall.shape[2]):
        wall_slice = wall[:, :, z]
        if not wall_slice.any():
            continue
        distance = ndimage.distance_transform_edt(wall_slice, sampling=in_plane)
        ridge = wall_slice & (distance == ndimage.maximum_filter(distance, size=3))
        ridges.append(distance[ridge])
    lumen = filled & ~wall & ~tumor
    result["lumen_ml"] = float(lumen.sum()) * voxel_ml
    result["bladder_ml"] = float(filled.sum()) * voxel_ml
    if tumor.any():
        near_lumen = ndimage.binary_dilation(lumen, structure=neighbours)
        result["tumor_touches_lumen"] = bool((tumor & near_lumen).any())
        near_outside = ndimage.binary_dilation(~filled, structure=neighbours)
        result["tumor_touches_outside"] = bool((tumor & near_outside).any())
        # a piece is in the bladder when it borders the urine or touches nothing outside
        by_lumen = set(np.unique(pieces[tumor & near_lumen]).tolist())
        by_outside = set(np.unique(pieces[tumor & near_outside]).tolist())
        in_bladder = (set(range(1, n_pieces + 1)) - by_outside) | by_lumen
        result["tumor_pieces_outside_bladder"] = n_pieces - len(in_bladder)
    ridge_values = np.concatenate(ridges)
    result["wall_thickness_mm"] = float(2.0 * ridge_values.mean() - np.mean(in_plane))
    return result


def _around_foreground(classes: np.ndarray, margin: int = 2) -> np.ndarray:
    """The in-plane bounding box of the labelled voxels plus ``margin`` background voxels, all
    slices: every measurement above is the same on it (hole filling, distance transforms and
    26-connectivity only look across background, which the margin keeps), and at 512x512 it is
    ~50x less work, since the bladder is a small part of a pelvic slice."""
    in_plane = np.argwhere((classes > 0).any(axis=2))
    if len(in_plane) == 0:
        return classes
    low = np.maximum(in_plane.min(axis=0) - margin, 0)
    high = in_plane.max(axis=0) + margin + 1
    return classes[low[0] : high[0], low[1] : high[1], :]


def real_ranges(
    measurements: list[dict[str, Any]], margin: float, coverage: float | None = RANGE_COVERAGE
) -> dict[str, list[float]]:
    """[low, high] of wall thickness and bladder volume over the real volumes with a wall, for a
    new real volume. Empty dict when no real volume has a wall.

    Per measure, the wider of two ranges: the observed [min, max] widened by ``margin`` x the value
    at each end, and (``coverage`` not None, at least 2 volumes) the prediction interval that holds
    one new volume's value with probability ``coverage`` under a log-normal fit,
    exp(m ± t·s·sqrt(1 + 1/n)) with m and s the mean and standard deviation of the n logs and t
    Student's quantile at (1 + coverage) / 2 with n − 1 degrees of freedom.

    Why both: a new volume lies within n volumes' [min, max] with probability (n − 1) / (n + 1)
    only, 5/7 for 6 labeled cases, so the min-max range rejects real anatomy by construction (8 of
    40 held-out phantoms' true label maps failed the volume range of 6 training phantoms,
    docs/benchmarks.md); the interval widens with the spread and the fewness of the cases. The
    margin keeps cases that happen to cluster (a small s by chance) from giving too narrow an
    interval. Logs, because both measures are positive and vary by factors (a bladder fills).
    """
    ranges = {}
    for key in ("wall_thickness_mm", "bladder_ml"):
        values = [m[key] for m in measurements if m["wall_voxels"] and m[key] is not None]
        if not values:
            continue
        low, high = min(values) * (1 - margin), max(values) * (1 + margin)
        if coverage is not None and len(values) >= 2 and min(values) > 0:
            logs = np.log(values)
            n = len(logs)
            half = stats.t.ppf((1 + coverage) / 2, n - 1) * logs.std(ddof=1) * np.sqrt(1 + 1 / n)
            low = min(low, float(np.exp(logs.mean() - half)))
            high = max(high, float(np.exp(logs.mean() + half)))
        ranges[key] = [low, high]
    return ranges


def plausibility(
    measurement: dict[str, Any], ranges: dict[str, list[float]], tumor_per_piece: bool = True
) -> dict[str, Any]:
    """The individual checks and their conjunction ``plausible`` for one measured volume.

    The tumor checks are ``None`` (n/a, not a pass) when no tumor is predicted; ``plausible`` is
    the conjunction of the checks that apply. ``tumor_per_piece`` False judges the tumor voxels
    as a whole instead: some touch the wall, and some border the lumen or none touches the
    outside of the bladder. DeepAtlas's synthetic filter uses that, because its segmenter's own
    stray tumor specks fail the per-piece rule on real scans too and the filter measured worse
    with it (docs/benchmarks.md, "The synthetic filter under the per-piece check").
    """
    no_tumor = measurement["tumor_voxels"] == 0
    if tumor_per_piece:
        on_wall = measurement["tumor_pieces_off_wall"] == 0
        in_bladder = measurement["tumor_pieces_outside_bladder"] == 0
    else:
        on_wall = bool(measurement["tumor_touches_wall"])
        in_bladder = bool(
            measurement["tumor_touches_lumen"] or not measurement["tumor_touches_outside"]
        )
    checks = {
        "has_wall": measurement["wall_voxels"] > 0,
        "one_connected_wall": measurement["wall_main_component"] >= MIN_MAIN_COMPONENT,
        "encloses_lumen": measurement["lumen_ml"] > 0,
        "tumor_on_wall": None if no_tumor else on_wall,
        "tumor_in_bladder": None if no_tumor else in_bladder,
    }
    for key, check in (
        ("wall_thickness_mm", "thickness_in_range"),
        ("bladder_ml", "volume_in_range"),
    ):
        value = measurement[key]
        low, high = ranges.get(key, [-np.inf, np.inf])
        checks[check] = value is not None and low <= value <= high
    checks["plausible"] = all(v for v in checks.values() if v is not None)
    return checks
