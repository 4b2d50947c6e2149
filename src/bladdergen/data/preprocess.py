"""The preprocessing steps for one scan, shared by ``preprocess``, ``segment`` and the sample pool.

One image goes through, in this order (each step recorded in ``PreparedImage.record``):

1. **reorient** the index axes to the canonical orientation (RAS by default; nibabel orientations,
   so only axis permutations and flips, no interpolation);
2. an optional **z-range** cut to the slab of interest (``z_range``, mm or slices), then an
   optional central in-plane crop (``crop_mm``);
3. **in-plane resampling** (X, Y) to ``target_size`` voxels or ``target_spacing`` mm, the field of
   view kept corner to corner (linear with antialiasing for images, nearest for labels);
4. the **depth policy** to ``target_depth`` slices (:mod:`bladdergen.data.depth`);
5. **intensity**: HU -> [-1, 1] through the window (:func:`bladdergen.data.intensity.hu_to_unit`).

A label goes through the same geometric steps with nearest-neighbour choices
(:func:`prepare_label`), and its values are mapped to classes 0/1/2 with the configured label map.
:func:`restore_label` undoes the geometry, so a class map predicted on the preprocessed grid goes
back onto the original scan's voxel grid.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bladdergen.data.config import PreprocessConfig
from bladdergen.data.depth import DepthPlan, apply_depth, invert_depth
from bladdergen.data.intensity import hu_to_unit
from bladdergen.data.volumes import Volume
from bladdergen.errors import InputError

RECORD_VERSION = 1


@dataclasses.dataclass
class PreparedImage:
    """An image on the preprocessed grid.

    ``image``: float32 (X, Y, Z) in [-1, 1]. ``affine``: 4x4 voxel -> world (RAS mm) of that grid.
    ``record``: JSON-able dict of every step (see :func:`prepare_image`); pass it to
    :func:`prepare_label` and :func:`restore_label`.
    """

    image: np.ndarray
    affine: np.ndarray
    record: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Geometry helpers


def _spacing(affine: np.ndarray) -> list[float]:
    return [float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)]


def _axcodes(affine: np.ndarray) -> str:
    return "".join(str(c) for c in nib.orientations.aff2axcodes(np.asarray(affine)))


def _corner_index_map(n_in: tuple[int, int], n_out: tuple[int, int]) -> np.ndarray:
    """4x4 matrix: output (X, Y) voxel index -> input index, fields of view aligned at the corners."""
    matrix = np.eye(4)
    for axis in (0, 1):
        scale = n_in[axis] / n_out[axis]
        matrix[axis, axis] = scale
        matrix[axis, 3] = 0.5 * scale - 0.5
    return matrix


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """For each output voxel, the input voxel containing its centre (corner-aligned grids)."""
    return (2 * np.arange(n_out) + 1) * n_in // (2 * n_out)


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of linear interpolation between corner-aligned grids.

    A triangle kernel, widened by the shrink factor when shrinking so every input voxel
    contributes (antialiasing, as PIL and torch's ``antialias=True`` do); rows sum to 1.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale  # output centres in input units (voxel j: j+0.5)
    offsets = (np.arange(n_in) + 0.5)[None, :] - centres[:, None]
    weights = np.clip(1.0 - np.abs(offsets) / support, 0.0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _resample_inplane_linear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Linear (X, Y) resampling of a float32 (X, Y, Z) volume, antialiased when shrinking.

    Separable: two matrix products with :func:`_linear_weights`, one per in-plane axis.
    """
    wx = _linear_weights(array.shape[0], size[0])
    wy = _linear_weights(array.shape[1], size[1])
    out = np.tensordot(wx, array, axes=(1, 0))  # (X', Y, Z)
    out = np.tensordot(wy, out, axes=(1, 1))  # (Y', X', Z)
    return np.ascontiguousarray(out.transpose(1, 0, 2), dtype=np.float32)


def _resample_inplane_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    ix = _nearest_index(array.shape[0], size[0])
    iy = _nearest_index(array.shape[1], size[1])
    return np.ascontiguousarray(array[ix][:, iy])


