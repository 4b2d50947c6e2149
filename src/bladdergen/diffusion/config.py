"""Settings of ``bladdergen train-ldm`` and ``bladdergen sample`` (defaults: ``paper`` profile).

The paper profile follows Medical Diffusion's latent DDPM (T = 300 cosine steps, epsilon
prediction, L1 loss, Adam 1e-4, gradient accumulation 2, weight EMA 0.995 every 10 steps from step
2000) with a pseudo-3D U-Net sized for one 24 GB GPU. ``LDM_TINY`` / ``SAMPLE_TINY`` hold what
differs in the CPU-minutes ``tiny`` profile.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from bladdergen.errors import ConfigError


@dataclasses.dataclass
class LDMConfig:
    """Latent DDPM denoiser and training settings.

    Denoiser: ``base_channels`` x ``channel_mults`` per U-Net level (in-plane resolution halves at
    every level but the last, depth never changes), ``attention_heads`` x ``attention_head_channels``
    in every attention block, depth attention with a learned relative position bias clamped at
    ``max_relative_distance`` slices. ``coordinate_channels`` appends three channels holding each
    latent voxel's X, Y and Z position (-1 to 1) to the denoiser's input: its in-plane convolutions
    and relative depth attention are blind to where along Z a slice lies, so without them nothing
    tells the denoiser where in the slab the bladder belongs. On the phantom bench (tiny profile,
    2,400 steps, 100 samples on each of two VQ-GANs) they cut label maps with the wall in pieces
    (two bladders in one slab) from 37 and 32 to 8 and 2 and raise the plausible share from 40
    and 29 to 58 and 39. Not in Medical Diffusion; runs trained before it existed load without.
    Diffusion: ``timesteps`` steps of a ``schedule`` noise schedule, ``loss`` between true and
    predicted noise. ``latent_scaling``: how latents enter diffusion space, ``codebook`` (the
    paper: the codebook's global min/max to [-1, 1]) or ``standardize`` (unit mean and variance
    per channel; see :class:`bladdergen.diffusion.latents.LatentScaler`). ``mirror_x`` also
    trains on every case mirrored left-right (X), encoded through the VQ-GAN (twice the latents;
    the pelvis is near-symmetric and a tumor may sit on either side). Optimisation:
    ``lr_schedule`` ``cosine`` lowers the rate from ``learning_rate`` to a tenth over
    ``max_steps``. EMA: every ``ema_every`` optimiser steps from ``ema_start`` (before that the
    EMA copy follows the live weights).
    """

    # denoiser
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    attention_heads: int = 8
    attention_head_channels: int = 32
    norm_groups: int = 8
    max_relative_distance: int = 32
    coordinate_channels: bool = True
    # diffusion
    latent_scaling: Literal["codebook", "standardize"] = "codebook"
    # also train on every case mirrored left-right (X), encoded through the VQ-GAN
    mirror_x: bool = False
    timesteps: int = 300
    schedule: Literal["cosine", "linear"] = "cosine"
    loss: Literal["l1", "l2"] = "l1"
    # optimisation
    max_steps: int = 100_000
    batch_size: int = 2
    grad_accumulation: int = 2
    learning_rate: float = 1e-4
    # cosine: from learning_rate down to a tenth of it over max_steps
    lr_schedule: Literal["constant", "cosine"] = "constant"
    ema_decay: float = 0.995
    ema_every: int = 10
    ema_start: int = 2000
    log_every: int = 50
    checkpoint_every: int = 1000
    # where the encoded training latents are cached; None = RUN_DIR/latents
    latent_cache_dir: str | None = None
    device: str = "auto"

    def validate(self) -> None:
        positive = {
            "base_channels": self.base_channels,
            "attention_heads": self.attention_heads,
            "attention_head_channels": self.attention_head_channels,
            "norm_groups": self.norm_groups,
            "max_relative_distance": self.max_relative_distance,
            "timesteps": self.timesteps,
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "grad_accumulation": self.grad_accumulation,
            "ema_every": self.ema_every,
            "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"ldm.{key}: got {value}, expected >= 1")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ConfigError(
                f"ldm.channel_mults: got {list(self.channel_mults)}, expected positive integers"
            )
        for mult in self.channel_mults:
            if (self.base_channels * mult) % self.norm_groups:
                raise ConfigError(
                    f"ldm.base_channels: {self.base_channels} x {mult} is not divisible by "
                    f"ldm.norm_groups {self.norm_groups}"
                )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ldm.ema_decay: got {self.ema_decay}, expected in [0, 1)")
        if self.ema_start < 0:
            raise ConfigError(f"ldm.ema_start: got {self.ema_start}, expected >= 0")
        if self.learning_rate <= 0:
            raise ConfigError(f"ldm.learning_rate: got {self.learning_rate}, expected > 0")


@dataclasses.dataclass
class SampleConfig:
    """How ``sample`` draws volumes from a trained LDM.

    ``sampler``: ``ddim`` (~50 steps; ``eta`` 1 by default adds DDPM-sized noise at every step, 0 is
    deterministic) or ``ddpm`` (ancestral; with ``steps`` equal to the training T it is the paper's
    sampler). Fresh noise at each step lets the sampler correct the errors of an imperfect
    denoiser (Karras et al. 2022): on phantoms, with the tiny profile's 1,200-step LDM, 56 of 200
    samples had a plausible label map with ``eta`` 1 against 15 with ``eta`` 0. ``clip_x0`` clamps each step's
    predicted clean latent to the codebook's range ([-1, 1] with the paper's codebook scaling) as
    the paper does. ``previews`` writes a
    PNG montage of all axial slices next to every volume (the generated label outlined on it).

    ``layout``: ``bladdergen`` (images at the top of OUT, ``labels/`` in the dataset's values) or
    ``nnunet`` (nnU-Net v2 raw: ``imagesTr/``, ``labelsTr/`` with classes 0/1/2, ``dataset.json``).
    ``keep``: ``all`` samples, or only ``plausible`` ones (every anatomy check of the generated
    label map passes); then ``-n`` counts kept samples and at most ``max_attempts`` x n candidates
    are tried, the rejected ones recorded in the manifest. Both need a VQ-GAN with a trained label
    decoder.

    ``noise``: ``none`` writes the decoder's output as it is (the paper); ``residual`` adds to each
    volume the CT noise the decoder leaves out, at the level and correlation ``train-ldm``
    measured on the training set (``diffusion.noise``). Measured on phantoms, the noise makes the
    volumes look like the real ones (adjacent-slice SSIM +22 % -> +3 % of the real set's) but
    makes them worse training data (supervised + synthetic pairs: wall Dice -0.024 against the
    same samples without it), so it is off by default. LDMs trained before the noise model
    existed sample without it.
    """

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = 50
    eta: float = 1.0
    clip_x0: bool = True
    batch_size: int = 4
    previews: bool = True
    layout: Literal["bladdergen", "nnunet"] = "bladdergen"
    keep: Literal["all", "plausible"] = "all"
    max_attempts: int = 10
    noise: Literal["residual", "none"] = "none"
    device: str = "auto"

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"sample.max_attempts: got {self.max_attempts}, expected >= 1")
        if self.steps < 1:
            raise ConfigError(f"sample.steps: got {self.steps}, expected >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"sample.batch_size: got {self.batch_size}, expected >= 1")
        if self.eta < 0:
            raise ConfigError(f"sample.eta: got {self.eta}, expected >= 0")


LDM_TINY = {
    "base_channels": 16,
    "channel_mults": [1, 2, 2],
    "attention_heads": 2,
    "attention_head_channels": 16,
    # phantom bench, 100 samples with DDIM eta 1, label maps passing every anatomy check: 1,200
    # steps -> 16 and 3 (VQ-GAN seeds 0 and 1), 2,400 -> 40 and 29 (~9 min on one CPU core;
    # `bladdergen demo` trains its own 600); with coordinate channels 2,400 -> 58 and 39. With
    # the cosine rate, 4,800 against 2,400 on three LDM seeds: pair Dice +0.014 / +0.032 / +0.079
    # (the image follows its label), but on two seeds 2.3x / 2.6x the samples with a tumor piece
    # off the wall or outside the bladder
    "max_steps": 2400,
    "batch_size": 4,
    "grad_accumulation": 1,
    # at 1,200 steps the rate decided most: 3e-4 -> 0, 1e-3 -> 28, 3e-3 -> 54 (an earlier
    # VQ-GAN objective); 2,400 steps at 1e-3 -> 48
    "learning_rate": 3e-3,
    # cosine to a tenth against the constant rate, 2,400 steps, in four paired comparisons (two
    # VQ-GANs, two LDM seeds, the 200-sample bench): the image follows its label better every
    # time (judge's pair Dice +0.033 to +0.067); the plausible share moves within its noise
    "lr_schedule": "cosine",
    "ema_decay": 0.99,
    "ema_every": 1,
    "ema_start": 200,
    "log_every": 25,
    "checkpoint_every": 250,
}
SAMPLE_TINY = {"batch_size": 4}
