"""Latent diffusion benchmarks: sampling speed, paper-profile training cost, sample quality.

    python bench/bench_ldm.py speed   [--volumes 4] [--batch-size 4] [--device cpu]
    python bench/bench_ldm.py train   [--profile paper] [--batch-size 1] [--device cpu]
    python bench/bench_ldm.py quality --data DATA --ldm LDM_RUN [-n 8] [--steps 50]

``speed``: seconds per generated volume, DDIM-50 vs DDPM-300, measured in the same run, with the
profile's architecture (random weights: speed does not depend on training). ``train``: one
optimiser step's time and the process's peak memory (peak RSS on CPU, a proxy for GPU memory;
``torch.cuda.max_memory_allocated`` on CUDA), measured in a fresh subprocess. ``quality``:
per-channel latent mean/std (mean absolute error over channels) and the HU distribution inside the
body (voxels above -150 HU; Wasserstein-1 distance in HU and total variation between 10 HU-bin
histograms) of samples from the trained LDM and from an untrained one of the same architecture,
each against the real training set.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bladdergen.config import load_config
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.data.intensity import unit_to_hu
from bladdergen.diffusion.latents import LatentScaler
from bladdergen.diffusion.samplers import make_sampler, per_sample_noise
from bladdergen.diffusion.schedule import NoiseSchedule
from bladdergen.diffusion.unet import build_denoiser

BODY_HU = -150.0  # voxels above this are inside the body (air is at the window floor, -200)


def _vqgan_for(profile: str, device: torch.device):
    """A VQ-GAN of the profile's architecture with a data-free initialised codebook."""
    from bladdergen.vqgan.model import VQGAN

    config = load_config(profile).vqgan
    model = VQGAN(config).to(device)
    volume = torch.rand(1, 1, *_volume_shape(profile), device=device) * 2 - 1
    with torch.no_grad():
        model.train()
        model(volume)  # initialises the codebook from encoder outputs
    return model.eval()


def _volume_shape(profile: str) -> tuple[int, int, int]:
    pre = load_config(profile).preprocess
    return (*pre.target_size, pre.target_depth)


