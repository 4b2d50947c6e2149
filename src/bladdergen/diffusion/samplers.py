"""Reverse-process samplers: DDPM (ancestral) and DDIM, independent of the denoiser.

A sampler holds a :class:`~bladdergen.diffusion.schedule.NoiseSchedule` and a descending list of
timesteps to visit. ``steps == T`` visits every timestep (the paper's 300-step ancestral sampler);
fewer steps visit an evenly spaced subset. Unlike MONAI's ``DDPMScheduler``, the DDPM step uses
the alpha_bar of the *previous visited* timestep, so it stays correct with fewer steps.

The denoiser is any callable ``eps = denoiser(x_t, t)`` with ``x_t`` (B, C, X, Y, Z) and integer
timesteps ``t`` (B,). Random numbers come from one ``torch.Generator`` per sample, so a sample's
result does not depend on which other samples share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from bladdergen.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def spaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` integer timesteps evenly spaced from ``T - 1`` down to 0 (all of them if
    ``steps >= T``), descending and without repeats."""
    if steps >= timesteps:
        return list(range(timesteps - 1, -1, -1))
    chosen = torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return sorted({int(t) for t in chosen}, reverse=True)


def per_sample_noise(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str
) -> torch.Tensor:
    """Standard normal noise (len(generators), *shape), row i drawn from ``generators[i]`` on CPU."""
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device)


Bounds = tuple[float | torch.Tensor, float | torch.Tensor]


class _Sampler:
    """``bounds``: where ``clip_x0`` clamps the predicted clean latent, (low, high) as floats or
    tensors broadcastable to it (per-channel bounds: (1, C, 1, 1, 1))."""

    def __init__(
        self, schedule: NoiseSchedule, steps: int, clip_x0: bool = True, bounds: Bounds = (-1, 1)
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.schedule = schedule
        self.timesteps = spaced_timesteps(schedule.timesteps, steps)
        self.clip_x0 = clip_x0
        self.bounds = bounds

    def _alpha_bars(self, index: int) -> tuple[float, float]:
        """alpha_bar at visited step ``index`` and at the next visited (less noisy) one (1 at the end)."""
        table = self.schedule.alphas_cumprod
        t = self.timesteps[index]
        prev = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else None
        return float(table[t]), (1.0 if prev is None else float(table[prev]))

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """``x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``, clamped to ``bounds`` when ``clip_x0``."""
        x0 = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
        return x0.clamp(*self.bounds) if self.clip_x0 else x0

    def step(
        self, eps: torch.Tensor, index: int, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def needs_noise(self, index: int) -> bool:
        """Whether :meth:`step` at ``index`` adds fresh noise."""
        return False

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x_T: torch.Tensor,
        generators: Sequence[torch.Generator],
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from pure noise ``x_T`` (B, C, X, Y, Z) to a clean latent.

        ``generators`` (one per batch row) supply any noise added along the way.
        """
        x = x_T
        for index, t in enumerate(self.timesteps):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = denoiser(x, t_batch).float()
            noise = None
            if self.needs_noise(index):
                noise = per_sample_noise(x.shape[1:], generators, x.device)
            x = self.step(eps, index, x, noise)
            if on_step is not None:
                on_step()
        return x


class DDPMSampler(_Sampler):
    """Ancestral sampling with the posterior variance ("fixed small"); no noise at the last step.

    Between visited timesteps ``t`` and ``s < t`` the step uses ``beta = 1 - a_t / a_s`` (which is
    the schedule's own beta when every timestep is visited).
    """

    def needs_noise(self, index: int) -> bool:
        return index + 1 < len(self.timesteps)

    def step(
        self, eps: torch.Tensor, index: int, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """``x_s = c0 x_0 + c1 x_t + sigma z`` (posterior q(x_s | x_t, x_0) mean and std)."""
        a_t, a_s = self._alpha_bars(index)
        beta = 1 - a_t / a_s
        x0 = self.predict_x0(x_t, eps, a_t)
        coef_x0 = a_s**0.5 * beta / (1 - a_t)
        coef_xt = (1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        if noise is None:
            return mean
        variance = beta * (1 - a_s) / (1 - a_t)
        return mean + variance**0.5 * noise


class DDIMSampler(_Sampler):
    """Song et al.'s DDIM: deterministic with ``eta = 0``; ``eta = 1`` matches DDPM's variance."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        clip_x0: bool = True,
        eta: float = 0.0,
        bounds: Bounds = (-1, 1),
    ) -> None:
        super().__init__(schedule, steps, clip_x0, bounds)
        self.eta = eta

    def needs_noise(self, index: int) -> bool:
        return self.eta > 0 and index + 1 < len(self.timesteps)

    def step(
        self, eps: torch.Tensor, index: int, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """``x_s = sqrt(a_s) x_0 + sqrt(1 - a_s - sigma^2) eps + sigma z``."""
        a_t, a_s = self._alpha_bars(index)
        x0 = self.predict_x0(x_t, eps, a_t)
        # with a clamped x0 the noise direction must be the one consistent with it
        eps = (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        sigma = self.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
        out = a_s**0.5 * x0 + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
        if noise is not None and sigma > 0:
            out = out + sigma * noise
        return out


def make_sampler(
    kind: str,
    schedule: NoiseSchedule,
    steps: int,
    clip_x0: bool = True,
    eta: float = 0.0,
    bounds: Bounds = (-1, 1),
) -> _Sampler:
    """``kind`` ``ddpm`` or ``ddim`` -> a sampler visiting ``steps`` timesteps."""
    if kind == "ddpm":
        return DDPMSampler(schedule, steps, clip_x0, bounds)
    if kind == "ddim":
        return DDIMSampler(schedule, steps, clip_x0, eta, bounds)
    raise ValueError(f"unknown sampler {kind!r}")
