"""The VQ-GAN training loop: read it top to bottom.

load config -> read the preprocessed volumes -> build autoencoder + 2 discriminators + 2 Adams ->
for each step: batch (derived from (seed, step)), autoencoder step, discriminator step, log,
checkpoint. ``resume=True`` restores weights, optimisers, step and RNG from ``training_state.pt``
so the run continues exactly (on CPU: bit-identical to an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from bladdergen.checkpoint import (
    STATE_NAME,
    WEIGHTS_NAME,
    load_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
)
from bladdergen.config import PipelineConfig, config_from_yaml_file, to_mapping, write_config
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.errors import CheckpointError, InputError
from bladdergen.fileio import (
    append_jsonl,
    atomic_write_with,
    truncate_jsonl_after_step,
)
from bladdergen.progress import SILENT, Reporter
from bladdergen.runtime import Runtime, autocast, seed_everything, start_runtime
from bladdergen.vqgan.config import VQGANConfig
from bladdergen.vqgan.discriminators import VolumeDiscriminator, slice_discriminator
from bladdergen.vqgan.load import save_vqgan
from bladdergen.vqgan.losses import (
    AdversarialLoss,
    feature_matching_loss,
    perceptual_loss,
    pick_slices,
)
from bladdergen.vqgan.model import VQGAN

METRICS_NAME = "metrics.jsonl"
IMAGES_DIR = "images"
# Settings that may change between a run and its resume (they do not change what is learned).
RESUMABLE_CHANGES = {"max_steps", "device", "log_every", "checkpoint_every", "image_every"}


def load_volumes(data_dir: Path) -> tuple[torch.Tensor, PreprocessedSet]:
    """All images of a preprocessed set as one (N, 1, X, Y, Z) float32 CPU tensor in [-1, 1]."""
    dataset = PreprocessedSet.open(Path(data_dir))
    arrays = []
    for case in dataset.cases:
        image = dataset.load_image(case)
        if arrays and image.shape != arrays[0].shape:
            raise InputError(
                f"{case.image_path}: shape {list(image.shape)} differs from the set's "
                f"{list(arrays[0].shape)}; expected one shape (run `bladdergen preprocess`)"
            )
        arrays.append(image)
    volumes = torch.from_numpy(np.stack(arrays)[:, None]).float()
    return volumes, dataset


def batch_plan(seed: int, step: int, n_cases: int, global_batch: int, depth: int) -> dict:
    """The global batch of ``step``, derived from (seed, step) only, so resume needs no sampler state.

    Cases are visited in a fresh random order every epoch. Returns ``indices`` (G,), ``flips``
    (G, 3) bools for X/Y/Z flips, and ``slices`` (G,) axial slice indices for the 2D losses.
    """
    positions = [step * global_batch + j for j in range(global_batch)]
    orders: dict[int, torch.Tensor] = {}
    indices = []
    for position in positions:
        epoch = position // n_cases
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(n_cases, generator=generator)
        indices.append(int(orders[epoch][position % n_cases]))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 500_009 * (step + 1))
    flips = torch.rand(global_batch, 3, generator=generator) < 0.5
    slices = torch.randint(depth, (global_batch,), generator=generator)
    return {"indices": torch.tensor(indices), "flips": flips, "slices": slices}


def _augment(volumes: torch.Tensor, flips: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Random flips along X, Y, Z per volume (B, 1, X, Y, Z)."""
    if not enabled:
        return volumes
    out = []
    for volume, flip in zip(volumes, flips, strict=True):
        axes = [axis + 1 for axis in range(3) if bool(flip[axis])]
        out.append(volume.flip(axes) if axes else volume)
    return torch.stack(out)


def _check_resumable(run_dir: Path, config: PipelineConfig) -> None:
    """The run folder's recorded config must match the current one (except RESUMABLE_CHANGES)."""
    recorded_path = run_dir / "config.yaml"
    if not recorded_path.is_file():
        raise CheckpointError(f"{recorded_path}: missing; cannot check the run before resuming")
    recorded = config_from_yaml_file(recorded_path)
    if recorded.seed != config.seed:
        raise CheckpointError(
            f"{recorded_path}: run used seed {recorded.seed}, current config has {config.seed}"
        )
    old, new = to_mapping(recorded.vqgan), to_mapping(config.vqgan)
    for key in old:
        if key not in RESUMABLE_CHANGES and old[key] != new[key]:
            raise CheckpointError(
                f"{recorded_path}: vqgan.{key} was {old[key]!r} in the run, now {new[key]!r}; "
                "resume with the run's settings or start a new run folder"
            )


