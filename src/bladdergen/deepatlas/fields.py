"""Displacement fields: warping images and probabilities, and measuring folding.

A field ``u`` is (B, 3, X, Y, Z) in voxels, channel k along spatial axis k, and warping pulls:
``warped(x) = moving(x + u(x))`` (MONAI ``Warp``, trilinear, border padding). Probabilities are
warped trilinearly so gradients reach the field (nearest-neighbour warping gives none) and border
padding keeps every warped voxel on the probability simplex.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Warp


class Warper(torch.nn.Module):
    """Trilinear pull-back warping with border padding: (B, C, X, Y, Z), (B, 3, X, Y, Z) -> like input."""

    def __init__(self) -> None:
        super().__init__()
        self.warp = Warp(mode="bilinear", padding_mode="border")  # "bilinear" is trilinear in 3D

    def forward(self, moving: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        return self.warp(moving, field)


def jacobian_determinant(field: torch.Tensor) -> torch.Tensor:
    """det(I + ∇u) of the map x -> x + u(x), central differences: (B, 3, X, Y, Z) -> (B, X, Y, Z).

    Units cancel (u and x both in voxels); a determinant <= 0 marks a folded voxel.
    """
    field = field.float()
    # grads[k][j] = d u_k / d x_j, each (B, X, Y, Z)
    grads = [torch.gradient(field[:, k], dim=(1, 2, 3)) for k in range(3)]
    j = [[grads[k][m] + (1.0 if k == m else 0.0) for m in range(3)] for k in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def folding_fraction(field: torch.Tensor) -> float:
    """Fraction of voxels whose Jacobian determinant is <= 0 (folded), over the whole batch."""
    with torch.no_grad():
        return float((jacobian_determinant(field) <= 0).float().mean())