def _central_crop(
    shape: tuple[int, int], spacing: list[float], config: PreprocessConfig
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Start index and shape (X, Y) of the central ``config.crop_mm`` window (whole grid if None).

    A window wider than the scan keeps the whole axis; the crop never pads.
    """
    if config.crop_mm is None:
        return (0, 0), (int(shape[0]), int(shape[1]))
    starts, sizes = [], []
    for n, s, mm in zip(shape, spacing, config.crop_mm, strict=True):
        keep = min(int(n), max(1, int(round(mm / s))))
        starts.append((int(n) - keep) // 2)
        sizes.append(keep)
    return (starts[0], starts[1]), (sizes[0], sizes[1])


def _z_range(
    affine: np.ndarray, shape: tuple[int, ...], config: PreprocessConfig, source: Path | str
) -> tuple[int, int]:
    """(first slice, slice count) of ``config.z_range`` on a reoriented (X, Y, Z) ``shape``.

    ``mm``: the slices whose centre's world z (``affine`` row 2) lies in the range; ``slices``:
    indices, clipped to the stack. Raises InputError naming ``source`` when no slice is kept.
    """
    inplane, depth = shape[:2], int(shape[2])
    if config.z_range is None:
        return 0, depth
    low, high = config.z_range
    if config.z_range_unit == "slices":
        first, last = int(low), min(int(high), depth - 1)
        extent = f"slices 0..{depth - 1}"
    else:
        # world z of each slice's in-plane centre voxel
        centre = affine[2, :2] @ (np.asarray(inplane, dtype=np.float64) - 1) / 2 + affine[2, 3]
        z = affine[2, 2] * np.arange(depth) + centre
        inside = np.flatnonzero((z >= low - 1e-6) & (z <= high + 1e-6))
        first, last = (int(inside[0]), int(inside[-1])) if inside.size else (1, 0)
        extent = f"z {min(z[0], z[-1]):.1f}..{max(z[0], z[-1]):.1f} mm"
    if last < first:
        raise InputError(
            f"{source}: z_range {[low, high]} {config.z_range_unit} keeps no slice of the scan "
            f"({extent}), expected a range that overlaps it"
        )
    return first, last - first + 1


def _target_inplane_size(
    shape: tuple[int, int], spacing: tuple[float, float], config: PreprocessConfig
) -> tuple[int, int]:
    if config.target_size is not None:
        return (int(config.target_size[0]), int(config.target_size[1]))
    if config.target_spacing is not None:
        return tuple(
            max(1, int(round(n * s / t)))
            for n, s, t in zip(shape, spacing, config.target_spacing, strict=True)
        )
    return (int(shape[0]), int(shape[1]))


# ----------------------------------------------------------------------------------------------
# Forward steps


def prepare_image(volume: Volume, config: PreprocessConfig) -> PreparedImage:
    """Reorient, resample in-plane, apply the depth policy and window one image.

    ``volume.array``: (X, Y, Z) HU. Returns a :class:`PreparedImage` whose ``image`` has shape
    ``(*target in-plane size, config.target_depth)``, float32 in [-1, 1], and whose ``record``
    holds: original shape/spacing/orientation/affine, the orientation transform, the in-plane
    resampling, the depth plan (slices removed/padded, by index) and the HU window.
    """
    array = np.asarray(volume.array, dtype=np.float32)
    original_affine = np.asarray(volume.affine, dtype=np.float64)

    # 1. reorient (pure permutation/flip of the index axes)
    current = nib.orientations.io_orientation(original_affine)
    wanted = nib.orientations.axcodes2ornt(tuple(config.orientation))
    transform = nib.orientations.ornt_transform(current, wanted)
    array = nib.orientations.apply_orientation(array, transform)
    affine = original_affine @ nib.orientations.inv_ornt_aff(transform, volume.array.shape)
    oriented_shape = tuple(int(n) for n in array.shape)
    oriented_spacing = _spacing(affine)

    # 2a. optional z-range: the slab of interest of a long scan
    z_start, z_count = _z_range(affine, oriented_shape, config, volume.source)
    if (z_start, z_count) != (0, oriented_shape[2]):
        array = np.ascontiguousarray(array[:, :, z_start : z_start + z_count])
        shift = np.eye(4)
        shift[2, 3] = z_start
        affine = affine @ shift

    # 2. optional central field-of-view crop, then in-plane resampling
    crop_start, cropped_shape = _central_crop(oriented_shape[:2], oriented_spacing[:2], config)
    if cropped_shape != oriented_shape[:2]:
        (x0, y0), (nx, ny) = crop_start, cropped_shape
        array = np.ascontiguousarray(array[x0 : x0 + nx, y0 : y0 + ny])
        shift = np.eye(4)
        shift[:2, 3] = crop_start
        affine = affine @ shift
    size = _target_inplane_size(cropped_shape, oriented_spacing[:2], config)
    resampled = size != cropped_shape
    if resampled:
        array = _resample_inplane_linear(array, size)
        affine = affine @ _corner_index_map(cropped_shape, size)

    # 3. depth policy
    plan = DepthPlan.make(z_count, config.target_depth, config.depth_policy)
    array = apply_depth(array, plan, nearest=False)
    affine = affine @ plan.z_index_map()

    # 4. intensity window
    image = hu_to_unit(array, config.window)

    record = {
        "record_version": RECORD_VERSION,
        "original": {
            "shape": [int(n) for n in volume.array.shape],
            "spacing": _spacing(original_affine),
            "orientation": _axcodes(original_affine),
            "affine": original_affine.tolist(),
        },
        "reorient": {
            "to": config.orientation,
            "transform": transform.astype(int).tolist(),
            "shape": list(oriented_shape),
        },
        "crop_depth": {
            "applied": (z_start, z_count) != (0, oriented_shape[2]),
            "start": int(z_start),
            "depth_in": int(oriented_shape[2]),
            "depth_out": int(z_count),
        },
        "crop_inplane": {
            "applied": cropped_shape != oriented_shape[:2],
            "start": [int(i) for i in crop_start],
            "shape_in": list(oriented_shape[:2]),
            "shape_out": list(cropped_shape),
        },
        "resample_inplane": {
            "applied": bool(resampled),
            "shape_in": list(cropped_shape),
            "shape_out": list(size),
            "spacing_in": oriented_spacing[:2],
            "spacing_out": _spacing(affine)[:2],
        },
        "depth": plan.to_record(),
        "window": [float(config.window[0]), float(config.window[1])],
        "output": {
            "shape": [int(n) for n in image.shape],
            "spacing": _spacing(affine),
            "orientation": _axcodes(affine),
            "affine": affine.tolist(),
        },
    }
    return PreparedImage(image=image, affine=affine, record=record)


def prepare_label(label: Volume, record: dict[str, Any], label_map: dict[int, int]) -> np.ndarray:
    """Apply the geometric steps of ``record`` to a label and map its values to classes.

    ``label.array``: (X, Y, Z) on the image's original grid, values in ``label_map``'s keys.
    Returns uint8 classes on the preprocessed grid. Raises InputError for unexpected values.
    """
    classes = label_values_to_classes(label.array, label_map, label.source)
    transform = np.array(record["reorient"]["transform"])
    classes = nib.orientations.apply_orientation(classes, transform)
    depth_crop = record.get("crop_depth", {"applied": False})
    if depth_crop["applied"]:
        z0, nz = depth_crop["start"], depth_crop["depth_out"]
        classes = classes[:, :, z0 : z0 + nz]
    crop = record.get("crop_inplane", {"applied": False})
    if crop["applied"]:
        (x0, y0), (nx, ny) = crop["start"], crop["shape_out"]
        classes = classes[x0 : x0 + nx, y0 : y0 + ny]
    step = record["resample_inplane"]
    if step["applied"]:
        classes = _resample_inplane_nearest(classes, tuple(step["shape_out"]))
    plan = DepthPlan.from_record(record["depth"])
    return apply_depth(np.ascontiguousarray(classes), plan, nearest=True).astype(np.uint8)


def label_values_to_classes(
    values: np.ndarray, label_map: dict[int, int], source: Path | str = "label"
) -> np.ndarray:
    """Dataset label values (e.g. 0/255/128) -> uint8 classes (0/1/2) via ``label_map``.

    Raises InputError naming ``source`` when a value is not an integer key of ``label_map``.
    """
    values = np.asarray(values)
    found = np.unique(values)
    expected = sorted(int(k) for k in label_map)
    unexpected = [v for v in found.tolist() if v not in expected]
    if unexpected:
        shown = ", ".join(_format_value(v) for v in found.tolist()[:12])
        raise InputError(
            f"{source}: found label values {{{shown}}}, expected a subset of "
            f"{{{', '.join(str(v) for v in expected)}}}"
        )
    lookup = np.zeros(max(expected) + 1, dtype=np.uint8)
    for value, cls in label_map.items():
        lookup[int(value)] = int(cls)
    return lookup[values.astype(np.int64)]


def _format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def classes_to_label_values(
    classes: np.ndarray, label_map: dict[int, int] | None = None
) -> np.ndarray:
    """Classes 0/1/2 -> the dataset's label values (0/255/128 by default), as uint8.

    ``label_map`` is value -> class (as in the config and manifest); it is inverted here.
    """
    label_map = label_map if label_map is not None else PreprocessConfig().label_map
    inverse = {int(cls): int(value) for value, cls in label_map.items()}
    lookup = np.zeros(max(inverse) + 1, dtype=np.int64)
    for cls, value in inverse.items():
        lookup[cls] = value
    classes = np.asarray(classes)
    if classes.size and (classes.min() < 0 or classes.max() > max(inverse)):
        raise ValueError(f"class map holds values outside 0..{max(inverse)}")
    out = lookup[classes.astype(np.int64)]
    dtype = np.uint8 if out.max(initial=0) <= 255 else np.int16
    return out.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Inverse


def restore_label(classes: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Map a class map on the preprocessed grid back onto the original image's voxel grid.

    ``classes``: (X', Y', T) on the grid :func:`prepare_image` produced with ``record``. Undoes
    the depth policy (:func:`bladdergen.data.depth.invert_depth`), the in-plane resampling
    (nearest neighbour) and the reorientation. Returns an array of ``record["original"]["shape"]``
    with ``classes``' dtype; write it with ``record["original"]["affine"]``.
    """
    expected = tuple(record["output"]["shape"])
    if tuple(classes.shape) != expected:
        raise InputError(
            f"class map has shape {tuple(classes.shape)}, expected {expected} (the preprocessed grid)"
        )
    plan = DepthPlan.from_record(record["depth"])
    array = invert_depth(np.asarray(classes), plan)
    step = record["resample_inplane"]
    if step["applied"]:
        array = _resample_inplane_nearest(array, tuple(step["shape_in"]))
    crop = record.get("crop_inplane", {"applied": False})
    if crop["applied"]:  # outside the crop nothing was segmented: background (0)
        (x0, y0), (nx, ny) = crop["start"], crop["shape_out"]
        full = np.zeros((*crop["shape_in"], array.shape[2]), dtype=array.dtype)
        full[x0 : x0 + nx, y0 : y0 + ny] = array
        array = full
    depth_crop = record.get("crop_depth", {"applied": False})
    if depth_crop["applied"]:  # outside the z-range nothing was segmented: background (0)
        z0, nz = depth_crop["start"], depth_crop["depth_out"]
        full = np.zeros((*array.shape[:2], depth_crop["depth_in"]), dtype=array.dtype)
        full[:, :, z0 : z0 + nz] = array
        array = full
    # The inverse of "original axes -> canonical" is "canonical -> original axes".
    current = nib.orientations.io_orientation(np.array(record["original"]["affine"]))
    canonical = nib.orientations.axcodes2ornt(tuple(record["reorient"]["to"]))
    inverse = nib.orientations.ornt_transform(canonical, current)
    original = tuple(record["original"]["shape"])
    array = nib.orientations.apply_orientation(array, inverse)
    if tuple(array.shape) != original:
        raise ValueError(f"restored shape {array.shape} differs from original {original}")
    return np.ascontiguousarray(array)
