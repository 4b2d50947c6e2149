"""PatchGAN discriminators: one on random axial slices (2D), one on the whole volume (3D).

Both return a list of feature maps whose last element is the logit map; the others feed the
feature-matching loss. The 2D one is MONAI's ``PatchDiscriminator``. The 3D one is our own small
PatchGAN because MONAI's uses the same stride 2 on every axis and cannot take a 24-slice volume
through three layers (its Z size drops below the kernel); ours stops striding Z when it gets short.
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

from bladdergen.vqgan.config import VQGANConfig


def slice_discriminator(config: VQGANConfig) -> nn.Module:
    """PatchGAN on (B, 1, X, Y) axial slices -> list of features, logits last."""
    return PatchDiscriminator(
        spatial_dims=2,
        channels=config.disc_channels,
        in_channels=1,
        num_layers_d=config.disc_layers,
        norm="BATCH",
    )


class VolumeDiscriminator(nn.Module):
    """PatchGAN on (B, 1, X, Y, Z) volumes with anisotropic strides -> list of features, logits last.

    Layer i halves X and Y (kernel 4, stride 2) and halves Z only while Z >= 4 (else kernel 3,
    stride 1), then one stride-1 layer and a 1-channel logit conv, LeakyReLU(0.2), BatchNorm after
    the first layer (as in pix2pix / Medical Diffusion).
    """

    def __init__(self, config: VQGANConfig, depth: int) -> None:
        super().__init__()
        channels, z = config.disc_channels, depth
        layers: list[nn.Module] = []
        c_in = 1
        for i in range(config.disc_layers):
            z_stride = 2 if z >= 4 else 1
            z = z // z_stride
            c_out = config.disc_channels * 2**i
            layers.append(
                self._block(
                    c_in,
                    c_out,
                    kernel=(4, 4, 4 if z_stride == 2 else 3),
                    stride=(2, 2, z_stride),
                    norm=i > 0,
                )
            )
            c_in = c_out
        channels = config.disc_channels * 2**config.disc_layers
        layers.append(self._block(c_in, channels, kernel=(3, 3, 3), stride=(1, 1, 1), norm=True))
        self.layers = nn.ModuleList(layers)
        self.logits = nn.Conv3d(channels, 1, kernel_size=3, padding=1)

    @staticmethod
    def _block(c_in: int, c_out: int, kernel, stride, norm: bool) -> nn.Module:
        parts: list[nn.Module] = [
            nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=1, bias=not norm)
        ]
        if norm:
            parts.append(nn.BatchNorm3d(c_out))
        parts.append(nn.LeakyReLU(0.2))
        return nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        features.append(self.logits(x))
        return features
