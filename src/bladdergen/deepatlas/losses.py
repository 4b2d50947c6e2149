"""DeepAtlas losses (SPEC §1.5), built from MONAI parts.

- similarity: local normalised cross-correlation, -LNCC² in [-1, 0] (MONAI), averaged over an
  in-plane pyramid (``lncc_scales``: average-pooling factors in X and Y) so that a window of
  ``lncc_kernel`` voxels also sees offsets of several voxels; computed in float32 with TF32 off,
  because TF32 can make the local variance negative and the loss hugely negative.
- regularity: bending energy of the displacement field **in voxel units** (``normalize=False``,
  MONAI 1.6 stencil): the mean over voxels of the squared second differences of the field in
  voxels. ``normalize=True`` would treat the field as a fraction of the volume and multiply its
  energy by ~size² per axis (~2,200 in-plane and ~15,000 along Z at 64x64x24), which made the
  old weight ~200x too stiff.
- anatomy: soft Dice between the warped moving segmentation and the target segmentation. The
  channels are built by :func:`anatomy_channels`: the wall and the *filled bladder* (wall ∪ lumen ∪
  tumor), whose overlap still grows when thin walls do not touch yet (a capture range). Tumors
  are not compared: another patient's tumor is no label for this one.
- supervised: foreground-only Dice over the whole batch (a class of 0.02 % of the voxels keeps a
  useful gradient) + class-weighted cross-entropy, from logits and manual class labels. Voxels of
  class :data:`IGNORED` (a synthetic pair's generated tumor, ``synthetic_pair_tumor`` "ignore")
  count in neither term: MONAI's ``MaskedDiceLoss`` zeroes them in prediction and target after the
  softmax, and cross-entropy skips them by ``ignore_index``.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from monai.losses import (
    BendingEnergyLoss,
    DiceLoss,
    LocalNormalizedCrossCorrelationLoss,
    MaskedDiceLoss,
)

from bladdergen.deepatlas.align import filled_bladder_from_probs

TUMOR = 2  # class label of a tumor voxel (background 0, wall 1)
IGNORED = 3  # class label of voxels the supervised loss leaves out (background, wall, tumor: 0-2)


def without_tumor(classes: torch.Tensor) -> torch.Tensor:
    """Class labels with every tumor voxel marked ``IGNORED``: left out of the supervised loss."""
    return classes.masked_fill(classes == TUMOR, IGNORED)


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

    def __init__(
        self,
        lncc_kernel: int = 3,
        lncc_scales: tuple[int, ...] = (1,),
        class_weights: tuple[float, ...] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        self.lncc = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=3, kernel_size=lncc_kernel, kernel_type="rectangular"
        )
        self.lncc_scales = tuple(lncc_scales)
        self.bending = BendingEnergyLoss(normalize=False)
        # soft_label: the target may be a probability map (F_S's prediction), not one-hot
        self.dice = DiceLoss(include_background=True, soft_label=True)
        # batch=True: one Dice over the batch, so a tumor-free case does not score a tumor
        # channel on its own; background excluded (it is 99 % of the voxels)
        self.fg_dice = DiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True
        )
        self.masked_fg_dice = MaskedDiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True
        )
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))

    def similarity(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-LNCC² of two images (B, 1, X, Y, Z), averaged over the in-plane pyramid; -1 for
        identical images."""
        with _full_precision(warped):
            warped, target = warped.float(), target.float()
            terms = []
            for factor in self.lncc_scales:
                if factor > 1:
                    pool = (factor, factor, 1)
                    a, b = F.avg_pool3d(warped, pool, pool), F.avg_pool3d(target, pool, pool)
                else:
                    a, b = warped, target
                terms.append(self.lncc(a, b))
            return torch.stack(terms).mean()

    def regularity(self, field: torch.Tensor) -> torch.Tensor:
        """Bending energy of a field (B, 3, X, Y, Z) in voxels, per voxel; spatial sizes > 2."""
        with _full_precision(field), warnings.catch_warnings():
            # MONAI 1.6.1 indexes with a list inside BendingEnergyLoss; torch warns on every call.
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
            return self.bending(field.float())

    def anatomy(self, warped_moving: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft Dice loss of two maps (B, C, X, Y, Z) in [0, 1] (averaged over channels)."""
        with _full_precision(target):
            return self.dice(warped_moving.float(), target.float())

    def supervised(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Foreground batch Dice + class-weighted cross-entropy of logits (B, 3, X, Y, Z) against
        class labels (B, 1, X, Y, Z); voxels labeled :data:`IGNORED` are left out of both."""
        with _full_precision(logits):
            logits = logits.float()
            kept = classes != IGNORED
            if kept.all():  # the usual case, computed exactly as without the ignore label
                dice = self.fg_dice(logits, classes)
            else:
                dice = self.masked_fg_dice(logits, classes * kept, kept.to(logits.dtype))
            ce = F.cross_entropy(
                logits, classes[:, 0].long(), weight=self.class_weights, ignore_index=IGNORED
            )
            return dice + ce


def anatomy_channels(probs: torch.Tensor, filled: bool = True) -> torch.Tensor:
    """The maps the anatomy loss compares, from probabilities or one-hot (B, 3, X, Y, Z).

    With ``filled``: (B, 2, X, Y, Z) = wall, filled bladder. The filled bladder is
    ``1 - p_bg`` outside the lumen and 1 inside it (lumen: the background that the argmax's wall
    and tumor enclose in an axial slice), so it stays differentiable in ``probs``. Without: the
    three class probabilities as they are.
    """
    if not filled:
        return probs
    organ = filled_bladder_from_probs(probs)
    lumen = (organ & (probs.detach().argmax(dim=1) == 0)).to(probs.dtype)
    bladder = 1.0 - probs[:, 0] * (1.0 - lumen)
    return torch.stack([probs[:, 1], bladder], dim=1)


def one_hot(classes: torch.Tensor, n_classes: int = 3) -> torch.Tensor:
    """Class labels (B, 1, X, Y, Z) integer -> one-hot float (B, n_classes, X, Y, Z)."""
    hot = torch.nn.functional.one_hot(classes[:, 0].long(), n_classes)
    return hot.permute(0, 4, 1, 2, 3).float()
