"""Procedural pelvic CT phantoms: the embedded default dataset (SPEC §5).

Each case is an axial pelvic CT slab in Hounsfield units: air around a body outline with a layer of
subcutaneous fat over muscle; pelvic fat around the organs; pelvic bone (ilium/ischium walls,
femoral heads, sacrum above, pubic symphysis below) with a cortical shell; a rectum behind the
bladder; and a hollow bladder of random size, shape, rotation and position whose wall is 2-5 mm
thick (~40 HU) around urine (~10 HU). About half of the cases carry a tumor growing from the inner
wall into the lumen (~50-70 HU). Partial-volume blur and spatially correlated CT noise finish it.

Geometry is drawn per case: in-plane spacing 0.6-0.9 mm at 512 voxels (the field of view stays the
same at other sizes, so spacing scales with 512/size), 3-5 mm between slices, and a slice count
around 24 (18-32; case 0 below 24, case 1 above), stored like a scanner export (index axes
pointing left, posterior, superior: affine diag(-sx, -sy, sz)).
Labels: 0 background, 255 bladder wall, 128 tumor.

Output layout (what ``bladdergen preprocess`` reads)::

    OUT/images/case_000.nii.gz   int16 HU
    OUT/labels/case_000.nii.gz   uint8 0/128/255 (absent for the unlabeled cases: the last K ids)
    OUT/phantoms.json            the seed and every case's drawn parameters

Case ``i`` depends only on ``(seed, i)``: the same seed gives byte-identical files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bladdergen.data.volumes import write_nifti
from bladdergen.errors import InputError
from bladdergen.fileio import atomic_write_text
from bladdergen.progress import SILENT, Reporter

WALL_VALUE = 255
TUMOR_VALUE = 128
PHANTOM_MANIFEST = "phantoms.json"
REFERENCE_SIZE = 512  # the in-plane size at which spacing is 0.6-0.9 mm

# Hounsfield units of the tissues (means; each case jitters them a little).
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 45.0,
    "urine": 10.0,
    "wall": 40.0,
    "tumor": 60.0,
    "cancellous": 250.0,
    "cortical": 900.0,
    "gas": -850.0,
}


@dataclasses.dataclass
class PhantomCase:
    """One generated case: HU image and label (X, Y, Z) in the stored (LPS-index) order."""

    case_id: str
    image: np.ndarray  # int16 HU
    label: np.ndarray  # uint8 0/128/255
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    params: dict[str, Any]


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
) -> np.ndarray:
    """Squared normalised radius of an in-plane ellipse (< 1 inside); broadcasts over inputs."""
    u, v = _rotate(x - cx, y - cy, angle)
    return (u / ax) ** 2 + (v / ay) ** 2


BLUR_SIGMA = (0.6, 0.6, 0.4)  # partial-volume blur and noise correlation, voxels (X, Y, Z)
BLUR_TRUNCATE = 2.0


def _blurred_noise_sd() -> float:
    """Standard deviation of unit white noise after the blur (exact for the discrete kernels)."""
    variance = 1.0
    for sigma in BLUR_SIGMA:
        delta = np.zeros(9)
        delta[4] = 1.0
        kernel = ndimage.gaussian_filter1d(delta, sigma, truncate=BLUR_TRUNCATE)
        variance *= float(np.sum(kernel**2))  # separable: variances multiply
    return float(np.sqrt(variance))


def _shape_factor(coeffs: np.ndarray, du: Any, dv: Any, dw: Any) -> Any:
    """Radial scale of the bladder along unit direction (du, dv, dw): 1 + smooth low-order terms."""
    return (
        1.0
        + coeffs[0] * du * dv
        + coeffs[1] * (du * du - dv * dv)
        + coeffs[2] * dv * dw
        + coeffs[3] * dw
        + coeffs[4] * dv
    )


def _box(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    center: tuple[float, float, float],
    half: tuple[float, float, float],
) -> tuple[tuple[slice, slice, slice], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Index slices of the voxels within ``center +- half`` (mm) and their broadcastable coords."""
    slices = []
    for coords, c, h in zip((x, y, z), center, half, strict=True):
        inside = np.nonzero(np.abs(coords - c) <= h)[0]
        slices.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
    sx, sy, sz = slices
    grids = (x[sx][:, None, None], y[sy][None, :, None], z[sz][None, None, :])
    return (sx, sy, sz), grids


