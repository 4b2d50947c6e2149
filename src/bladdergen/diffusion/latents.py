"""The diffusion model's data: VQ-GAN latents of the training set, scaled to [-1, 1], cached on disk.

The frozen VQ-GAN (eval mode) encodes every preprocessed volume once into its continuous
pre-quantisation latent (D, x, y, z). The latents are cached in a safetensors file keyed by the
VQ-GAN weights' hash and the preprocessed set's hash, so a resumed or repeated run reuses them.
:class:`LatentScaler` maps them to [-1, 1] with the global min/max of the codebook (paper §3.3).
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


@dataclasses.dataclass(frozen=True)
class LatentScaler:
    """Affine map of latents to [-1, 1]: ``low`` -> -1 and ``high`` -> +1 (codebook min/max)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"latent scaler needs high > low, got [{self.low}, {self.high}]")

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        """VQ-GAN latent -> diffusion space (codes land in [-1, 1]; encoder outputs may not)."""
        return 2 * (z - self.low) / (self.high - self.low) - 1

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> VQ-GAN latent (inverse of :meth:`to_unit`)."""
        return (x + 1) / 2 * (self.high - self.low) + self.low

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentScaler:
        return cls(low=float(data["low"]), high=float(data["high"]))


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
) -> torch.Tensor:
    """Pre-quantisation latents of every case, float32 on CPU, shape (N, D, x, y, z)."""
    latents = []
    with reporter.task("encoding latents", total=len(dataset.cases)) as task:
        for case in dataset.cases:
            image = torch.from_numpy(dataset.load_image(case))[None, None].to(device)
            latents.append(vqgan.encode(image).float().cpu())
            task.advance(1)
    return torch.cat(latents)


def cached_latents(
    vqgan: LatentAutoencoder,
    vqgan_hash: str,
    dataset: PreprocessedSet,
    cache_dir: Path,
    device: torch.device,
    reporter: Reporter = SILENT,
) -> tuple[torch.Tensor, Path]:
    """The set's latents (N, D, x, y, z) from ``cache_dir``, encoding and caching them if absent.

    The cache file name holds a hash of (VQ-GAN weights hash, data hash), so a different VQ-GAN or
    changed data never reuses stale latents.
    """
    data_hash = dataset_hash(dataset)
    key = hashlib.sha256(f"{vqgan_hash}:{data_hash}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"latents-{key}.safetensors"
    if path.is_file():
        try:
            tensors, metadata = load_weights(path, expected_kind=LATENT_CACHE_KIND)
        except CheckpointError:
            tensors, metadata = {}, {}  # unreadable cache: encode again and overwrite it
        if metadata.get("vqgan_hash") == vqgan_hash and metadata.get("data_hash") == data_hash:
            reporter.notice(f"reusing cached latents {path}")
            return tensors["latents"], path
    latents = encode_dataset(vqgan, dataset, device, reporter)
    save_weights(
        path,
        {"latents": latents},
        {
            "kind": LATENT_CACHE_KIND,
            "vqgan_hash": vqgan_hash,
            "data_hash": data_hash,
            "case_ids": [c.case_id for c in dataset.cases],
        },
    )
    return latents, path
