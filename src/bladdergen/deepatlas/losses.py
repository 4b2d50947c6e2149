"""DeepAtlas losses (SPEC §1.5), built from MONAI parts.

- similarity: local normalised cross-correlation, -LNCC² in [-1, 0] (MONAI); computed in float32
  with TF32 off, because TF32 can make the local variance negative and the loss hugely negative.
- regularity: bending energy of the displacement field, ``normalize=True`` so the weight does not
  depend on the volume size (MONAI 1.6 stencil).
- anatomy: soft Dice between the warped moving segmentation and the target segmentation, both
  probabilities over (background, wall, tumor); zero for identical segmentations.
- supervised: Dice + cross-entropy of segmentation logits against manual class labels.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from monai.losses import (
    BendingEnergyLoss,
    DiceCELoss,
    DiceLoss,
    LocalNormalizedCrossCorrelationLoss,
)


def disable_tf32() -> None:
    """Turn TF32 matmul/convolution off (MONAI#6525: LNCC under TF32 can give huge negative loss)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _full_precision(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for a loss: these sums and variances need float32."""
    if tensor.device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the "meta" device of the memory benchmark


class DeepAtlasLosses(torch.nn.Module):
    """The four loss terms; shapes (B, C, X, Y, Z), images in [-1, 1], fields in voxels."""

    def __init__(self, lncc_kernel: int = 3) -> None:
        super().__init__()
        self.lncc = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=3, kernel_size=lncc_kernel, kernel_type="rectangular"
        )
        self.bending = BendingEnergyLoss(normalize=True)
        # soft_label: the target may be a probability map (F_S's prediction), not one-hot
        self.dice = DiceLoss(include_background=True, soft_label=True)
        self.dice_ce = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)

    def similarity(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-LNCC² of two images (B, 1, X, Y, Z); -1 for identical images."""
        with _full_precision(warped):
            return self.lncc(warped.float(), target.float())

    def regularity(self, field: torch.Tensor) -> torch.Tensor:
        """Normalised bending energy of a field (B, 3, X, Y, Z); every spatial size must be > 2."""
        with _full_precision(field), warnings.catch_warnings():
            # MONAI 1.6.1 indexes with a list inside BendingEnergyLoss; torch warns on every call.
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
            return self.bending(field.float())

    def anatomy(self, warped_moving: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft Dice loss of two probability maps (B, 3, X, Y, Z) (averaged over classes)."""
        with _full_precision(target):
            return self.dice(warped_moving.float(), target.float())

    def supervised(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy of logits (B, 3, X, Y, Z) against class labels (B, 1, X, Y, Z)."""
        with _full_precision(logits):
            return self.dice_ce(logits.float(), classes)


def one_hot(classes: torch.Tensor, n_classes: int = 3) -> torch.Tensor:
    """Class labels (B, 1, X, Y, Z) integer -> one-hot float (B, n_classes, X, Y, Z)."""
    hot = torch.nn.functional.one_hot(classes[:, 0].long(), n_classes)
    return hot.permute(0, 4, 1, 2, 3).float()
