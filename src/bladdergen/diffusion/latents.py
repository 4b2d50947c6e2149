"""The diffusion model's data: VQ-GAN latents of the training set, scaled to [-1, 1], cached on disk.

The frozen VQ-GAN (eval mode) encodes every preprocessed volume once into its continuous
pre-quantisation latent (D, x, y, z). The latents are cached in a safetensors file keyed by the
VQ-GAN weights' hash and the preprocessed set's hash, so a resumed or repeated run reuses them.
:class:`LatentScaler` maps them into diffusion space: to [-1, 1] with the global min/max of the
codebook (paper §3.3), or to unit variance per channel (``ldm.latent_scaling``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Protocol

import torch

from bladdergen.checkpoint import load_weights, save_weights
from bladdergen.data.dataset import MANIFEST_NAME, PreprocessedSet
from bladdergen.errors import CheckpointError
from bladdergen.fileio import sha256_file
from bladdergen.progress import SILENT, Reporter

LATENT_CACHE_KIND = "ldm-latents"


class LatentAutoencoder(Protocol):
    """What the diffusion stage needs from a VQ-GAN (``bladdergen.vqgan.model.VQGAN``)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) in [-1, 1] -> continuous latent (B, D, x, y, z)."""

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, D, x, y, z) -> (nearest codes (B, D, x, y, z), code indices)."""

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latent (B, D, x, y, z) -> volume (B, 1, X, Y, Z), roughly in [-1, 1]."""

    def codebook_range(self) -> tuple[float, float]:
        """Global (min, max) over every code and channel."""


SCALINGS = ("codebook", "standardize")


@dataclasses.dataclass(frozen=True)
class LatentScaler:
    """Per-channel affine map of VQ-GAN latents (B, D, x, y, z) into diffusion space:
    ``unit = (z - center) / spread``, and the box ``[clip_low, clip_high]`` per channel that the
    codebook's entries occupy there (where a sampler clamps its predicted clean latent).

    Two ways to choose it (``ldm.latent_scaling``):

    - ``codebook`` (the paper, §3.3): the global codebook min -> -1 and max -> +1 on every channel;
      the box is [-1, 1].
    - ``standardize``: each channel's training-latent mean -> 0 and standard deviation -> 1; the
      box is each channel's codebook min and max. Why: min-max scaling by the codebook leaves the
      latents a small part of [-1, 1] (measured on phantoms: standard deviation 0.16-0.33 per
      channel), so the forward process buries them in noise at a far lower noise level than the
      schedule was made for (signal-to-noise 0.03-0.1 of nominal) and most sampling steps see
      nearly pure noise (Chen 2023, "On the importance of noise scheduling for diffusion models";
      Stable Diffusion rescales its latents to unit variance for the same reason).
    """

    center: tuple[float, ...]
    spread: tuple[float, ...]
    clip_low: tuple[float, ...]
    clip_high: tuple[float, ...]
    scaling: str = "codebook"

    def __post_init__(self) -> None:
        sizes = {len(self.center), len(self.spread), len(self.clip_low), len(self.clip_high)}
        if len(sizes) != 1 or not self.center:
            raise ValueError("latent scaler needs one center, spread and clip bound per channel")
        if min(self.spread) <= 0:
            raise ValueError(f"latent scaler needs spreads > 0, got {list(self.spread)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"latent scaling {self.scaling!r}, expected one of {SCALINGS}")

    @classmethod
    def from_codebook(cls, low: float, high: float, channels: int) -> LatentScaler:
        """The paper's map: global codebook ``low`` -> -1, ``high`` -> +1 on every channel."""
        if not high > low:
            raise ValueError(f"latent scaler needs high > low, got [{low}, {high}]")
        center, spread = (high + low) / 2, (high - low) / 2
        return cls(
            (center,) * channels, (spread,) * channels, (-1.0,) * channels, (1.0,) * channels
        )

    @classmethod
    def standardized(cls, latents: torch.Tensor, codes: torch.Tensor) -> LatentScaler:
        """Unit mean and variance per channel of the training ``latents`` (N, D, x, y, z); the box
        is the per-channel min and max of the codebook ``codes`` (K, D) in that space."""
        center = latents.double().mean(dim=(0, 2, 3, 4))
        spread = latents.double().std(dim=(0, 2, 3, 4)).clamp(min=1e-6)
        low = (codes.double().min(dim=0).values - center) / spread
        high = (codes.double().max(dim=0).values - center) / spread
        return cls(
            *(tuple(float(v) for v in t) for t in (center, spread, low, high)), "standardize"
        )

    @classmethod
    def create(cls, scaling: str, latents: torch.Tensor, codes: torch.Tensor) -> LatentScaler:
        """The scaler ``scaling`` names for training ``latents`` (N, D, ...) and ``codes`` (K, D)."""
        if scaling == "standardize":
            return cls.standardized(latents, codes)
        return cls.from_codebook(float(codes.min()), float(codes.max()), codes.shape[1])

    def _view(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        """VQ-GAN latent (B, D, x, y, z) -> diffusion space (codes land in the clip box; encoder
        outputs may not)."""
        return (z - self._view(self.center, z)) / self._view(self.spread, z)

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> VQ-GAN latent (inverse of :meth:`to_unit`)."""
        return x * self._view(self.spread, x) + self._view(self.center, x)

    def clip_bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, D, 1, 1, 1) lower and upper bounds of the codebook's box in diffusion space."""
        return self._view(self.clip_low, like), self._view(self.clip_high, like)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scaling": self.scaling,
            "center": list(self.center),
            "spread": list(self.spread),
            "clip_low": list(self.clip_low),
            "clip_high": list(self.clip_high),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], channels: int | None = None) -> LatentScaler:
        """Read :meth:`to_dict`'s form, or the ``{"low", "high"}`` of LDMs written before
        per-channel scaling (``channels`` latent channels; codebook scaling)."""
        if "center" not in data:
            return cls.from_codebook(float(data["low"]), float(data["high"]), channels or 1)
        return cls(
            tuple(float(v) for v in data["center"]),
            tuple(float(v) for v in data["spread"]),
            tuple(float(v) for v in data["clip_low"]),
            tuple(float(v) for v in data["clip_high"]),
            str(data.get("scaling", "codebook")),
        )


