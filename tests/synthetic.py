"""Hand-made tiny preprocessed sets for tests (independent of the phantom generator).

Each case is a bright shell (bladder wall, class 1) around a darker lumen inside a body ellipse, and
labeled cases with an odd index carry a small tumor (class 2) on the inner wall. Intensities are
already in [-1, 1], as ``bladdergen preprocess`` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

WINDOW = (-200.0, 300.0)
SPACING = (3.0, 3.0, 4.0)


def make_case(
    shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One (image in [-1, 1], label in {0, 1, 2}) pair of shape (X, Y, Z)."""
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    cx, cy, cz = (np.array(shape, dtype=np.float32) - 1) / 2 + rng.uniform(-1.5, 1.5, 3)
    radius = min(shape[0], shape[1]) * rng.uniform(0.2, 0.28)
    dist = np.sqrt(
        ((x - cx) / radius) ** 2 + ((y - cy) / radius) ** 2 + ((z - cz) / (shape[2] / 2.5)) ** 2
    )
    body = ((x - cx) / (shape[0] * 0.45)) ** 2 + ((y - cy) / (shape[1] * 0.4)) ** 2 <= 1
    label = np.zeros(shape, np.uint8)
    label[(dist <= 1.0) & (dist > 0.7)] = 1
    image = np.full(shape, -1.0, np.float32)
    image[body] = -0.3
    image[dist <= 0.7] = -0.15
    image[label == 1] = 0.05
    image += rng.normal(0, 0.03, shape).astype(np.float32)
    return np.clip(image, -1, 1).astype(np.float32), label


def make_preprocessed_set(
    root: Path,
    n_cases: int = 6,
    n_labeled: int = 4,
    shape: tuple[int, int, int] = (32, 32, 8),
    seed: int = 0,
) -> Path:
    """Write a preprocessed set (manifest + NIfTI) at ``root`` and return ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    cases = []
    for index in range(n_cases):
        case_id = f"case_{index:03d}"
        image, label = make_case(shape, rng)
        labeled = index < n_labeled
        if labeled and index % 2 == 1:
            wall = np.argwhere(label == 1)
            seed_voxel = wall[rng.integers(len(wall))]
            lo = np.maximum(seed_voxel - 1, 0)
            hi = seed_voxel + 2
            label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 2
            image[label == 2] = 0.2
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"{case_id}.nii.gz")
        entry = {"case_id": case_id, "image": f"images/{case_id}.nii.gz", "label": None}
        if labeled:
            nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"{case_id}.nii.gz")
            entry["label"] = f"labels/{case_id}.nii.gz"
        entry["labeled"] = labeled
        cases.append(entry)
    manifest = {
        "format": "bladdergen-preprocessed",
        "version": 1,
        "window": list(WINDOW),
        "label_map": {"0": 0, "255": 1, "128": 2},
        "target_shape": list(shape),
        # what `bladdergen preprocess` records: the settings that made these volumes
        "settings": {
            "target_size": list(shape[:2]),
            "target_depth": shape[2],
            "window": list(WINDOW),
            "label_map": {"0": 0, "255": 1, "128": 2},
        },
        "cases": cases,
        "rejected": [],
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def ring_classes(shape=(24, 24, 4), outer=8, inner=5) -> np.ndarray:
    """A bladder wall as a ring (distance inner..outer voxels from the centre) on every slice."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.sqrt((x - 11.5) ** 2 + (y - 11.5) ** 2)
    ring = (r < outer) & (r >= inner)
    classes = np.zeros(shape, np.uint8)
    classes[ring] = 1
    return classes