def run_speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = load_config(args.profile)
    vqgan = _vqgan_for(args.profile, device)
    latent_shape = vqgan.latent_shape(_volume_shape(args.profile))
    model = build_denoiser(latent_shape[0], config.ldm).to(device).eval()
    schedule = NoiseSchedule.create(config.ldm.schedule, config.ldm.timesteps)
    scaler = LatentScaler.from_codebook(*vqgan.codebook_range(), latent_shape[0])
    rows = []
    for kind, steps in (("ddim", 50), ("ddpm", config.ldm.timesteps)):
        sampler = make_sampler(kind, schedule, steps)
        started = time.perf_counter()
        with torch.no_grad():
            for first in range(0, args.volumes, args.batch_size):
                count = min(args.batch_size, args.volumes - first)
                generators = [torch.Generator().manual_seed(first + i) for i in range(count)]
                x = per_sample_noise(latent_shape, generators, device)
                z_q, _ = vqgan.quantize(scaler.from_unit(sampler.sample(model, x, generators)))
                for row in range(count):
                    vqgan.decode(z_q[row : row + 1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append((kind, steps, (time.perf_counter() - started) / args.volumes))
    print(f"| sampler | steps | s / volume ({args.profile}, batch {args.batch_size}) |")
    print("|---|---|---|")
    for kind, steps, seconds in rows:
        print(f"| {kind} | {steps} | {seconds:.3f} |")
    print(f"\nDDPM-{rows[1][1]} / DDIM-50 time ratio: {rows[1][2] / rows[0][2]:.1f}x")


def run_train_child(args: argparse.Namespace) -> None:
    """One process: build the profile's denoiser and time optimiser steps on random latents."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = load_config(args.profile)
    fx, fy, fz = config.vqgan.downsample
    x, y, z = _volume_shape(args.profile)
    latent = (config.vqgan.embedding_dim, x // fx, y // fy, z // fz)
    model = build_denoiser(latent[0], config.ldm).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    schedule = NoiseSchedule.create(config.ldm.schedule, config.ldm.timesteps)
    times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        x0 = torch.rand(args.batch_size, *latent, device=device) * 2 - 1
        t = torch.randint(config.ldm.timesteps, (args.batch_size,), device=device)
        noise = torch.randn_like(x0)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            prediction = model(schedule.q_sample(x0, t, noise), t)
        loss = (prediction.float() - noise).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "latent": latent,
                "params_M": params / 1e6,
                "step_s": float(np.mean(times[1:])),  # the first step warms up kernels
                "peak_MiB": peak,
            }
        )
    )


def run_train(args: argparse.Namespace) -> None:
    command = [sys.executable, __file__, "train-child", "--profile", args.profile]
    command += ["--batch-size", str(args.batch_size), "--device", args.device]
    command += ["--steps", str(args.steps)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    memory = "peak RSS (CPU proxy)" if args.device == "cpu" else "max allocated (CUDA)"
    print(f"| profile | latent | params | batch | s / step | {memory} |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.profile} | {'x'.join(map(str, result['latent']))} | "
        f"{result['params_M']:.1f} M | {args.batch_size} | {result['step_s']:.2f} | "
        f"{result['peak_MiB'] / 1024:.2f} GiB |"
    )


def _body_hu(volumes: list[np.ndarray]) -> np.ndarray:
    values = np.concatenate([v.ravel() for v in volumes])
    return values[values > BODY_HU]


def _latent_stats(latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over samples and positions of (N, D, x, y, z)."""
    flat = latents.transpose(0, 1).reshape(latents.shape[1], -1)
    return flat.mean(dim=1).numpy(), flat.std(dim=1).numpy()


def run_quality(args: argparse.Namespace) -> None:
    from scipy.stats import wasserstein_distance

    from bladdergen.diffusion.latents import encode_dataset
    from bladdergen.diffusion.sample import load_ldm
    from bladdergen.vqgan.load import load_vqgan

    device = torch.device("cpu")
    trained, metadata, _ = load_ldm(Path(args.ldm), device)
    vqgan, _ = load_vqgan(metadata["vqgan_path"], device)
    scaler = LatentScaler.from_dict(metadata["scaler"], metadata["latent_shape"][0])
    window = tuple(metadata["window"])
    ldm_config = metadata["resolved_ldm_config"]
    schedule = NoiseSchedule.create(ldm_config.schedule, ldm_config.timesteps)
    latent_shape = tuple(metadata["latent_shape"])

    dataset = PreprocessedSet.open(Path(args.data))
    real_volumes = [unit_to_hu(dataset.load_image(c), window) for c in dataset.cases]
    real_latents = encode_dataset(vqgan, dataset, device)
    with torch.no_grad():
        recon = [
            unit_to_hu(vqgan.decode(vqgan.quantize(z[None])[0])[0, 0].numpy(), window)
            for z in real_latents
        ]
    real_hu = _body_hu(real_volumes)
    real_mean, real_std = _latent_stats(real_latents)

    torch.manual_seed(1)
    untrained = build_denoiser(latent_shape[0], ldm_config).eval()

    def generate(model) -> tuple[torch.Tensor, list[np.ndarray]]:
        bounds = scaler.clip_bounds(torch.zeros(()))
        sampler = make_sampler(args.sampler, schedule, args.steps, bounds=bounds)
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(args.n)]
        with torch.no_grad():
            x = per_sample_noise(latent_shape, generators, device)
            z = scaler.from_unit(sampler.sample(model, x, generators))
            z_q, _ = vqgan.quantize(z)
            hu = [
                unit_to_hu(vqgan.decode(z_q[i : i + 1])[0, 0].numpy(), window)
                for i in range(args.n)
            ]
        return z, hu

    rows = [("VQ-GAN reconstructions of the real set", real_latents, recon)]
    rows.append(("trained LDM samples", *generate(trained)))
    rows.append(("untrained LDM samples (same architecture)", *generate(untrained)))
    bins = np.arange(BODY_HU, window[1] + 10.0, 10.0)  # 10 HU bins over the body's HU range
    real_hist = np.histogram(real_hu, bins=bins)[0] / real_hu.size
    real_fraction = np.mean([np.mean(v > BODY_HU) for v in real_volumes])
    print(
        "| volumes | latent mean err | latent std err | HU W1 in body | HU histogram TV "
        f"| body fraction (real {real_fraction:.3f}) |"
    )
    print("|---|---|---|---|---|---|")
    for name, latents, volumes in rows:
        body = _body_hu(volumes)
        distance = wasserstein_distance(real_hu, body) if body.size else float("nan")
        hist = np.histogram(body, bins=bins)[0] / max(body.size, 1)
        total_variation = 0.5 * np.abs(hist - real_hist).sum()
        fraction = np.mean([np.mean(v > BODY_HU) for v in volumes])
        if latents is real_latents:
            mean_err = std_err = "(reference)"
        else:
            mean, std = _latent_stats(latents)
            mean_err = f"{np.abs(mean - real_mean).mean():.3f}"
            std_err = f"{np.abs(std - real_std).mean():.3f}"
        print(
            f"| {name} | {mean_err} | {std_err} | {distance:.1f} HU | {total_variation:.3f} "
            f"| {fraction:.3f} |"
        )
    print(f"\nreal latent per-channel mean {np.round(real_mean, 3).tolist()}")
    print(f"real latent per-channel std  {np.round(real_std, 3).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    speed = sub.add_parser("speed", help="seconds per volume, DDIM-50 vs DDPM-300")
    speed.add_argument("--profile", default="tiny")
    speed.add_argument("--volumes", type=int, default=4)
    speed.add_argument("--batch-size", type=int, default=4)
    speed.add_argument("--device", default="cpu")
    for name in ("train", "train-child"):
        train = sub.add_parser(name, help="one training step: time and peak memory")
        train.add_argument("--profile", default="paper")
        train.add_argument("--batch-size", type=int, default=1)
        train.add_argument("--steps", type=int, default=2)
        train.add_argument("--device", default="cpu")
    quality = sub.add_parser("quality", help="sample statistics vs the real data")
    quality.add_argument("--data", required=True)
    quality.add_argument("--ldm", required=True)
    quality.add_argument("-n", type=int, default=8)
    quality.add_argument("--sampler", default="ddim")
    quality.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    {"speed": run_speed, "train": run_train, "train-child": run_train_child}.get(
        args.part, run_quality
    )(args)


if __name__ == "__main__":
    main()
