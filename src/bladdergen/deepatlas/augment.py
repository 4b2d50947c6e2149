"""Spatial and intensity augmentation of labeled training pairs (the supervised draws).

With 1-4 labeled cases a segmenter sees the same few bladders again and again; small random
in-plane rotations, scalings and shifts, left-right flips and intensity changes let it see more
shapes and positions of the same labels. Only what is anatomically possible: no flips along Y
(anterior-posterior) or Z (cranio-caudal), no rotation out of the axial plane (thick slices).

The resampling is MONAI's ``Affine`` (bilinear image with border padding, nearest-neighbour label
with background padding). The parameters come from the training step's own random generator, so a
run stays reproducible and resumable and both arms of a comparison draw the same ones.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from monai.transforms import Affine


@dataclasses.dataclass(frozen=True)
class AugmentRanges:
    """Uniform ranges: rotation about Z ±``rotation_deg``; in-plane scale 1 ± ``scale``; in-plane
    shift ± ``shift`` of the in-plane size; intensity ``x·(1 + a) + b`` with a ∈ ±``intensity``,
    b ∈ ±``intensity``/2 (images in [-1, 1], clipped back to it); a left-right flip half the time."""

    rotation_deg: float = 15.0
    scale: float = 0.1
    shift: float = 0.05
    intensity: float = 0.1


def augment_labeled(
    images: torch.Tensor,
    labels: torch.Tensor,
    rng: np.random.Generator,
    ranges: AugmentRanges = AugmentRanges(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 1, X, Y, Z) in [-1, 1] and their class labels (B, 1, X, Y, Z) int64, each
    sample moved by its own random transform; returns new tensors on the same device."""
    out_images, out_labels = [], []
    for image, label in zip(images, labels, strict=True):
        # every draw is made for every sample, in a fixed order: the sequence of random numbers
        # does not depend on the values drawn
        angle = math.radians(ranges.rotation_deg) * rng.uniform(-1.0, 1.0)
        scale = 1.0 + ranges.scale * rng.uniform(-1.0, 1.0)
        shift = ranges.shift * rng.uniform(-1.0, 1.0, size=2) * np.array(image.shape[1:3])
        gain = 1.0 + ranges.intensity * rng.uniform(-1.0, 1.0)
        offset = 0.5 * ranges.intensity * rng.uniform(-1.0, 1.0)
        flip = bool(rng.random() < 0.5)

        affine = Affine(
            rotate_params=(0.0, 0.0, angle),
            scale_params=(scale, scale, 1.0),
            translate_params=(float(shift[0]), float(shift[1]), 0.0),
            image_only=True,
            device=image.device,
        )
        # .as_tensor(): plain tensors, not MONAI MetaTensors, go on into the losses
        moved = affine(image, mode="bilinear", padding_mode="border").as_tensor()
        moved_label = affine(label.float(), mode="nearest", padding_mode="zeros").as_tensor()
        moved = (moved * gain + offset).clamp(-1.0, 1.0)
        moved_label = moved_label.round().long()
        if flip:  # X is the left-right axis
            moved, moved_label = moved.flip(1), moved_label.flip(1)
        out_images.append(moved)
        out_labels.append(moved_label)
    return torch.stack(out_images), torch.stack(out_labels)


def dilate_in_plane(masks: torch.Tensor, voxels: int) -> torch.Tensor:
    """Bool masks (B, X, Y, Z) grown by ``voxels`` in X and Y (a square neighbourhood), not along
    Z: slices are thick, and the filled bladder is defined slice by slice."""
    if voxels <= 0:
        return masks
    size = 2 * voxels + 1
    grown = torch.nn.functional.max_pool3d(
        masks[:, None].float(), (size, size, 1), stride=1, padding=(voxels, voxels, 0)
    )
    return grown[:, 0] > 0


def with_target_context(
    warped: torch.Tensor,
    warped_bladder: torch.Tensor,
    target: torch.Tensor,
    target_bladder: torch.Tensor,
    margin: int = 1,
    target_margin: int = 2,
) -> torch.Tensor:
    """A registration-augmented image (B, 1, X, Y, Z) in the target's own surroundings.

    Inside the warped atlas's filled bladder grown by ``margin`` voxels, and inside the target's
    (predicted) filled bladder grown by ``target_margin``, the warped atlas image stays; everywhere
    else the target image replaces it. The warped label is unchanged: outside both bladders every
    voxel is background in the atlas's label and, as far as the target's prediction tells, in the
    target too. Masks (B, X, Y, Z) bool. Why: the warp carries the atlas's surroundings along, so
    every augmented pair shows the bladder against the one or two labeled scans' fat and muscle;
    the target's own tissue next to the wall (e.g. muscle as dense as the wall) is what the
    unlabeled scans can add.
    """
    keep = dilate_in_plane(warped_bladder, margin) | dilate_in_plane(target_bladder, target_margin)
    return torch.where(keep[:, None], warped, target)