def _save_preview(path: Path, x: torch.Tensor, x_hat: torch.Tensor) -> None:
    """PNG: top row input, bottom row reconstruction; axial (middle Z) and coronal (middle Y)."""
    from PIL import Image

    def panel(volume: torch.Tensor) -> np.ndarray:
        v = volume[0, 0].detach().float().cpu().clamp(-1, 1).numpy()
        axial = v[:, :, v.shape[2] // 2].T
        coronal = v[:, v.shape[1] // 2, :].T[::-1]
        height = max(axial.shape[0], coronal.shape[0])
        padded = [
            np.pad(a, ((0, height - a.shape[0]), (0, 0)), constant_values=-1)
            for a in (axial, coronal)
        ]
        return np.concatenate(padded, axis=1)

    grid = np.concatenate([panel(x), panel(x_hat)], axis=0)
    pixels = ((grid + 1.0) * 127.5).round().astype(np.uint8)
    atomic_write_with(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def learning_rate(cfg: VQGANConfig, step: int) -> float:
    """The autoencoder's learning rate at ``step``: constant, or cosine from lr down to lr / 10."""
    if cfg.lr_schedule == "constant" or cfg.max_steps <= 1:
        return cfg.lr
    progress = min(step / (cfg.max_steps - 1), 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _no_sync(module: torch.nn.Module, active: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` when ``active`` (accumulating), else nothing."""
    return module.no_sync() if active else contextlib.nullcontext()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def train_vqgan(
    config: PipelineConfig,
    data_dir: Path,
    run_dir: Path,
    resume: bool = False,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Train the 3D VQ-GAN on a preprocessed set; write checkpoints and logs into ``run_dir``.

    Returns a summary dict (steps, final losses, code usage, codebook range, paths). Raises
    InputError for a bad data folder, CheckpointError for a run folder that cannot be resumed.
    """
    cfg: VQGANConfig = config.vqgan
    run_dir = Path(run_dir)
    runtime = start_runtime(cfg.device)
    volumes, dataset = load_volumes(Path(data_dir))
    volume_shape = tuple(volumes.shape[2:])

    state_path = run_dir / STATE_NAME
    if resume:
        if not state_path.is_file():
            raise CheckpointError(f"{state_path}: no training state to resume from")
        _check_resumable(run_dir, config)
    elif state_path.exists() or (run_dir / WEIGHTS_NAME).exists():
        raise InputError(
            f"{run_dir}: already holds a VQ-GAN run; pass --resume to continue it or choose a "
            "new run folder"
        )

    seed_everything(config.seed + runtime.rank)
    model = VQGAN(cfg).to(runtime.device)
    model.latent_shape(volume_shape)  # fail early on a shape the model cannot take
    disc2d = slice_discriminator(cfg).to(runtime.device)
    disc3d = VolumeDiscriminator(cfg, depth=volume_shape[2]).to(runtime.device)
    opt_ae = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    opt_d = torch.optim.Adam(
        [*disc2d.parameters(), *disc3d.parameters()], lr=cfg.disc_lr, betas=tuple(cfg.betas)
    )
    perceptual = perceptual_loss(cfg.perceptual_weights) if cfg.perceptual_weight > 0 else None
    if perceptual is not None:
        perceptual = perceptual.to(runtime.device)
    elif cfg.perceptual_weight > 0 and runtime.is_main:
        reporter.notice(
            "perceptual loss is off: vqgan.perceptual_weights is not set (needs a local "
            "torchvision ResNet-50 state dict; nothing is downloaded)"
        )
    adversarial = AdversarialLoss(cfg.gan_loss)

    start_step = 0
    if resume:
        state = load_training_state(state_path)
        try:
            model.load_state_dict(state["model"])
            disc2d.load_state_dict(state["disc2d"])
            disc3d.load_state_dict(state["disc3d"])
            opt_ae.load_state_dict(state["opt_ae"])
            opt_d.load_state_dict(state["opt_d"])
        except (RuntimeError, KeyError, ValueError) as error:
            detail = str(error).strip().splitlines()[0][:200]
            raise CheckpointError(
                f"{state_path}: training state does not match the configured model ({detail})"
            ) from None
        start_step = int(state["step"])
        rng = state["rng"][runtime.rank] if runtime.rank < len(state["rng"]) else state["rng"][0]
        set_rng_state(rng)
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, run_dir)
        truncate_jsonl_after_step(run_dir / METRICS_NAME, start_step)

    if runtime.distributed:
        # The codebook syncs its own buffers (all-reduced EMA statistics), so DDP need not.
        ddp_model = DistributedDataParallel(model, broadcast_buffers=False)
        ddp_disc2d = DistributedDataParallel(disc2d)
        ddp_disc3d = DistributedDataParallel(disc3d)
    else:
        ddp_model, ddp_disc2d, ddp_disc3d = model, disc2d, disc3d

    model.train()
    disc2d.train()
    disc3d.train()
    global_batch = cfg.batch_size * runtime.world_size * cfg.grad_accumulation
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    with reporter.task("train-vqgan", total=cfg.max_steps, completed=start_step) as task:
        for step in range(start_step, cfg.max_steps):
            plan = batch_plan(config.seed, step, len(volumes), global_batch, volume_shape[2])
            metrics = _train_step(
                step,
                plan,
                volumes,
                cfg,
                runtime,
                (ddp_model, ddp_disc2d, ddp_disc3d),
                (opt_ae, opt_d),
                perceptual,
                adversarial,
                run_dir,
            )
            done = step + 1
            if runtime.is_main and (done % cfg.log_every == 0 or done == cfg.max_steps):
                record = {"step": done, **metrics}
                record["seconds"] = round(time.perf_counter() - started, 3)
                append_jsonl(run_dir / METRICS_NAME, record)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                _save_checkpoint(
                    run_dir, done, model, disc2d, disc3d, opt_ae, opt_d, runtime, dataset, volumes
                )
            task.advance(
                1,
                l1=metrics["l1"],
                perplexity=metrics["perplexity"],
                used=metrics["used_fraction"],
            )
    low, high = model.codebook_range()
    return {
        "run_dir": str(run_dir),
        "weights": str(run_dir / WEIGHTS_NAME),
        "start_step": start_step,
        "steps": max(cfg.max_steps, start_step),
        "seconds": round(time.perf_counter() - started, 2),
        "code_usage": _code_usage(model, volumes, runtime.device),
        "codebook_min": low,
        "codebook_max": high,
        "latent_shape": list(model.latent_shape(volume_shape)),
        "final_metrics": metrics,
    }


def _train_step(
    step: int,
    plan: dict,
    volumes: torch.Tensor,
    cfg: VQGANConfig,
    runtime: Runtime,
    models: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module],
    optimisers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    perceptual,
    adversarial: AdversarialLoss,
    run_dir: Path,
) -> dict[str, float]:
    """One optimiser step of the autoencoder and (after ``disc_start``) of the discriminators."""
    model, disc2d, disc3d = models
    opt_ae, opt_d = optimisers
    gan_on = step >= cfg.disc_start
    sums: dict[str, float] = {}
    opt_ae.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    for micro in range(cfg.grad_accumulation):
        # This rank's share of the global batch for this micro step.
        first = (micro * runtime.world_size + runtime.rank) * cfg.batch_size
        pick = slice(first, first + cfg.batch_size)
        x = _augment(volumes[plan["indices"][pick]], plan["flips"][pick], cfg.flip_augmentation)
        x = x.to(runtime.device)
        slices = plan["slices"][pick]
        # DDP all-reduces gradients only on the last micro step of an accumulation.
        skip_sync = runtime.distributed and micro < cfg.grad_accumulation - 1

        # ---- autoencoder ----
        with _no_sync(model, skip_sync), autocast(runtime.device):
            out = model(x)
            l1 = (out.x_hat.float() - x).abs().mean()
            loss = cfg.l1_weight * l1 + cfg.commitment_weight * out.commitment
            terms = {"l1": l1, "commitment": out.commitment}
            if perceptual is not None:
                p = perceptual(pick_slices(out.x_hat.float(), slices), pick_slices(x, slices))
                loss = loss + cfg.perceptual_weight * p
                terms["perceptual"] = p
            if gan_on:
                # The unwrapped discriminators: only the autoencoder learns from this loss.
                d2, d3 = _unwrap(disc2d), _unwrap(disc3d)
                d2.requires_grad_(False)
                d3.requires_grad_(False)
                fake2d = d2(pick_slices(out.x_hat, slices))
                fake3d = d3(out.x_hat)
                with torch.no_grad():
                    real2d = d2(pick_slices(x, slices))
                    real3d = d3(x)
                g2d = adversarial.generator(fake2d[-1].float())
                g3d = adversarial.generator(fake3d[-1].float())
                fm = feature_matching_loss(fake2d, real2d) + feature_matching_loss(fake3d, real3d)
                loss = (
                    loss
                    + cfg.image_gan_weight * g2d
                    + cfg.video_gan_weight * g3d
                    + cfg.gan_feat_weight * fm
                )
                terms.update(g_2d=g2d, g_3d=g3d, feature_matching=fm)
                d2.requires_grad_(True)
                d3.requires_grad_(True)
            (loss / cfg.grad_accumulation).backward()
        terms["loss_ae"] = loss

        # ---- discriminators ----
        if gan_on:
            x_hat = out.x_hat.detach()
            with (
                _no_sync(disc2d, skip_sync),
                _no_sync(disc3d, skip_sync),
                autocast(runtime.device),
            ):
                real2d = disc2d(pick_slices(x, slices))[-1].float()
                fake2d = disc2d(pick_slices(x_hat, slices))[-1].float()
                real3d = disc3d(x)[-1].float()
                fake3d = disc3d(x_hat)[-1].float()
                d_loss = cfg.image_gan_weight * adversarial.discriminator(
                    real2d, fake2d
                ) + cfg.video_gan_weight * adversarial.discriminator(real3d, fake3d)
                (d_loss / cfg.grad_accumulation).backward()
            terms["loss_d"] = d_loss
        terms["perplexity"] = out.perplexity
        terms["used_fraction"] = out.used_fraction
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) / cfg.grad_accumulation

    torch.nn.utils.clip_grad_norm_(_unwrap(model).parameters(), cfg.grad_clip)
    sums["lr"] = learning_rate(cfg, step)
    for group in opt_ae.param_groups:
        group["lr"] = sums["lr"]
    opt_ae.step()
    if gan_on:
        params = [*_unwrap(disc2d).parameters(), *_unwrap(disc3d).parameters()]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt_d.step()
    if runtime.is_main and (step + 1) % cfg.image_every == 0:
        _save_preview(run_dir / IMAGES_DIR / f"step_{step + 1:07d}.png", x, out.x_hat)
    return sums


def _save_checkpoint(
    run_dir: Path,
    step: int,
    model: VQGAN,
    disc2d: torch.nn.Module,
    disc3d: torch.nn.Module,
    opt_ae: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    runtime: Runtime,
    dataset: PreprocessedSet,
    volumes: torch.Tensor,
) -> None:
    """Training state first (what resume reads), then the safetensors weights; rank 0 writes.

    Every rank's RNG state is gathered so a resumed DDP run continues each rank's stream.
    """
    states = [rng_state()]
    if runtime.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(gathered, states[0])
        states = gathered
    if not runtime.is_main:
        return
    save_training_state(
        run_dir / STATE_NAME,
        {
            "step": step,
            "model": model.state_dict(),
            "disc2d": disc2d.state_dict(),
            "disc3d": disc3d.state_dict(),
            "opt_ae": opt_ae.state_dict(),
            "opt_d": opt_d.state_dict(),
            "rng": states,
        },
    )
    save_vqgan(
        run_dir / WEIGHTS_NAME,
        model,
        step=step,
        window=dataset.window,
        volume_shape=tuple(volumes.shape[2:]),
        code_usage=_code_usage(model, volumes, runtime.device),
        extra={"data_dir": str(dataset.root), "n_cases": len(dataset.cases)},
    )


@torch.no_grad()
def _code_usage(model: VQGAN, volumes: torch.Tensor, device: torch.device) -> float:
    """Fraction of the codebook that the training volumes map to (eval-mode search, no update)."""
    used = torch.zeros(model.config.n_codes, dtype=torch.bool)
    for volume in volumes:
        _, indices = model.quantize(model.encoder(volume[None].to(device)))
        used[indices.flatten().cpu()] = True
    return float(used.float().mean())
