"""DDPM and DDIM steps against their closed forms; samplers on data with a known answer."""

from __future__ import annotations

import torch

from bladdergen.diffusion.samplers import DDIMSampler, DDPMSampler, per_sample_noise
from bladdergen.diffusion.schedule import NoiseSchedule

# betas 0.1, 0.2, 0.3 -> alpha_bar 0.9, 0.72, 0.504
SCHEDULE = NoiseSchedule(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))


def test_ddpm_step_is_the_posterior_mean_plus_posterior_std_noise():
    sampler = DDPMSampler(SCHEDULE, steps=3, clip_x0=False)
    x_t, eps, z = torch.tensor([0.5]), torch.tensor([0.2]), torch.tensor([1.5])
    # t = 2 -> t = 1: Ho et al. eq. 7 with beta_2 = 0.3, alpha_bar_2 = 0.504, alpha_bar_1 = 0.72
    x0 = (0.5 - 0.496**0.5 * 0.2) / 0.504**0.5
    mean = 0.72**0.5 * 0.3 / 0.496 * x0 + 0.7**0.5 * 0.28 / 0.496 * 0.5
    std = (0.28 / 0.496 * 0.3) ** 0.5
    out = sampler.step(eps, 0, x_t, z)
    assert torch.allclose(out, torch.tensor([mean + std * 1.5]), atol=1e-6)


def test_ddpm_last_step_returns_the_predicted_clean_sample_without_noise():
    sampler = DDPMSampler(SCHEDULE, steps=3, clip_x0=False)
    assert not sampler.needs_noise(2)
    out = sampler.step(torch.tensor([0.2]), 2, torch.tensor([0.5]), None)
    assert torch.allclose(out, torch.tensor([(0.5 - 0.1**0.5 * 0.2) / 0.9**0.5]), atol=1e-6)


def test_ddim_step_with_eta_zero_is_deterministic_closed_form():
    sampler = DDIMSampler(SCHEDULE, steps=2, clip_x0=False)  # visits t = 2 then t = 0
    assert sampler.timesteps == [2, 0]
    x_t, eps = torch.tensor([0.5]), torch.tensor([0.2])
    x0 = (0.5 - 0.496**0.5 * 0.2) / 0.504**0.5
    expected = 0.9**0.5 * x0 + 0.1**0.5 * 0.2  # jumps straight to alpha_bar_0 = 0.9
    assert not sampler.needs_noise(0)
    assert torch.allclose(sampler.step(eps, 0, x_t, None), torch.tensor([expected]), atol=1e-6)


def test_clipping_clamps_the_predicted_clean_sample_to_unit_range():
    sampler = DDIMSampler(SCHEDULE, steps=3, clip_x0=True)
    # x0 estimate (5 - sqrt(0.1) * 0) / sqrt(0.9) > 1 -> clamped to 1 at the last step
    out = sampler.step(torch.tensor([0.0]), 2, torch.tensor([5.0]), None)
    assert torch.allclose(out, torch.tensor([1.0]))


def test_clipping_uses_per_channel_bounds_when_given():
    low = torch.tensor([-1.0, -3.0]).view(1, 2, 1)
    high = torch.tensor([2.0, 0.5]).view(1, 2, 1)
    sampler = DDIMSampler(SCHEDULE, steps=3, clip_x0=True, bounds=(low, high))
    # x0 estimate at the last step is x_t / sqrt(0.9) with eps = 0: 3 / 0.9487 = 3.16 and -3.16
    x_t = torch.tensor([[3.0, -3.0], [3.0, -3.0]]).view(1, 2, 2)
    out = sampler.step(torch.zeros_like(x_t), 2, x_t, None)
    assert torch.allclose(out, torch.tensor([[2.0, -1.0], [0.5, -3.0]]).view(1, 2, 2))


def _gaussian_oracle(schedule: NoiseSchedule, mu: float, sigma: float):
    """The exact noise predictor E[eps | x_t] for data ~ N(mu, sigma^2)."""

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_bar(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sigma**2 + 1 - a)

    return denoiser


def test_samplers_with_fewer_steps_than_training_reproduce_gaussian_data():
    schedule = NoiseSchedule.create("cosine", 300)
    oracle = _gaussian_oracle(schedule, mu=0.3, sigma=0.5)
    # (MONAI's DDPMScheduler gives std ~0.75 here at 250 of 1000 steps; see research/monai.md)
    for sampler in (
        DDPMSampler(schedule, 100, clip_x0=False),
        DDIMSampler(schedule, 50, clip_x0=False),
    ):
        # 20 rows of 100 independent scalars: 2000 draws from the sampler
        generators = [torch.Generator().manual_seed(i) for i in range(20)]
        x_T = per_sample_noise((1, 100, 1, 1), generators, "cpu")
        x0 = sampler.sample(oracle, x_T, generators)
        assert abs(float(x0.mean()) - 0.3) < 0.04
        assert abs(float(x0.std()) - 0.5) < 0.035


def test_per_sample_noise_does_not_depend_on_the_other_rows_of_the_batch():
    both = per_sample_noise((2, 3), [torch.Generator().manual_seed(s) for s in (7, 8)], "cpu")
    alone = per_sample_noise((2, 3), [torch.Generator().manual_seed(8)], "cpu")
    assert torch.equal(both[1], alone[0])
    assert not torch.equal(both[0], both[1])
