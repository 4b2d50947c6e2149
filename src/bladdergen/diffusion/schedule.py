"""The forward (noising) process of a DDPM: betas, cumulative alphas, and ``q(x_t | x_0)``.

A :class:`NoiseSchedule` knows nothing about the denoiser or the samplers; it is a table of
numbers indexed by the integer timestep ``t`` in ``0 .. T-1`` (``t = 0`` is the least noisy step).
"""

from __future__ import annotations

import math

import torch


def cosine_betas(timesteps: int, offset: float = 0.008, max_beta: float = 0.9999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, float64, shape (T,).

    ``alpha_bar(t) = f(t) / f(0)`` with ``f(t) = cos(((t / T) + s) / (1 + s) * pi / 2) ** 2``,
    and ``beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t)`` clipped to ``[0, max_beta]``.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0.0, max_beta)


def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule from 1e-4 to 0.02, rescaled to T steps (as for T = 1000)."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


class NoiseSchedule:
    """``T`` noise levels: ``betas``, ``alphas_cumprod`` (float64 tables of shape (T,)).

    ``q_sample`` draws ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError("betas must be a non-empty 1-D tensor")
        self.betas = betas.to(torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @classmethod
    def create(cls, kind: str, timesteps: int) -> NoiseSchedule:
        """``kind`` is ``cosine`` or ``linear``."""
        if kind == "cosine":
            return cls(cosine_betas(timesteps))
        if kind == "linear":
            return cls(linear_betas(timesteps))
        raise ValueError(f"unknown noise schedule {kind!r}")

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``alpha_bar_t`` for integer timesteps ``t`` (B,), shaped (B, 1, 1, ...) like ``like``."""
        values = self.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noised latents ``x_t`` (same shape as ``x0``, e.g. (B, C, X, Y, Z)) at timesteps ``t`` (B,)."""
        alpha_bar = self.alpha_bar(t, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
