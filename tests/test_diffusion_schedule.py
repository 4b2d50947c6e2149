"""Noise schedule: cosine values by hand, q(x_t | x_0) in closed form, timestep spacing."""

from __future__ import annotations

import math

import torch

from bladdergen.diffusion.samplers import spaced_timesteps
from bladdergen.diffusion.schedule import NoiseSchedule, cosine_betas


def test_cosine_schedule_matches_hand_computed_alpha_bar_for_four_steps():
    s = 0.008

    def f(t: float) -> float:
        return math.cos((t / 4 + s) / (1 + s) * math.pi / 2) ** 2

    expected = [f(t) / f(0) for t in (1, 2, 3, 4)]  # alpha_bar after steps 1..4
    expected[-1] = expected[-2] * (1 - 0.9999)  # the last beta (= 1) is clipped to 0.9999
    schedule = NoiseSchedule(cosine_betas(4))
    assert torch.allclose(schedule.alphas_cumprod, torch.tensor(expected, dtype=torch.float64))


def test_cosine_betas_of_paper_schedule_are_increasing_and_bounded():
    betas = cosine_betas(300)
    assert betas.shape == (300,)
    assert bool((betas[1:] >= betas[:-1]).all())
    assert 0 < float(betas[0]) < 1e-3 and float(betas[-1]) <= 0.9999


def test_q_sample_mixes_signal_and_noise_with_sqrt_alpha_bar_weights():
    schedule = NoiseSchedule(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    x0 = torch.full((2, 1, 2, 2, 1), 2.0)
    noise = torch.full_like(x0, -1.0)
    t = torch.tensor([0, 2])
    x_t = schedule.q_sample(x0, t, noise)
    # alpha_bar: 0.9 at t=0, 0.9 * 0.8 * 0.7 = 0.504 at t=2
    assert torch.allclose(x_t[0], torch.full_like(x0[0], 2 * 0.9**0.5 - 0.1**0.5))
    assert torch.allclose(x_t[1], torch.full_like(x0[1], 2 * 0.504**0.5 - 0.496**0.5))


def test_spaced_timesteps_run_from_last_to_first_without_repeats():
    assert spaced_timesteps(10, 10) == list(range(9, -1, -1))
    assert spaced_timesteps(10, 4) == [9, 6, 3, 0]
    fifty = spaced_timesteps(300, 50)
    assert len(fifty) == 50 and fifty[0] == 299 and fifty[-1] == 0
    assert spaced_timesteps(5, 99) == [4, 3, 2, 1, 0]
