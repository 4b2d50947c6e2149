"""Settings of ``bladdergen train-vqgan`` (defaults: the ``paper`` profile).

The paper profile follows Medical Diffusion's VQ-GAN (n_hiddens 16, embedding dim 8, 16,384 codes,
EMA decay 0.99, commitment 0.25, 4·L1 + 4·perceptual + GAN + 4·feature matching, Adam (0.5, 0.9),
batch 2, gradient clip 1.0) on 512x512x24 volumes, downsampled (8, 8, 2) to an 8x64x64x12 latent.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from bladdergen.errors import ConfigError


@dataclasses.dataclass
class VQGANConfig:
    """3D VQ-GAN architecture and training settings.

    Architecture: ``n_hiddens`` channels at full resolution, doubled at every downsampling stage;
    ``downsample`` is the per-axis factor (X, Y, Z), each a power of two (Z usually smaller: thick
    slices); ``embedding_dim`` latent channels; ``n_codes`` codebook entries.

    Codebook: EMA ``codebook_decay``, Laplace smoothing ``codebook_eps``, a code whose EMA count falls
    below ``restart_threshold`` is re-seeded from a current encoder output; the nearest-code search
    handles ``search_chunk`` latent vectors at a time (memory ~ search_chunk x n_codes floats).

    Optimisation: ``lr_schedule`` ``cosine`` lowers the autoencoder's learning rate from ``lr`` to
    ``lr / 10`` over ``max_steps`` (a steadier final model on short runs); the paper used a
    constant rate.

    Losses: ``l1_weight``·L1 + ``commitment_weight``·MSE(z_e, sg(z_q)) + ``perceptual_weight``·
    perceptual (only with a local ``perceptual_weights``: a torchvision ResNet-50 state dict file for
    MONAI's PerceptualLoss) + after ``disc_start`` steps ``image_gan_weight``·G2d +
    ``video_gan_weight``·G3d + ``gan_feat_weight``·feature matching. On labeled cases also
    ``region_weight``·the mean of the L1 inside the wall, the tumor, the urine and a 2-voxel shell
    of tissue around the bladder, each structure weighed alike (what segmentation reads: a few
    percent of the voxels, whose 10-40 HU contrast a plain L1 averages away) and, with ``label_head``,
    ``label_weight``·(cross-entropy + foreground Dice) of the label decoder.

    Augmentation: ``flip_augmentation`` mirrors left-right (X) only; a flipped Y (anterior-posterior)
    or Z (head-feet) axis is not an anatomy a scanner produces.
    """

    # architecture
    n_hiddens: int = 16
    downsample: tuple[int, int, int] = (8, 8, 2)
    embedding_dim: int = 8
    n_codes: int = 16384
    num_groups: int = 32
    activation_checkpointing: bool = True
    # codebook
    codebook_decay: float = 0.99
    codebook_eps: float = 1e-7
    restart_threshold: float = 1.0
    search_chunk: int = 8192
    # losses
    l1_weight: float = 4.0
    commitment_weight: float = 0.25
    perceptual_weight: float = 4.0
    perceptual_weights: str | None = None
    image_gan_weight: float = 1.0
    video_gan_weight: float = 1.0
    gan_feat_weight: float = 4.0
    # labels: a second decoder reads the same latent and predicts the label map, so a sampled
    # latent decodes to a CT and its labels in one geometry (trained on the labeled cases only)
    label_head: bool = True
    label_weight: float = 1.0
    # the label decoder also predicts the urine-filled lumen (derived by hole filling) as a class
    # of its own, written as background: with urine and outside both "background" it was free to
    # grow the wall into the lumen (decoded walls 2-3x too thick, urine 8% of the bladder)
    label_lumen: bool = True
    # the image decoder's last layer reads the label decoder's class probabilities, so a
    # generated image draws its structures where its generated label map puts them
    image_from_labels: bool = True
    # extra L1 weight inside wall, tumor, urine and the tissue around (labeled cases): keeps their
    # low contrast
    region_weight: float = 4.0
    gan_loss: Literal["hinge", "least_squares"] = "hinge"
    disc_start: int = 5000
    disc_channels: int = 64
    disc_layers: int = 3
    # optimisation
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    disc_lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    batch_size: int = 2
    max_steps: int = 100_000
    flip_augmentation: bool = True
    device: str = "auto"
    # logging and checkpoints (in steps)
    log_every: int = 10
    checkpoint_every: int = 1000
    image_every: int = 1000

    def validate(self) -> None:
        """Range checks; raises ConfigError naming the key."""
        for axis, factor in zip("XYZ", self.downsample, strict=True):
            if factor < 1 or factor & (factor - 1):
                raise ConfigError(
                    f"vqgan.downsample: {axis} factor {factor} is not a power of two >= 1"
                )
        positive = {
            "n_hiddens": self.n_hiddens,
            "embedding_dim": self.embedding_dim,
            "n_codes": self.n_codes,
            "num_groups": self.num_groups,
            "search_chunk": self.search_chunk,
            "disc_channels": self.disc_channels,
            "disc_layers": self.disc_layers,
            "grad_accumulation": self.grad_accumulation,
            "batch_size": self.batch_size,
            "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every,
            "image_every": self.image_every,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"vqgan.{key}: got {value}, expected >= 1")
        if self.n_codes < 2:
            raise ConfigError(f"vqgan.n_codes: got {self.n_codes}, expected >= 2")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ConfigError(
                f"vqgan.codebook_decay: got {self.codebook_decay}, expected in (0, 1)"
            )
        if self.max_steps < 1:
            # 0 steps would save an untrained model and exit 0 as if it had trained
            raise ConfigError(f"vqgan.max_steps: got {self.max_steps}, expected >= 1")
        if self.disc_start < 0:
            raise ConfigError(f"vqgan.disc_start: got {self.disc_start}, expected >= 0")
        for key in ("lr", "disc_lr", "grad_clip"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"vqgan.{key}: got {getattr(self, key)}, expected > 0")
        for key in (
            "l1_weight",
            "commitment_weight",
            "perceptual_weight",
            "image_gan_weight",
            "video_gan_weight",
            "gan_feat_weight",
            "restart_threshold",
            "codebook_eps",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"vqgan.{key}: got {getattr(self, key)}, expected >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"vqgan.betas: got {list(self.betas)}, expected two values in [0, 1)")


TINY = {
    "n_hiddens": 8,
    "downsample": [4, 4, 2],
    "n_codes": 512,
    "num_groups": 8,
    "activation_checkpointing": False,
    "search_chunk": 4096,
    "disc_channels": 16,
    "disc_layers": 2,
    "disc_start": 250,
    "lr": 3e-4,
    "lr_schedule": "cosine",
    "disc_lr": 2e-4,
    "max_steps": 400,
    "log_every": 10,
    "checkpoint_every": 100,
    "image_every": 100,
    "device": "cpu",
}
