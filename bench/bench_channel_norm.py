"""Denoiser training step with ChannelLayerNorm as F.layer_norm against the var_mean form it replaced.

Both forms are timed in one process, alternating, on the tiny profile's denoiser (batch 4 of
8 x 16 x 16 x 12 latents); prints the median step seconds of each, their ratio and the largest
output difference of the two norms on one input.

    OMP_NUM_THREADS=1 python bench/bench_channel_norm.py
"""

from __future__ import annotations

import statistics
import time

import torch

from bladdergen.config import load_config
from bladdergen.diffusion.unet import ChannelLayerNorm, build_denoiser

LAYER_NORM = ChannelLayerNorm.forward


def var_mean_forward(self, x: torch.Tensor) -> torch.Tensor:
    var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
    return (x - mean) * (var + self.eps).rsqrt() * self.gain


def main(repeats: int = 5, steps: int = 10) -> None:
    torch.manual_seed(0)
    model = build_denoiser(8, load_config("tiny").ldm)
    optimizer = torch.optim.Adam(model.parameters())
    x, t = torch.randn(4, 8, 16, 16, 12), torch.randint(300, (4,))

    def step_seconds() -> float:
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad()
            model(x, t).abs().mean().backward()
            optimizer.step()
        return (time.perf_counter() - started) / steps

    times = {"layer_norm": [], "var_mean": []}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for name, forward in (("layer_norm", LAYER_NORM), ("var_mean", var_mean_forward)):
            ChannelLayerNorm.forward = forward
            times[name].append(step_seconds())
    ChannelLayerNorm.forward = LAYER_NORM
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    norm = ChannelLayerNorm(32)
    probe = torch.randn(2, 32, 8, 8, 6)
    difference = (LAYER_NORM(norm, probe) - var_mean_forward(norm, probe)).abs().max().item()
    print(f"threads {torch.get_num_threads()}, median of {repeats} x {steps} training steps")
    for name, seconds in medians.items():
        print(f"{name}: {seconds:.4f} s per step")
    print(f"var_mean / layer_norm: {medians['var_mean'] / medians['layer_norm']:.3f}")
    print(f"largest output difference of the two norms: {difference:.2e}")


if __name__ == "__main__":
    main()