def dataset_hash(dataset: PreprocessedSet) -> str:
    """SHA-256 over the set's manifest and every image file (what the latents depend on)."""
    digest = hashlib.sha256()
    digest.update(sha256_file(dataset.root / MANIFEST_NAME).encode())
    for case in dataset.cases:
        digest.update(case.case_id.encode())
        digest.update(sha256_file(case.image_path).encode())
    return digest.hexdigest()


@torch.no_grad()
def encode_dataset(
    vqgan: LatentAutoencoder,
    dataset: PreprocessedSet,
    device: torch.device,
    reporter: Reporter = SILENT,
    mirror_x: bool = False,
) -> torch.Tensor:
    """Pre-quantisation latents of every case, float32 on CPU, shape (N, D, x, y, z); with
    ``mirror_x`` the N latents of the cases mirrored left-right (X) follow, (2N, D, x, y, z). The
    mirrored image is encoded, not the latent flipped: the encoder's kernels are not symmetric."""
    plain, mirrored = [], []
    with reporter.task("encoding latents", total=len(dataset.cases)) as task:
        for case in dataset.cases:
            image = torch.from_numpy(dataset.load_image(case))[None, None].to(device)
            plain.append(vqgan.encode(image).float().cpu())
            if mirror_x:
                mirrored.append(vqgan.encode(image.flip(2)).float().cpu())
            task.advance(1)
    return torch.cat(plain + mirrored)


def cached_latents(
    vqgan: LatentAutoencoder,
    vqgan_hash: str,
    dataset: PreprocessedSet,
    cache_dir: Path,
    device: torch.device,
    reporter: Reporter = SILENT,
    mirror_x: bool = False,
) -> tuple[torch.Tensor, Path]:
    """The set's latents (see :func:`encode_dataset`) from ``cache_dir``, encoding and caching
    them if absent.

    The cache file name holds a hash of (VQ-GAN weights hash, data hash, mirroring), so a
    different VQ-GAN or changed data never reuses stale latents.
    """
    data_hash = dataset_hash(dataset)
    # the key of unmirrored caches is unchanged, so caches written before mirroring stay valid
    mirror = ":mirror_x" if mirror_x else ""
    key = hashlib.sha256(f"{vqgan_hash}:{data_hash}{mirror}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"latents-{key}.safetensors"
    if path.is_file():
        try:
            tensors, metadata = load_weights(path, expected_kind=LATENT_CACHE_KIND)
        except CheckpointError:
            tensors, metadata = {}, {}  # unreadable cache: encode again and overwrite it
        if (
            metadata.get("vqgan_hash") == vqgan_hash
            and metadata.get("data_hash") == data_hash
            and bool(metadata.get("mirror_x", False)) == mirror_x
        ):
            reporter.notice(f"reusing cached latents {path}")
            return tensors["latents"], path
    latents = encode_dataset(vqgan, dataset, device, reporter, mirror_x)
    save_weights(
        path,
        {"latents": latents},
        {
            "kind": LATENT_CACHE_KIND,
            "vqgan_hash": vqgan_hash,
            "data_hash": data_hash,
            "case_ids": [c.case_id for c in dataset.cases],
            "mirror_x": mirror_x,
        },
    )
    return latents, path