def _paint_body(
    hu: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    rng: np.random.Generator,
    tissue: dict[str, float],
) -> None:
    """Body outline slowly changing along z: subcutaneous fat over muscle (in place on ``hu``).

    ``x``, ``y``, ``z``: world coordinates (mm) of the voxel centres along each index axis.
    """
    body_a = float(rng.uniform(150, 190))
    body_b = float(rng.uniform(105, 135))
    fat_thickness = float(rng.uniform(12, 35))
    x2, y2 = x[:, None], y[None, :]
    # A per-slice scale of the squared radius keeps this to a few full-volume operations.
    slice_scale = (1.0 / (1.0 + 0.002 * z) ** 2).astype(np.float32)[None, None, :]
    body_r = _ellipse(x2, y2, 0.0, 0.0, body_a, body_b)[:, :, None] * slice_scale
    hu[body_r <= 1.0] = tissue["fat"]
    del body_r
    inner = _ellipse(x2, y2, 0.0, 0.0, body_a - fat_thickness, body_b - fat_thickness)
    hu[inner[:, :, None] * slice_scale <= 1.0] = tissue["muscle"]


def _paint_bones(
    hu: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    rng: np.random.Generator,
    tissue: dict[str, float],
) -> None:
    """Pelvic bone, in place on ``hu``: each piece a cancellous core in a cortical shell.

    Iliac/ischial walls beside the cavity (whole slab), femoral heads low in the slab, pubic rami
    in front below the bladder, the sacrum behind and above. ``bone`` holds the smallest squared
    normalised radius over all pieces (< 1 inside a piece; < 0.6 is the cancellous core).
    """
    side = float(rng.uniform(72, 88))
    tilt = float(rng.uniform(0.15, 0.35))
    walls = np.full((x.size, y.size), np.inf, dtype=np.float32)
    pieces = []  # (centre mm, semi-axes mm) of ellipsoids
    for sign in (-1.0, 1.0):
        half_width, half_length = float(rng.uniform(8, 12)), float(rng.uniform(36, 46))
        wall = _ellipse(
            x[:, None], y[None, :], sign * side, -15.0, half_width, half_length, sign * tilt
        )
        np.minimum(walls, wall, out=walls)
        head = float(rng.uniform(21, 25))
        head_x = sign * (side + float(rng.uniform(18, 26)))
        pieces.append(((head_x, 5.0, float(rng.uniform(-45, -15))), (head, head, head)))
        ramus = (sign * float(rng.uniform(14, 22)), float(rng.uniform(70, 85)))
        pieces.append(((*ramus, float(rng.uniform(-40, -20))), (14.0, 8.0, 18.0)))
    sacrum = (0.0, float(rng.uniform(-95, -80)), float(rng.uniform(25, 45)))
    pieces.append((sacrum, (float(rng.uniform(32, 45)), float(rng.uniform(12, 17)), 40.0)))

    bone = np.repeat(walls[:, :, None], z.size, axis=2)
    for center, axes in pieces:
        box, (xb, yb, zb) = _box(x, y, z, center, axes)
        r = ((xb - center[0]) / axes[0]) ** 2 + ((yb - center[1]) / axes[1]) ** 2
        np.minimum(bone[box], r + ((zb - center[2]) / axes[2]) ** 2, out=bone[box])
    hu[bone <= 1.0] = tissue["cortical"]
    hu[bone <= 0.6] = tissue["cancellous"]


