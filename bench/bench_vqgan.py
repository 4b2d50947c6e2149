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
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        _train_step(step, *args, *tail)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / max(steps, 1)
    cpu_seconds = (time.process_time() - cpu_started) / max(steps, 1)
    result = {
        "profile": profile,
        "shape": "x".join(map(str, shape)),
        "batch": cfg.batch_size,
        "latent": "x".join(map(str, model.latent_shape(shape))),
        "params_ae_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "checkpointing": cfg.activation_checkpointing,
        "seconds_per_step": round(seconds, 3),
        # CPU time of this process: with --threads 1 it is what an idle core would take
        "cpu_seconds_per_step": round(cpu_seconds, 3),
        "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if runtime.device.type == "cuda":
        result["cuda_peak_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def activation_estimate(profile: str, batch: int, paper_size: int) -> dict:
    """Device-independent memory estimate of one autoencoder step, on PyTorch's meta device.

    Sums the bytes autograd saves for backward in the autoencoder + generator forward (encoder,
    decoder, both discriminators on the reconstruction), adds the largest single block that
    activation checkpointing recomputes in backward, the parameters with gradients and two Adam
    moments, and one chunk of the codebook search. fp32; bf16 autocast roughly halves the
    activation part. An estimate, not a measurement: allocator slack and kernel workspaces are
    not counted.
    """
    import torch

    from bladdergen.config import load_config
    from bladdergen.vqgan.discriminators import VolumeDiscriminator, slice_discriminator
    from bladdergen.vqgan.losses import pick_slices
    from bladdergen.vqgan.model import VQGAN

    cfg = load_config(profile).vqgan
    shape = (paper_size, paper_size, 24) if profile == "paper" else SHAPES[profile]
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.device("meta"):
        model = VQGAN(cfg).train()
        disc3d = VolumeDiscriminator(cfg, depth=shape[2])
        disc2d = slice_discriminator(cfg)
    x = torch.empty(batch, 1, *shape, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x_hat = model.decode(model.encoder(x))  # with the label decoder it reads
        disc3d(x_hat)
        disc2d(pick_slices(x_hat, torch.zeros(batch, dtype=torch.long)))
    forward = saved[0]
    largest_block = 0
    if cfg.activation_checkpointing:
        # The decoder's last stage runs at full resolution: one of its residual blocks is the
        # largest piece recomputed at once in backward.
        block = model.decoder.stages[-1][1]
        channels = block.body[2].conv.in_channels
        h = torch.empty(batch, channels, *shape, device="meta", requires_grad=True)
        saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(h)
        largest_block = saved[0]
    n_params = sum(p.numel() for m in (model, disc2d, disc3d) for p in m.parameters())
    weights = n_params * 4 * 4  # weights, gradients, two Adam moments
    search = cfg.search_chunk * cfg.n_codes * 4 * 2  # distances + argmin workspace
    total = forward + largest_block + weights + search
    gb = 2**30
    return {
        "profile": profile,
        "shape": "x".join(map(str, shape)),
        "batch": batch,
        "checkpointing": cfg.activation_checkpointing,
        "saved_activations_GB": round(forward / gb, 2),
        "largest_recomputed_block_GB": round(largest_block / gb, 2),
        "weights_grads_adam_GB": round(weights / gb, 2),
        "codebook_search_GB": round(search / gb, 2),
        "estimate_fp32_GB": round(total / gb, 2),
    }


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
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print the meta-device memory estimate (batch 1 and 2) instead of timing steps",
    )
    args = parser.parse_args()

    if args.estimate:
        rows = [
            activation_estimate(profile, batch, args.paper_size)
            for profile in args.profiles
            for batch in (1, 2)
        ]
        _print_table(rows)
        return

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
    _print_table(rows)


def _print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    for row in rows[1:]:
        keys += [k for k in row if k not in keys]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
