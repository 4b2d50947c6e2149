"""Pre-alignment of a registration pair by the moments of the filled bladder.

Bladders of different patients lie 4-10 voxels apart at the tiny grid, beyond what a local
similarity sees, so the registration net only predicts a *residual* field on a pre-aligned pair.
The pre-alignment maps the target's filled bladder (wall ∪ lumen ∪ tumor, lumen by hole filling in
each axial slice) onto the moving one's: centroids matched, and each axis scaled by the ratio of
the two masks' standard deviations (clipped to ``MAX_SCALE``). Masks come from the segmentation
``S`` that DeepAtlas already uses: the manual label where there is one, else the segmentation net's
prediction, so it is available for unlabeled images at training and at test time alike. A pair
with an empty mask on either side gets no pre-alignment (zero field).

Fields are in voxels, (B, 3, X, Y, Z), channel k along spatial axis k, pull convention
``warped(x) = moving(x + u(x))``. For the affine pre-alignment ``P(x) = x + a(x)`` and a residual
``r`` predicted on ``moving∘P``, the composed field is exactly ``u = a + D·r`` with ``D`` the
diagonal scale (``a`` is affine, so ``a(x + r) = a(x) + (D - I)·r``).
"""

from __future__ import annotations

import numpy as np
import torch

from bladdergen.data.bladder import filled_bladder

MAX_SCALE = 1.5  # per-axis scale of the pre-alignment is clipped to [1/MAX_SCALE, MAX_SCALE]


def filled_bladder_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Filled-bladder masks (B, X, Y, Z) bool of probabilities or one-hot maps (B, 3, X, Y, Z)."""
    classes = probs.detach().argmax(dim=1).cpu().numpy()
    masks = np.stack([filled_bladder(c) for c in classes])
    return torch.from_numpy(masks).to(probs.device)


def moments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(centroid, standard deviation) per axis of a bool mask (X, Y, Z), in voxels; None if empty."""
    if not mask.any():
        return None
    coords = np.argwhere(mask).astype(np.float64)
    return coords.mean(axis=0), np.maximum(coords.std(axis=0), 0.5)


def prealignment(
    moving_masks: torch.Tensor, target_masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine pre-alignment field and its diagonal scale for each pair of masks (B, X, Y, Z).

    Returns ``(a, scale)``: ``a`` (B, 3, X, Y, Z) float32 voxels with
    ``x + a(x) = c_m + s·(x - c_t)``, and ``scale`` (B, 3) the per-axis ``s``. Identity (zero field,
    unit scale) for a pair where either mask is empty.
    """
    batch, shape = moving_masks.shape[0], tuple(moving_masks.shape[1:])
    device = moving_masks.device
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    ).to(device)  # (3, X, Y, Z)
    fields = torch.zeros((batch, 3, *shape), dtype=torch.float32, device=device)
    scales = torch.ones((batch, 3), dtype=torch.float32, device=device)
    for b in range(batch):
        m = moments(moving_masks[b].cpu().numpy())
        t = moments(target_masks[b].cpu().numpy())
        if m is None or t is None:
            continue
        scale = np.clip(m[1] / t[1], 1.0 / MAX_SCALE, MAX_SCALE)
        s = torch.tensor(scale, dtype=torch.float32, device=device).view(3, 1, 1, 1)
        c_m = torch.tensor(m[0], dtype=torch.float32, device=device).view(3, 1, 1, 1)
        c_t = torch.tensor(t[0], dtype=torch.float32, device=device).view(3, 1, 1, 1)
        fields[b] = c_m + s * (grid - c_t) - grid
        scales[b] = s.view(3)
    return fields, scales


def compose(prealign: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The field of ``residual`` (predicted on the pre-aligned pair) after the affine pre-alignment:
    ``a + D·r``, all (B, 3, X, Y, Z) voxels; ``scale`` (B, 3) is D's diagonal."""
    return prealign + scale.view(*scale.shape, 1, 1, 1) * residual
