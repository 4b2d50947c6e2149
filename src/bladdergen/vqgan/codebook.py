"""Vector quantisation with an EMA codebook, data-dependent init and dead-code restart.

Written here instead of using MONAI's ``EMAQuantizer`` because that one has no data-dependent
initialisation and no dead-code restart, and it was measured to collapse to 1 of 128 codes
(research/monai.md §1.1). Everything the codebook learns lives in buffers, so it is saved with the
model's ``state_dict`` (including the ``initialized`` flag whose loss wiped the codebook on resume
upstream) and no optimiser ever touches it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from bladdergen.runtime import all_reduce_sum_, broadcast_


@dataclasses.dataclass
class QuantizeOutput:
    """Result of a training-mode quantisation.

    ``z_q``: (B, E, x, y, z) codes with the straight-through gradient to ``z_e``;
    ``indices``: (B, x, y, z) int64 code indices; ``commitment``: scalar MSE(z_e, sg(z_q)) (unweighted);
    ``perplexity``: exp(entropy) of the batch's code histogram; ``used_fraction``: fraction of the
    codebook used in the batch.
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor
    perplexity: torch.Tensor
    used_fraction: torch.Tensor


class Codebook(nn.Module):
    """``n_codes`` vectors of ``dim`` channels, learned by exponential moving averages.

    Buffers: ``embeddings`` (K, E), ``cluster_size`` (K) EMA counts, ``embed_sum`` (K, E) EMA sums of
    the assigned encoder vectors, ``initialized`` (scalar bool).
    """

    def __init__(
        self,
        n_codes: int,
        dim: int,
        decay: float = 0.99,
        eps: float = 1e-7,
        restart_threshold: float = 1.0,
        chunk: int = 8192,
    ) -> None:
        super().__init__()
        self.n_codes = n_codes
        self.dim = dim
        self.decay = decay
        self.eps = eps
        self.restart_threshold = restart_threshold
        self.chunk = chunk
        self.register_buffer("embeddings", torch.randn(n_codes, dim) / dim**0.5)
        self.register_buffer("cluster_size", torch.zeros(n_codes))
        self.register_buffer("embed_sum", self.embeddings.clone())
        self.register_buffer("initialized", torch.tensor(False))

    # ------------------------------------------------------------------------------------------
    # Search (never changes the codebook)

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2) for each row of ``flat`` (N, E) -> (N,) int64.

        Rows are processed ``chunk`` at a time, so memory is chunk x K, not N x K.
        """
        codes = self.embeddings.to(flat.dtype)
        code_norms = (codes * codes).sum(dim=1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], self.chunk):
            rows = flat[start : start + self.chunk]
            # ||z||^2 is the same for every code of a row, so it does not change the argmin.
            distance = code_norms[None, :] - 2.0 * rows @ codes.t()
            out[start : start + self.chunk] = distance.argmin(dim=1)
        return out

    def lookup(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Snap (B, E, x, y, z) latents to their nearest codes: -> (z_q exact codes, indices).

        Pure: never updates the codebook, in any mode.
        """
        flat = rearrange(z_e, "b e x y z -> (b x y z) e").float()
        indices = self.nearest(flat)
        z_q = self.embed(indices.view(z_e.shape[0], *z_e.shape[2:])).to(z_e.dtype)
        return z_q, indices.view(z_e.shape[0], *z_e.shape[2:])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for (B, x, y, z) indices -> (B, E, x, y, z)."""
        return rearrange(F.embedding(indices, self.embeddings), "b x y z e -> b e x y z")

    # ------------------------------------------------------------------------------------------
    # Training

    def forward(self, z_e: torch.Tensor) -> QuantizeOutput:
        """Quantise (B, E, x, y, z) with straight-through gradients; EMA-update when training."""
        flat = rearrange(z_e, "b e x y z -> (b x y z) e").float()
        if self.training and not bool(self.initialized):
            self._initialise(flat.detach())
        indices = self.nearest(flat.detach())
        counts = torch.bincount(indices, minlength=self.n_codes).float()
        # The codes this batch was assigned to, taken before the EMA update and restarts move
        # them (a restarted code would hand its vectors a random replacement).
        z_q = self.embed(indices.view(z_e.shape[0], *z_e.shape[2:])).to(z_e.dtype)
        if self.training:
            self._ema_update(flat.detach(), indices, counts)
        commitment = F.mse_loss(z_e, z_q.detach())
        probs = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return QuantizeOutput(
            z_q=z_e + (z_q - z_e).detach(),
            indices=indices.view(z_e.shape[0], *z_e.shape[2:]),
            commitment=commitment,
            perplexity=perplexity,
            used_fraction=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _sample_vectors(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` encoder vectors from ``flat`` (N, E): a random subset, tiled and jittered if N < n.

        Drawn on rank 0 and broadcast so every DDP rank holds the same codebook.
        """
        if flat.shape[0] >= n:
            picked = flat[torch.randperm(flat.shape[0], device=flat.device)[:n]]
        else:
            repeats = (n + flat.shape[0] - 1) // flat.shape[0]
            tiled = flat.repeat(repeats, 1)
            tiled = tiled + torch.randn_like(tiled) * (0.01 / self.dim**0.5)
            picked = tiled[torch.randperm(tiled.shape[0], device=flat.device)[:n]]
        return broadcast_(picked.contiguous())

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        """Data-dependent init: codes = random encoder outputs of the first training batch."""
        vectors = self._sample_vectors(flat, self.n_codes)
        self.embeddings.copy_(vectors)
        self.embed_sum.copy_(vectors)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA of counts and sums (summed over DDP ranks), Laplace-smoothed means, then restarts."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        counts = all_reduce_sum_(counts.clone())
        sums = all_reduce_sum_(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.n_codes * self.eps) * total
        self.embeddings.copy_(self.embed_sum / smoothed[:, None])
        # Dead: rarely used lately (EMA count below the threshold) and unused in this batch.
        dead = (self.cluster_size < self.restart_threshold) & (counts == 0)
        if self.restart_threshold > 0 and bool(dead.any()):
            # The decision is the same on every rank: cluster_size is built from all-reduced counts.
            fresh = self._sample_vectors(flat, self.n_codes)
            # Restarted codes start their EMA as a code of count `restart_threshold` sitting at the
            # new vector, so the next mean update keeps them there instead of reverting to the
            # decayed sum of the dead code.
            weight = max(self.restart_threshold, 1.0)
            self.embeddings[dead] = fresh[dead]
            self.cluster_size[dead] = weight
            self.embed_sum[dead] = fresh[dead] * weight

    # ------------------------------------------------------------------------------------------
    # Facts

    def value_range(self) -> tuple[float, float]:
        """Global (min, max) over all codebook entries (for the LDM's latent scaling)."""
        return float(self.embeddings.min()), float(self.embeddings.max())
