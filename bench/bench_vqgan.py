"""Benchmark one VQ-GAN training step: seconds per step and peak memory, per profile.

Each profile runs in its own subprocess so peak memory is measured per profile: peak RSS on CPU
(``resource.getrusage``; a proxy for GPU memory, it also counts the Python/torch baseline), and
``torch.cuda.max_memory_allocated`` on a GPU. The step is the full one (autoencoder with L1,
commitment, both discriminators' GAN and feature-matching terms, then the discriminator step),
on random volumes of the profile's shape, batch = the profile's batch size unless overridden.

    python bench/bench_vqgan.py --profiles tiny paper --steps 3 --paper-steps 1 --threads 2
    python bench/bench_vqgan.py --profiles paper --paper-size 128   # smaller in-plane, same net

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPES = {"tiny": (64, 64, 24), "paper": (512, 512, 24)}


def _one_profile(
    profile: str, steps: int, batch_size: int | None, device: str, paper_size: int
) -> dict:
    """Run ``steps`` timed training steps (after one warm-up step) in this process."""
    import resource
    import time

    import torch

    from bladdergen.config import load_config
    from bladdergen.runtime import Runtime
    from bladdergen.vqgan.discriminators import VolumeDiscriminator, slice_discriminator
    from bladdergen.vqgan.losses import AdversarialLoss
    from bladdergen.vqgan.model import VQGAN
    from bladdergen.vqgan.train import _train_step

    overrides = {"vqgan.disc_start": 0, "vqgan.image_every": 10**9}
    if batch_size is not None:
        overrides["vqgan.batch_size"] = batch_size
    cfg = load_config(profile, overrides=overrides).vqgan
    torch.manual_seed(0)
    runtime = Runtime(device=torch.device(device))
    shape = (paper_size, paper_size, 24) if profile == "paper" else SHAPES[profile]
    model = VQGAN(cfg).to(runtime.device)
    disc2d = slice_discriminator(cfg).to(runtime.device)
    disc3d = VolumeDiscriminator(cfg, depth=shape[2]).to(runtime.device)
    opt_ae = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    opt_d = torch.optim.Adam([*disc2d.parameters(), *disc3d.parameters()], lr=cfg.disc_lr)
    volumes = torch.rand(cfg.batch_size, 1, *shape) * 2 - 1
    plan = {
        "indices": torch.arange(cfg.batch_size),
        "flips": torch.zeros(cfg.batch_size, 3, dtype=torch.bool),
        "slices": torch.zeros(cfg.batch_size, dtype=torch.long),
    }
    args = (plan, volumes, cfg, runtime, (model, disc2d, disc3d), (opt_ae, opt_d))
    tail = (None, AdversarialLoss(cfg.gan_loss), None)
    _train_step(0, *args, *tail)  # warm-up: codebook init, allocator, kernels
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        _train_step(step, *args, *tail)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / max(steps, 1)
    result = {
        "profile": profile,
        "shape": "x".join(map(str, shape)),
        "batch": cfg.batch_size,
        "latent": "x".join(map(str, model.latent_shape(shape))),
        "params_ae_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "checkpointing": cfg.activation_checkpointing,
        "seconds_per_step": round(seconds, 3),
        "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if runtime.device.type == "cuda":
        result["cuda_peak_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["tiny", "paper"], choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps for the tiny profile")
    parser.add_argument("--paper-steps", type=int, default=1, help="timed steps for paper")
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--paper-size",
        type=int,
        default=512,
        help="in-plane size for the paper profile (smaller sizes to extrapolate memory on CPU)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        steps = args.paper_steps if args.child == "paper" else args.steps
        result = _one_profile(args.child, steps, args.batch_size, args.device, args.paper_size)
        print(json.dumps(result))
        return

    rows = []
    for profile in args.profiles:
        command = [sys.executable, __file__, "--child", profile, "--threads", str(args.threads)]
        command += ["--steps", str(args.steps), "--paper-steps", str(args.paper_steps)]
        command += ["--device", args.device, "--paper-size", str(args.paper_size)]
        if args.batch_size is not None:
            command += ["--batch-size", str(args.batch_size)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    for row in rows[1:]:
        keys += [k for k in row if k not in keys]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
