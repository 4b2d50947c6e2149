"""Similarity measures on volumes scaled to [0, 1]: adjacent-slice SSIM/NCC along Z (slice
consistency) and 3D MS-SSIM between volumes (diversity, nearest real volume).

Volumes are float arrays of shape (X, Y, Z) on one common grid; MONAI's SSIM metrics do the work.
"""

from __future__ import annotations

import numpy as np

# Standard MS-SSIM scale weights (Wang et al. 2003), as used by Medical Diffusion's msssim_3d.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 3


def to_unit_range(hu: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """HU -> [0, 1] over ``hu_range`` (float32), clipped."""
    low, high = hu_range
    return np.clip((hu - low) / (high - low), 0.0, 1.0).astype(np.float32)


def adjacent_slice_similarity(volume: np.ndarray) -> dict[str, float]:
    """Mean SSIM and mean normalised cross-correlation between axial slices z and z + 1.

    ``volume``: (X, Y, Z) in [0, 1], Z >= 2. SSIM window 7 (or the in-plane size if smaller).
    A constant slice pair has NCC 1 when equal (both flat), 0 otherwise.
    """
    import torch
    from monai.metrics import SSIMMetric

    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, 2, 0)))[:, None]
    window = min(7, volume.shape[0], volume.shape[1])
    window -= 1 - window % 2  # odd window
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=window)
    ssim = metric(slices[:-1], slices[1:]).flatten()
    a = slices[:-1].flatten(1).double()
    b = slices[1:].flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    ncc = torch.where(
        norm > 0,
        (a * b).sum(1) / norm.clamp_min(1e-12),
        (a.abs().sum(1) + b.abs().sum(1) == 0).double(),
    )
    return {"slice_ssim": float(ssim.mean()), "slice_ncc": float(ncc.mean())}


def ms_ssim_scales(shape: tuple[int, ...], kernel: int = MS_SSIM_KERNEL) -> int:
    """How many MS-SSIM scales (1-5) a volume of ``shape`` allows with MONAI's size rule
    (each size // (scales - 1)² must exceed kernel - 1)."""
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if all(n // max(1, scales - 1) ** 2 > kernel - 1 for n in shape):
            return scales
    return 1


def ms_ssim(reference: np.ndarray, others: np.ndarray) -> np.ndarray:
    """3D MS-SSIM between one (X, Y, Z) volume and each of (N, X, Y, Z) volumes, all in [0, 1].

    Uses as many of the 5 standard scales as the grid allows (weights renormalised), kernel 3.
    Returns (N,) values, 1 for identical volumes.
    """
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    scales = ms_ssim_scales(reference.shape)
    weights = np.array(MS_SSIM_WEIGHTS[:scales])
    metric = MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=1.0,
        kernel_size=MS_SSIM_KERNEL,
        weights=tuple(float(w) for w in weights / weights.sum()),
    )
    others_t = torch.from_numpy(np.ascontiguousarray(others, dtype=np.float32))[:, None]
    reference_t = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    reference_t = reference_t[None, None].expand_as(others_t)
    return metric(others_t, reference_t).flatten().double().numpy()


def pairwise_ms_ssim(volumes: np.ndarray, max_pairs: int, seed: int) -> np.ndarray:
    """MS-SSIM of up to ``max_pairs`` distinct pairs (i < j) of (N, X, Y, Z) volumes, chosen
    uniformly at random (seeded) when there are more pairs. Returns the values (empty if N < 2)."""
    n = len(volumes)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    values = []
    for i in sorted({i for i, _ in pairs}):
        partners = [j for a, j in pairs if a == i]
        values.extend(ms_ssim(volumes[i], volumes[partners]).tolist())
    return np.array(values, dtype=np.float64)
