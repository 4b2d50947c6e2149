"""The 3D VQ-GAN autoencoder: encoder -> 1x1x1 projection -> codebook -> decoder.

Layout ``(B, C, X, Y, Z)``, Z the axial slice axis. After Medical Diffusion / TATS: a 3x3x3 input
conv, per stage one strided conv (kernel 4, stride 2 on every axis still to be downsampled, kernel
3 stride 1 on the others) and one residual block, GroupNorm + SiLU, a 1x1x1 conv to the latent;
the decoder mirrors it with two residual blocks per stage and no output activation. Every conv pads
with *replicate* ("same" size), so borders are not pulled towards zero (air is -1, not 0).
Upsampling is nearest-neighbour + conv instead of a transposed conv: same receptive field, no
checkerboard artefacts.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bladdergen.errors import InputError
from bladdergen.vqgan.codebook import Codebook
from bladdergen.vqgan.config import VQGANConfig


def _groups(channels: int, wanted: int) -> int:
    """Largest group count <= ``wanted`` that divides ``channels`` (GroupNorm needs a divisor)."""
    return math.gcd(channels, wanted)


class SamePadConv3d(nn.Module):
    """Conv3d with replicate padding so the output is input / stride on every axis."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], stride=(1, 1, 1)):
        super().__init__()
        pads = []
        for k, s in zip(reversed(kernel), reversed(stride), strict=True):
            total = k - s
            pads += [total - total // 2, total // 2]  # the extra voxel goes in front
        self.pad = tuple(pads)
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class ResBlock(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> conv3, plus identity; channels unchanged."""

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        groups = _groups(channels, num_groups)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels, eps=1e-6),
            nn.SiLU(),
            SamePadConv3d(channels, channels, (3, 3, 3)),
            nn.GroupNorm(groups, channels, eps=1e-6),
            nn.SiLU(),
            SamePadConv3d(channels, channels, (3, 3, 3)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def stage_strides(downsample: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Per-stage strides: stage i halves every axis whose factor needs more than i halvings.

    (8, 8, 2) -> [(2, 2, 2), (2, 2, 1), (2, 2, 1)].
    """
    halvings = [int(math.log2(f)) for f in downsample]
    return [
        tuple(2 if h > stage else 1 for h in halvings)  # type: ignore[misc]
        for stage in range(max(halvings, default=0))
    ]


class Encoder(nn.Module):
    """(B, 1, X, Y, Z) -> (B, E, X/fx, Y/fy, Z/fz) continuous latent."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        width = config.n_hiddens
        self.conv_first = SamePadConv3d(1, width, (3, 3, 3))
        self.stages = nn.ModuleList()
        for stride in stage_strides(config.downsample):
            kernel = tuple(4 if s == 2 else 3 for s in stride)
            self.stages.append(
                nn.Sequential(
                    SamePadConv3d(width, width * 2, kernel, stride),
                    ResBlock(width * 2, config.num_groups),
                )
            )
            width *= 2
        self.final = nn.Sequential(
            nn.GroupNorm(_groups(width, config.num_groups), width, eps=1e-6), nn.SiLU()
        )
        self.pre_vq = nn.Conv3d(width, config.embedding_dim, 1)
        self.checkpointing = config.activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_first(x)
        for stage in self.stages:
            for block in stage:
                h = _maybe_checkpoint(block, h, self.checkpointing and self.training)
        return self.pre_vq(self.final(h))


class Decoder(nn.Module):
    """(B, E, x, y, z) latent -> (B, C, X, Y, Z): the image (C = 1), or label logits (C = 3, or
    4 with the lumen).

    With ``condition_channels`` K > 0 the last convolution also reads a (B, K, X, Y, Z) map at
    full resolution (the image decoder: the label decoder's class probabilities)."""

    def __init__(
        self, config: VQGANConfig, out_channels: int = 1, condition_channels: int = 0
    ) -> None:
        super().__init__()
        strides = stage_strides(config.downsample)
        width = config.n_hiddens * 2 ** len(strides)
        self.post_vq = nn.Conv3d(config.embedding_dim, width, 1)
        self.first = nn.Sequential(
            nn.GroupNorm(_groups(width, config.num_groups), width, eps=1e-6), nn.SiLU()
        )
        self.scales: list[tuple[int, int, int]] = []
        self.stages = nn.ModuleList()
        for stride in reversed(strides):
            out = max(width // 2, config.n_hiddens)
            self.scales.append(stride)
            self.stages.append(
                nn.Sequential(
                    SamePadConv3d(width, out, (3, 3, 3)),
                    ResBlock(out, config.num_groups),
                    ResBlock(out, config.num_groups),
                )
            )
            width = out
        self.condition_channels = condition_channels
        self.conv_last = SamePadConv3d(width + condition_channels, out_channels, (3, 3, 3))
        self.checkpointing = config.activation_checkpointing

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if (condition is None) != (self.condition_channels == 0):
            raise ValueError(
                f"this decoder takes a {self.condition_channels}-channel condition map; "
                f"got {'none' if condition is None else tuple(condition.shape)}"
            )
        h = self.first(self.post_vq(z))
        for scale, stage in zip(self.scales, self.stages, strict=True):
            h = F.interpolate(h, scale_factor=scale, mode="nearest")
            for block in stage:
                h = _maybe_checkpoint(block, h, self.checkpointing and self.training)
        if condition is not None:
            h = torch.cat([h, condition.to(h.dtype)], dim=1)
        return self.conv_last(h)


def _maybe_checkpoint(module: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Activation checkpointing: recompute ``module`` in backward instead of storing its insides.

    Applied per conv / residual block, so the backward pass holds one block's activations at a
    time (a whole full-resolution decoder stage is ~7.7 GB at 512x512x24 in fp32).
    """
    if enabled and x.requires_grad:
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


@dataclasses.dataclass
class VQGANOutput:
    """What a training forward pass returns.

    ``x_hat`` (B, 1, X, Y, Z); ``z_e`` (B, E, x, y, z) pre-quantisation latent; ``z_q`` quantised
    latent (straight-through); ``indices`` (B, x, y, z); ``commitment`` unweighted scalar;
    ``perplexity`` and ``used_fraction`` of the batch's codes; ``label_logits`` (B, K, X, Y, Z)
    over background, wall, tumor (and lumen with ``label_lumen``: K = 4) from the label decoder
    (None without ``label_head``).
    """

    x_hat: torch.Tensor
    z_e: torch.Tensor
    z_q: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor
    perplexity: torch.Tensor
    used_fraction: torch.Tensor
    label_logits: torch.Tensor | None = None


N_CLASSES = 3  # background, wall, tumor: the classes of a label map
LUMEN = 3  # the label decoder's extra class with ``label_lumen``; written as background


def _label_classes(logits: torch.Tensor) -> torch.Tensor:
    """Label logits (B, K, X, Y, Z) -> (B, X, Y, Z) uint8 classes, the lumen written as 0."""
    classes = logits.float().argmax(dim=1)
    classes[classes == LUMEN] = 0
    return classes.to(torch.uint8)


class VQGAN(nn.Module):
    """The stage-1 autoencoder. Inputs are CT volumes in [-1, 1], shape (B, 1, X, Y, Z)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        n_label = N_CLASSES + int(config.label_lumen)
        self.label_decoder = Decoder(config, n_label) if config.label_head else None
        # the image drawn from the labels: its last layer reads the label decoder's map
        conditioned = config.label_head and config.image_from_labels
        self.decoder = Decoder(config, condition_channels=n_label if conditioned else 0)
        self.codebook = Codebook(
            config.n_codes,
            config.embedding_dim,
            decay=config.codebook_decay,
            eps=config.codebook_eps,
            restart_threshold=config.restart_threshold,
            chunk=config.search_chunk,
        )

    def latent_shape(self, volume_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        """(X, Y, Z) voxels -> (E, X/fx, Y/fy, Z/fz); InputError if an axis is not divisible."""
        shape = tuple(int(n) for n in volume_shape)
        for axis, n, f in zip("XYZ", shape, self.config.downsample, strict=True):
            if n % f:
                raise InputError(
                    f"volume shape {list(shape)}: {axis} size {n} is not divisible by the "
                    f"VQ-GAN downsampling factor {f} (vqgan.downsample "
                    f"{list(self.config.downsample)})"
                )
        fx, fy, fz = self.config.downsample
        return (self.config.embedding_dim, shape[0] // fx, shape[1] // fy, shape[2] // fz)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) in [-1, 1] -> continuous pre-quantisation latent (B, E, x, y, z)."""
        self.latent_shape(tuple(x.shape[2:]))
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of (B, E, x, y, z) -> (z_q exact code vectors, indices (B, x, y, z)).

        Never updates the codebook (the EMA update only happens in :meth:`forward` in train mode).
        """
        return self.codebook.lookup(z_e)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, E, x, y, z) quantised latent -> (B, 1, X, Y, Z) reconstruction."""
        return self._decode_image(z_q, None)

    def _decode_image(self, z_q: torch.Tensor, label_logits: torch.Tensor | None) -> torch.Tensor:
        """The image decoder; with ``image_from_labels`` it reads the label decoder's class
        probabilities (computed here unless ``label_logits`` are given), detached: the image
        loss trains the image decoder to follow the labels, never the labels to suit the image."""
        if self.decoder.condition_channels == 0:
            return self.decoder(z_q)
        if label_logits is None:
            label_logits = self.decode_labels(z_q)
        return self.decoder(z_q, torch.softmax(label_logits.float(), dim=1).detach())

    def decode_labels(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, E, x, y, z) quantised latent -> (B, K, X, Y, Z) label logits; needs ``label_head``."""
        if self.label_decoder is None:
            raise ValueError("this VQ-GAN has no label decoder (vqgan.label_head is off)")
        return self.label_decoder(z_q)

    @torch.no_grad()
    def decode_label_classes(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, E, x, y, z) quantised latent -> (B, X, Y, Z) uint8 label map, 0 background (lumen
        included), 1 wall, 2 tumor: the most likely class per voxel."""
        return _label_classes(self.decode_labels(z_q))

    @torch.no_grad()
    def decode_pair(self, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, E, x, y, z) quantised latent -> (image (B, 1, X, Y, Z), label map (B, X, Y, Z)
        uint8 as :meth:`decode_label_classes`), the label decoder run once for both."""
        logits = self.decode_labels(z_q)
        return self._decode_image(z_q, logits), _label_classes(logits)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, x, y, z) code indices -> (B, 1, X, Y, Z) reconstruction."""
        return self.decode(self.codebook.embed(indices))

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        """Training pass: encode, quantise (EMA update in train mode), decode."""
        z_e = self.encode(x)
        q = self.codebook(z_e)
        labels = self.label_decoder(q.z_q) if self.label_decoder is not None else None
        return VQGANOutput(
            x_hat=self._decode_image(q.z_q, labels),
            label_logits=labels,
            z_e=z_e,
            z_q=q.z_q,
            indices=q.indices,
            commitment=q.commitment,
            perplexity=q.perplexity,
            used_fraction=q.used_fraction,
        )

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: (B, 1, X, Y, Z) -> (x_hat, indices); the codebook is not touched."""
        z_q, indices = self.quantize(self.encode(x))
        return self.decode(z_q), indices

    def codebook_range(self) -> tuple[float, float]:
        """Global (min, max) over all codebook entries: the LDM scales latents by these."""
        return self.codebook.value_range()
