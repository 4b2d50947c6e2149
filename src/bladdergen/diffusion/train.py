"""``train-ldm``: train the latent DDPM on the frozen VQ-GAN's latents of a preprocessed set.

One readable loop: load config -> open data -> load the frozen VQ-GAN -> encode (or reuse cached)
latents -> build the denoiser -> for each step: draw a batch, noise it, predict the noise,
step the optimiser, update the EMA, log, checkpoint.

Every step's randomness (batch indices, timesteps, noise) comes from a generator seeded by
(seed, step, rank, micro-batch), so a killed and resumed run gives the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bladdergen.checkpoint import (
    STATE_NAME,
    WEIGHTS_NAME,
    load_state_dict_strict,
    load_training_state,
    save_training_state,
    save_weights,
)
from bladdergen.config import PipelineConfig, to_mapping, write_config
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.diffusion.latents import LatentScaler, cached_latents
from bladdergen.diffusion.schedule import NoiseSchedule
from bladdergen.diffusion.unet import build_denoiser
from bladdergen.errors import CheckpointError, InputError
from bladdergen.fileio import append_jsonl, truncate_jsonl_after_step
from bladdergen.progress import SILENT, Reporter
from bladdergen.runtime import (
    Runtime,
    all_reduce_mean_,
    autocast,
    barrier,
    main_process_first,
    start_runtime,
)

KIND = "ldm"
FORMAT_VERSION = 1
METRICS_NAME = "metrics.jsonl"


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, step, rank, micro-batch)."""
    state = np.random.SeedSequence([seed, step, rank, micro]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def reference_affine(dataset: PreprocessedSet) -> np.ndarray:
    """Voxel-to-world affine for generated volumes: the first case's orientation and origin with
    the median voxel size (mm) of the training set along each axis."""
    affines = [dataset.affine(case) for case in dataset.cases]
    spacing = np.median([np.linalg.norm(a[:3, :3], axis=0) for a in affines], axis=0)
    affine = affines[0].copy()
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    affine[:3, :3] = directions * spacing
    return affine


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every parameter and buffer."""
    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1.0 - decay)
            else:
                e.copy_(p)


def _loss(kind: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(prediction, target)
    return F.mse_loss(prediction, target)


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: RUN_DIR is a file, expected a folder")
    if not resume and (run_dir / STATE_NAME).exists():
        raise InputError(
            f"{run_dir}: already holds a training run; pass --resume to continue it "
            "or choose a new RUN_DIR"
        )


def train_ldm(
    config: PipelineConfig,
    data_dir: Path,
    run_dir: Path,
    vqgan_path: Path,
    resume: bool = False,
    reporter: Reporter = SILENT,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Train the latent DDPM; returns a summary (steps, final loss, paths, seconds).

    ``vqgan_path``: a ``train-vqgan`` run folder or checkpoint. Writes into ``run_dir``:
    ``config.yaml``, ``model.safetensors`` (EMA weights used by ``sample``, with the latent scaler,
    VQ-GAN hash, window and reference geometry in its metadata), ``training_state.pt`` and
    ``metrics.jsonl``. Raises InputError / CheckpointError for bad folders or mismatched
    checkpoints.
    """
    from bladdergen.vqgan.load import load_vqgan  # the VQ-GAN stage is only needed here

    cfg = config.ldm
    run_dir = Path(run_dir)
    _check_run_dir(run_dir, resume)
    runtime = runtime or start_runtime(cfg.device)
    device = runtime.device
    started = time.perf_counter()

    dataset = PreprocessedSet.open(Path(data_dir))
    vqgan, vq_meta = load_vqgan(vqgan_path, device)
    for p in vqgan.parameters():
        p.requires_grad_(False)
    vqgan_hash = vq_meta["weights_sha256"]
    scaler = LatentScaler(*vqgan.codebook_range())
    if tuple(dataset.window) != tuple(vq_meta.get("window", dataset.window)):
        raise InputError(
            f"{data_dir}: HU window {list(dataset.window)} differs from the VQ-GAN's "
            f"{vq_meta.get('window')} ({vq_meta['path']}); train both on the same preprocessed set"
        )

    cache_dir = Path(cfg.latent_cache_dir) if cfg.latent_cache_dir else run_dir / "latents"
    with main_process_first(runtime):
        latents, cache_path = cached_latents(
            vqgan, vqgan_hash, dataset, cache_dir, device, reporter if runtime.is_main else SILENT
        )
    del vqgan  # frozen encoder no longer needed: free its memory for the denoiser
    data = scaler.to_unit(latents)  # (N, D, x, y, z) in diffusion space
    latent_shape = tuple(data.shape[1:])

    seed = config.seed
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = build_denoiser(latent_shape[0], cfg).to(device)
    model.check_shape((1, *latent_shape))
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    schedule = NoiseSchedule.create(cfg.schedule, cfg.timesteps)

    metrics_path = run_dir / METRICS_NAME
    step = 0
    if resume and (run_dir / STATE_NAME).is_file():
        state = load_training_state(run_dir / STATE_NAME)
        if state.get("kind") != KIND:
            raise CheckpointError(f"{run_dir / STATE_NAME}: not a train-ldm training state")
        if state.get("vqgan_hash") != vqgan_hash:
            raise CheckpointError(
                f"{run_dir}: was trained with a different VQ-GAN (weights hash "
                f"{str(state.get('vqgan_hash'))[:12]}), not {vq_meta['path']} ({vqgan_hash[:12]})"
            )
        load_state_dict_strict(model, state["model"], run_dir / STATE_NAME)
        load_state_dict_strict(ema, state["ema"], run_dir / STATE_NAME)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if runtime.is_main:
            truncate_jsonl_after_step(metrics_path, step)
            reporter.notice(f"resuming from step {step}")
    elif resume and runtime.is_main:
        reporter.notice(f"{run_dir}: nothing to resume, starting a new run")

    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, run_dir)
    trained = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if runtime.distributed
        else model
    )
    # each rank draws from its own share of the cases (DistributedSampler-style sharding)
    shard = torch.arange(runtime.rank, len(data), runtime.world_size)
    if len(shard) == 0:
        shard = torch.arange(len(data))

    metadata = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "config": to_mapping(config),
        "scaler": scaler.to_dict(),
        "latent_shape": list(latent_shape),
        "vqgan_hash": vqgan_hash,
        "vqgan_path": str(Path(vq_meta["path"]).resolve()),
        "window": [float(w) for w in dataset.window],
        "volume_shape": list(vq_meta.get("volume_shape", [])),
        "affine": reference_affine(dataset).tolist(),
        "training_cases": len(dataset.cases),
    }

    def save(step_now: int) -> None:
        state = {
            "kind": KIND,
            "step": step_now,
            "vqgan_hash": vqgan_hash,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
        save_training_state(run_dir / STATE_NAME, state)
        save_weights(run_dir / WEIGHTS_NAME, ema.state_dict(), {**metadata, "step": step_now})

    model.train()
    running, running_count, last_loss = 0.0, 0, float("nan")
    progress = reporter if runtime.is_main else SILENT
    with progress.task("training LDM", total=cfg.max_steps, completed=step) as task:
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(cfg.grad_accumulation):
                generator = step_generator(seed, step, runtime.rank, micro)
                pick = shard[torch.randint(len(shard), (cfg.batch_size,), generator=generator)]
                x0 = data[pick]
                t = torch.randint(cfg.timesteps, (cfg.batch_size,), generator=generator)
                noise = torch.randn(x0.shape, generator=generator)
                x0, t, noise = x0.to(device), t.to(device), noise.to(device)
                x_t = schedule.q_sample(x0, t, noise)
                last_micro = micro == cfg.grad_accumulation - 1
                sync = (
                    contextlib.nullcontext()
                    if last_micro or not runtime.distributed
                    else trained.no_sync()
                )
                with sync:
                    with autocast(device):
                        prediction = trained(x_t, t)
                    loss = _loss(cfg.loss, prediction.float(), noise) / cfg.grad_accumulation
                    loss.backward()
                step_loss += float(loss.detach())
            optimizer.step()
            step += 1
            if step % cfg.ema_every == 0:
                if step < cfg.ema_start:
                    ema.load_state_dict(model.state_dict())
                else:
                    ema_update(ema, model, cfg.ema_decay)
            running += step_loss
            running_count += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                mean = all_reduce_mean_(torch.tensor([running / running_count]))
                last_loss = float(mean[0])
                running, running_count = 0.0, 0
                if runtime.is_main:
                    append_jsonl(
                        metrics_path,
                        {
                            "step": step,
                            "loss": last_loss,
                            "seconds": round(time.perf_counter() - started, 3),
                        },
                    )
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                if runtime.is_main:
                    save(step)
                barrier()
            task.advance(1, loss=step_loss)

    if runtime.is_main and not (run_dir / WEIGHTS_NAME).is_file():
        save(step)  # max_steps reached before this call: still leave usable weights
    barrier()
    return {
        "run_dir": str(run_dir),
        "step": step,
        "loss": last_loss,
        "weights": str(run_dir / WEIGHTS_NAME),
        "latent_cache": str(cache_path),
        "latent_shape": list(latent_shape),
        "seconds": round(time.perf_counter() - started, 2),
    }