def _tumor_mask(
    u: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    outer: np.ndarray,
    inner_axes: np.ndarray,
    shape_coeffs: np.ndarray,
    radius: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A lobulated tumor seeded on the bladder's inner surface, growing into the lumen.

    ``u, v, w``: bladder-frame coordinates (mm) of the bladder box's voxels; ``outer``: voxels
    inside the outer wall surface (the tumor never leaves the bladder). The seed lies mostly on
    the posterior/lateral walls, where bladder tumors are most common.
    """
    direction = rng.normal(size=3)
    direction[1] = -abs(direction[1])
    direction /= np.linalg.norm(direction)
    shape_at = float(_shape_factor(shape_coeffs, *direction))
    # the inner surface along `direction`: t·d with sqrt(sum((t·d / axes)^2)) = shape factor
    surface = direction * shape_at / np.sqrt(np.sum((direction / inner_axes) ** 2))
    cu, cv, cw = surface * 0.98 - direction * radius * 0.35
    axes = radius * rng.uniform(0.75, 1.25, 3)
    blob = ((u - cu) / axes[0]) ** 2 + ((v - cv) / axes[1]) ** 2 + ((w - cw) / axes[2]) ** 2
    # lobulated: a second, smaller blob beside the first
    du, dv, dw = rng.normal(size=3) * radius * 0.5
    lobe = ((u - cu - du) ** 2 + (v - cv - dv) ** 2 + (w - cw - dw) ** 2) / (0.6 * radius) ** 2
    return ((blob <= 1.0) | (lobe <= 1.0)) & outer


def make_phantom(
    index: int, seed: int = 0, size: int = 512, with_tumor: bool | None = None
) -> PhantomCase:
    """Generate case ``index`` of the phantom set drawn with ``seed``, ``size`` x ``size`` in-plane.

    ``with_tumor``: force a tumor on or off (``None``: case 0 yes, case 1 no, others drawn with
    probability 1/2).
    Shapes and units: image int16 HU and label uint8, both (size, size, slices).
    """
    if size < 16:
        raise InputError(f"phantom size: got {size}, expected at least 16 voxels in-plane")
    rng = np.random.default_rng([seed, index])
    # Around 24 slices; case 0 has fewer and case 1 more, so every set exercises the depth policy.
    low, high = {0: (18, 24), 1: (25, 33)}.get(index, (18, 33))
    n_slices = int(rng.integers(low, high))
    spacing_xy = float(rng.uniform(0.6, 0.9)) * REFERENCE_SIZE / size
    spacing_z = float(rng.uniform(3.0, 5.0))
    drawn_tumor = bool(rng.random() < 0.5)
    # Case 0 always has a tumor and case 1 never, so every set of two or more holds both kinds.
    tumor = {0: True, 1: False}.get(index, drawn_tumor) if with_tumor is None else with_tumor

    # World (RAS, mm) coordinates of the voxel centres; stored index axes point L, P, S.
    half_fov = 0.5 * (size - 1) * spacing_xy
    x = half_fov - np.arange(size, dtype=np.float32) * spacing_xy  # index i -> x (right +)
    y = half_fov - np.arange(size, dtype=np.float32) * spacing_xy  # index j -> y (anterior +)
    # Bladder centre sits in the middle half of the slab.
    z_bladder = float(rng.uniform(0.35, 0.65)) * (n_slices - 1) * spacing_z
    z = np.arange(n_slices, dtype=np.float32) * spacing_z - z_bladder  # z = 0 at the bladder centre
    affine = np.array(
        [
            [-spacing_xy, 0.0, 0.0, half_fov],
            [0.0, -spacing_xy, 0.0, half_fov],
            [0.0, 0.0, spacing_z, float(rng.uniform(-400.0, -300.0))],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    # The patient is not centred on the table exactly.
    x = x - float(rng.uniform(-15, 15))
    y = y - float(rng.uniform(-25, 5))
    shape = (size, size, n_slices)
    x2, y2 = x[:, None], y[None, :]  # in-plane grids for structures constant along z

    jitter = {k: v + float(rng.normal(0, 4)) for k, v in HU.items()}
    hu = np.full(shape, jitter["air"], dtype=np.float32)

    _paint_body(hu, x, y, z, rng, jitter)

    # Pelvic cavity: fat around bladder and rectum (2D masks index all slices at once).
    cavity_y = float(rng.uniform(-10, 5))
    cavity = _ellipse(x2, y2, 0.0, cavity_y, float(rng.uniform(62, 78)), float(rng.uniform(58, 72)))
    hu[cavity <= 1.0] = jitter["fat"]

    # Bladder: a perturbed, rotated ellipsoid; wall = outer shell of thickness t. Computed inside
    # its bounding box only.
    b_center = (float(rng.uniform(-12, 12)), float(rng.uniform(15, 40)), float(rng.uniform(-6, 6)))
    b_axes = np.array([rng.uniform(28, 50), rng.uniform(22, 40), rng.uniform(20, 38)], np.float32)
    b_angle = float(rng.uniform(-0.35, 0.35))
    wall_thickness = float(rng.uniform(2.0, 5.0))
    # A thin wall must stay a connected shell on coarse grids (small --size): >= 1.2 voxels.
    wall_thickness_grid = max(wall_thickness, 1.2 * spacing_xy)
    shape_coeffs = rng.uniform(-0.12, 0.12, 5).astype(np.float32)
    reach = float(b_axes.max()) * (1.0 + float(np.abs(shape_coeffs).sum())) + 1.0
    box, (xb, yb, zb) = _box(x, y, z, b_center, (reach, reach, reach))
    u, v = _rotate(xb - b_center[0], yb - b_center[1], b_angle)
    w = zb - b_center[2]
    radius = np.sqrt(u * u + v * v + w * w) + 1e-3
    du, dv, dw = u / radius, v / radius, w / radius
    # Direction-dependent size change: smooth low-order terms (a pear/tilted-dome shape).
    factor = _shape_factor(shape_coeffs, du, dv, dw)
    rho_outer = np.sqrt((u / b_axes[0]) ** 2 + (v / b_axes[1]) ** 2 + (w / b_axes[2]) ** 2)
    inner_axes = b_axes - wall_thickness_grid
    rho_inner = np.sqrt(
        (u / inner_axes[0]) ** 2 + (v / inner_axes[1]) ** 2 + (w / inner_axes[2]) ** 2
    )
    outer = rho_outer <= factor
    lumen = rho_inner <= factor
    wall = outer & ~lumen

    # Rectum behind the bladder: muscular wall around gas or stool.
    r_center = (
        float(rng.uniform(-8, 8)),
        b_center[1] - float(b_axes[1]) - float(rng.uniform(14, 24)),
    )
    r_radius = float(rng.uniform(12, 18))
    rectum = _ellipse(x2, y2, r_center[0], r_center[1], r_radius, r_radius * 0.85)
    gas_fill = float(rng.uniform(0.3, 0.7))
    hu[rectum <= 1.0] = jitter["muscle"]
    hu[rectum <= gas_fill**2] = jitter["gas"]

    _paint_bones(hu, x, y, z, rng, jitter)

    hu_box = hu[box]
    hu_box[wall] = jitter["wall"]
    hu_box[lumen] = jitter["urine"]

    label = np.zeros(shape, dtype=np.uint8)
    label_box = label[box]
    label_box[wall] = WALL_VALUE
    tumor_radius = 0.0
    if tumor:
        tumor_radius = float(rng.uniform(5.0, 14.0))
        tumor_mask = _tumor_mask(u, v, w, outer, inner_axes, shape_coeffs, tumor_radius, rng)
        hu_box[tumor_mask] = jitter["tumor"] + float(rng.uniform(-8, 8))
        label_box[tumor_mask] = TUMOR_VALUE
        tumor = bool(tumor_mask.any())

    # White noise, then one blur for both partial volume (~0.5 voxel in-plane, a little across
    # slices) and the spatial correlation of CT noise; the noise is pre-scaled so that its
    # standard deviation after the blur is the drawn one.
    noise_sd = float(rng.uniform(8.0, 20.0))
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    hu += noise * np.float32(noise_sd / _blurred_noise_sd())
    del noise
    hu = ndimage.gaussian_filter(hu, sigma=BLUR_SIGMA, mode="nearest", truncate=BLUR_TRUNCATE)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    lumen_ml = float(lumen.sum()) * spacing_xy * spacing_xy * spacing_z / 1000.0
    params = {
        "shape": [size, size, n_slices],
        "spacing_mm": [round(spacing_xy, 6), round(spacing_xy, 6), round(spacing_z, 6)],
        "has_tumor": tumor,
        "tumor_radius_mm": round(tumor_radius, 3),
        "wall_thickness_mm": round(wall_thickness, 3),
        "bladder_semi_axes_mm": [round(float(a), 3) for a in b_axes],
        "urine_ml_in_slab": round(lumen_ml, 3),
        "noise_sd_hu": round(noise_sd, 3),
    }
    return PhantomCase(f"case_{index:03d}", image, label, affine, params)


def _generate_case(index: int, seed: int, size: int, labeled: bool, out_dir: Path) -> dict:
    """Generate case ``index`` and write its files; returns its phantoms.json entry."""
    case = make_phantom(index, seed=seed, size=size)
    write_nifti(out_dir / "images" / f"{case.case_id}.nii.gz", case.image, case.affine, np.int16)
    if labeled:
        write_nifti(
            out_dir / "labels" / f"{case.case_id}.nii.gz", case.label, case.affine, np.uint8
        )
    return {"case_id": case.case_id, "labeled": labeled, **case.params}


def generate_phantoms(
    out_dir: Path,
    n: int = 24,
    seed: int = 0,
    size: int = 512,
    unlabeled: int = 0,
    overwrite: bool = False,
    workers: int = 1,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Write ``n`` phantom cases to ``out_dir`` (layout in the module docstring).

    ``unlabeled``: the last ``unlabeled`` cases get no label file. ``workers``: processes
    generating cases in parallel (the files are the same for any count). Raises InputError for
    bad counts, or when ``out_dir`` already holds files and ``overwrite`` is False. Returns a
    summary dict (counts, cases with tumor, slice counts).
    """
    out_dir = Path(out_dir)
    if n < 1:
        raise InputError(f"phantom -n: got {n}, expected at least 1 case")
    if not 0 <= unlabeled <= n:
        raise InputError(f"phantom --unlabeled: got {unlabeled}, expected 0..{n}")
    if size < 16:
        raise InputError(f"phantom --size: got {size}, expected at least 16 voxels in-plane")
    if workers < 1:
        raise InputError(f"phantom --workers: got {workers}, expected >= 1")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(
                f"{out_dir}: folder is not empty, expected a new folder (or pass --overwrite)"
            )
        _remove_previous_phantoms(out_dir)

    n_labeled = n - unlabeled
    jobs = [(index, seed, size, index < n_labeled, out_dir) for index in range(n)]
    cases = []
    with reporter.task("phantoms", total=n) as task:
        if workers == 1:
            for job in jobs:
                cases.append(_generate_case(*job))
                task.advance(1, case=cases[-1]["case_id"])
        else:
            context = multiprocessing.get_context(
                "fork" if sys.platform.startswith("linux") else "spawn"
            )
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(_generate_case, *job) for job in jobs]
                for future in concurrent.futures.as_completed(futures):
                    cases.append(future.result())
                    task.advance(1, case=cases[-1]["case_id"])
    cases.sort(key=lambda c: c["case_id"])

    summary = {
        "out_dir": str(out_dir),
        "seed": seed,
        "size": size,
        "cases": n,
        "labeled": n_labeled,
        "unlabeled": unlabeled,
        "with_tumor": sum(1 for c in cases if c["has_tumor"]),
        "slices": sorted({c["shape"][2] for c in cases}),
    }
    manifest = {"generator": "bladdergen phantom", "seed": seed, "size": size, "cases": cases}
    atomic_write_text(out_dir / PHANTOM_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return summary


def _remove_previous_phantoms(out_dir: Path) -> None:
    """Delete what an earlier ``phantom`` run wrote (and nothing else) before writing anew."""
    for folder in ("images", "labels"):
        for path in sorted((out_dir / folder).glob("case_*.nii.gz")):
            path.unlink()
    (out_dir / PHANTOM_MANIFEST).unlink(missing_ok=True)
