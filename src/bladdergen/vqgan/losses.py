"""Loss terms of the VQ-GAN: GAN losses, feature matching, slice picking, optional perceptual loss.

Hinge is our own four lines: MONAI's ``PatchAdversarialLoss(criterion="hinge")`` squashes logits
with tanh and uses a hinge form for the generator, which is not the paper's loss
(research/monai.md §1.6). ``least_squares`` uses MONAI's loss with ``no_activation_leastsq=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bladdergen.errors import InputError


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5·(mean ReLU(1 − D(x)) + mean ReLU(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """Generator loss −mean D(x̂) (Medical Diffusion / taming-transformers)."""
    return -fake.mean()


class AdversarialLoss:
    """Generator and discriminator GAN losses on logit maps: ``hinge`` or ``least_squares``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "least_squares":
            from monai.losses import PatchAdversarialLoss

            self._monai = PatchAdversarialLoss(
                criterion="least_squares", no_activation_leastsq=True
            )

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.kind == "hinge":
            return hinge_d_loss(real, fake)
        return 0.5 * (
            self._monai(real, target_is_real=True, for_discriminator=True)
            + self._monai(fake, target_is_real=False, for_discriminator=True)
        )

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        if self.kind == "hinge":
            return hinge_g_loss(fake)
        return self._monai(fake, target_is_real=True, for_discriminator=False)


def feature_matching_loss(
    fake_features: list[torch.Tensor], real_features: list[torch.Tensor]
) -> torch.Tensor:
    """L1 between the discriminator's intermediate features on x̂ and (detached) on x.

    The logits (last element) are excluded; the sum over layers is scaled by 4 / number of layers,
    as upstream (weight 1 per layer for its 4 layers).
    """
    pairs = list(zip(fake_features[:-1], real_features[:-1], strict=True))
    total = sum(F.l1_loss(f, r.detach()) for f, r in pairs)
    return total * (4.0 / len(pairs))


def pick_slices(volume: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One axial slice per volume: (B, C, X, Y, Z) and (B,) slice indices -> (B, C, X, Y)."""
    batch = torch.arange(volume.shape[0], device=volume.device)
    return volume[batch, :, :, :, index.to(volume.device)]


def perceptual_loss(weights_path: str | None):
    """MONAI PerceptualLoss (2D, torchvision ResNet-50) from a local state-dict file, or None.

    ``None`` means the term is off. A missing file or a missing torchvision is an InputError with
    the fix, never a download attempt.
    """
    if weights_path is None:
        return None
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise InputError(
            f"vqgan.perceptual_weights: {path} not found; expected a local torchvision "
            "ResNet-50 state-dict file (.pth), or null to switch the perceptual loss off"
        )
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise InputError(
            "vqgan.perceptual_weights is set but torchvision is not installed; "
            "`pip install torchvision`, or set vqgan.perceptual_weights to null"
        ) from None
    from monai.losses import PerceptualLoss

    try:
        loss = PerceptualLoss(
            spatial_dims=2, network_type="resnet50", pretrained=True, pretrained_path=str(path)
        )
    except (RuntimeError, KeyError, OSError) as error:
        raise InputError(
            f"vqgan.perceptual_weights: {path} is not a usable ResNet-50 state dict ({error})"
        ) from None
    return loss.eval().requires_grad_(False)
