"""``train-ldm``: train the latent DDPM on the frozen VQ-GAN's latents of a preprocessed set.

One readable loop: load config -> open data -> load the frozen VQ-GAN -> encode (or reuse cached)
latents -> build the denoiser -> for each step: draw a batch, noise it, predict the noise,
step the optimiser, update the EMA, log, checkpoint.

Every step's randomness (batch indices, timesteps, noise) comes from a generator seeded by
(seed, step, rank, micro-batch), so a killed and resumed run gives the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bladdergen.checkpoint import WEIGHTS_NAME, save_weights
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.diffusion.config import LDMConfig
from bladdergen.diffusion.latents import LatentScaler, cached_latents
from bladdergen.diffusion.noise import decoder_noise
from bladdergen.diffusion.schedule import NoiseSchedule
from bladdergen.diffusion.unet import build_denoiser
from bladdergen.engine.run import RunFolder, RunKind, no_sync, scheduled_learning_rate
from bladdergen.errors import InputError
from bladdergen.progress import SILENT, Reporter
from bladdergen.runtime import (
    autocast,
    barrier,
    main_process_first,
    start_runtime,
)
from bladdergen.settings import to_mapping

KIND = "ldm"
FORMAT_VERSION = 1
LATENTS_DIR = "latents"
ANATOMY_MARGIN = 0.2  # as evaluate.plausible_range_margin
# Settings that may change between a run and its resume (they do not change what is learned).
RESUMABLE_CHANGES = {"max_steps", "device", "log_every", "checkpoint_every", "latent_cache_dir"}
RUN_KIND = RunKind(KIND, RESUMABLE_CHANGES, entries={LATENTS_DIR})


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, step, rank, micro-batch)."""
    state = np.random.SeedSequence([seed, step, rank, micro]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def learning_rate(cfg: LDMConfig, step: int) -> float:
    """The denoiser's learning rate at ``step``: constant, or cosine down to a tenth."""
    return scheduled_learning_rate(cfg.lr_schedule, cfg.learning_rate, step, cfg.max_steps)


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


def training_anatomy_ranges(dataset: PreprocessedSet) -> dict[str, list[float]]:
    """Wall-thickness (mm) and bladder-volume (ml) ranges of the set's label maps (widened by
    ``ANATOMY_MARGIN``, joined with the 95 % prediction interval of ``real_ranges``): the real
    range a generated label map is checked against."""
    from bladdergen.evaluate.anatomy import measure_anatomy, real_ranges

    measured = [
        measure_anatomy(dataset.load_label(case), dataset.spacing(case))
        for case in dataset.labeled_cases
    ]
    return real_ranges(measured, ANATOMY_MARGIN)


def _loss(kind: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(prediction, target)
    return F.mse_loss(prediction, target)


def train_ldm(
    cfg: LDMConfig,
    data_dir: Path,
    run_dir: Path,
    vqgan_path: Path,
    *,
    seed: int = 0,
    resume: bool = False,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Train the latent DDPM; returns the run summary (steps, weights, seconds, final loss).

    ``vqgan_path``: a ``train-vqgan`` run folder or checkpoint. Writes into ``run_dir``:
    ``config.yaml``, ``model.safetensors`` (EMA weights used by ``sample``, with the latent scaler,
    VQ-GAN hash, window, reference geometry and the decoder's missing noise in its metadata),
    ``training_state.pt``, ``metrics.jsonl``, ``curves.png`` and the latent cache. Raises
    InputError / CheckpointError for bad folders or mismatched checkpoints, TrainingDiverged when
    the loss becomes non-finite.
    """
    from bladdergen.vqgan.load import load_vqgan  # the VQ-GAN stage is only needed here

    runtime = start_runtime(cfg.device)
    device = runtime.device
    dataset = PreprocessedSet.open(Path(data_dir))
    vqgan, vq_meta = load_vqgan(vqgan_path, device)
    for p in vqgan.parameters():
        p.requires_grad_(False)
    vqgan_hash = vq_meta["weights_sha256"]
    if tuple(dataset.window) != tuple(vq_meta.get("window", dataset.window)):
        raise InputError(
            f"{data_dir}: HU window {list(dataset.window)} differs from the VQ-GAN's "
            f"{vq_meta.get('window')} ({vq_meta['path']}); train both on the same preprocessed set"
        )
    facts = {"the frozen VQ-GAN (weights sha256)": vqgan_hash}
    run = RunFolder.open(
        run_dir, RUN_KIND, cfg, runtime, seed=seed, resume=resume, reporter=reporter, facts=facts
    )

    cache_dir = Path(cfg.latent_cache_dir) if cfg.latent_cache_dir else run.path / LATENTS_DIR
    with main_process_first(runtime):
        latents, cache_path = cached_latents(
            vqgan, vqgan_hash, dataset, cache_dir, device, run.reporter, cfg.mirror_x
        )
    scaler = LatentScaler.create(cfg.latent_scaling, latents, vqgan.codebook.embeddings.cpu())
    # the noise the decoder leaves out, which ``sample`` can put back (from the cached latents:
    # no second encoder pass; the first len(cases) rows are the unmirrored cases)
    try:
        noise_model: dict[str, Any] | None = decoder_noise(
            vqgan, dataset, latents, device
        ).to_dict()
    except ValueError as error:  # volumes too small or too flat to measure it
        noise_model = None
        run.reporter.notice(f"{data_dir}: no noise model for sample ({error})")
    del vqgan  # frozen encoder no longer needed: free its memory for the denoiser
    data = scaler.to_unit(latents)  # (N, D, x, y, z) in diffusion space
    latent_shape = tuple(data.shape[1:])

    torch.manual_seed(seed)  # identical initial weights on every rank
    model = build_denoiser(latent_shape[0], cfg).to(device)
    model.check_shape((1, *latent_shape))
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    schedule = NoiseSchedule.create(cfg.schedule, cfg.timesteps)
    stateful = {"model": model, "ema": ema, "optimizer": optimizer}
    run.restore(**stateful)
    trained = run.wrap(model)
    # each rank draws from its own share of the cases (DistributedSampler-style sharding)
    shard = torch.arange(runtime.rank, len(data), runtime.world_size)
    if len(shard) == 0:
        shard = torch.arange(len(data))

    metadata = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "config": {"seed": seed, "ldm": to_mapping(cfg)},
        "scaler": scaler.to_dict(),
        "latent_shape": list(latent_shape),
        "vqgan_hash": vqgan_hash,
        "vqgan_path": str(Path(vq_meta["path"]).resolve()),
        "window": [float(w) for w in dataset.window],
        "volume_shape": list(vq_meta.get("volume_shape", [])),
        "affine": reference_affine(dataset).tolist(),
        "training_cases": len(dataset.cases),
        "label_map": {str(k): int(v) for k, v in dataset.label_map.items()},
        # what a plausible generated label map measures like (the training labels' range)
        "anatomy_ranges": training_anatomy_ranges(dataset),
        "noise_model": noise_model,
    }

    def write_weights() -> None:
        save_weights(run.path / WEIGHTS_NAME, ema.state_dict(), {**metadata, "step": run.step})

    model.train()
    for step in run.steps(cfg.max_steps, log_every=cfg.log_every, show=("loss",)):
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
            # DDP all-reduces gradients only on the last micro step of an accumulation
            with no_sync(trained, micro < cfg.grad_accumulation - 1):
                with autocast(device):
                    prediction = trained(x_t, t)
                loss = _loss(cfg.loss, prediction.float(), noise) / cfg.grad_accumulation
                loss.backward()
            step_loss += float(loss.detach())
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if (step + 1) % cfg.ema_every == 0:
            if step + 1 < cfg.ema_start:
                ema.load_state_dict(model.state_dict())
            else:
                ema_update(ema, model, cfg.ema_decay)
        done = run.end_step(step, {"loss": step_loss, "lr": lr})
        if run.due(done, cfg.checkpoint_every):
            run.save(done, stateful, write_weights)

    if runtime.is_main and not (run.path / WEIGHTS_NAME).is_file():
        write_weights()  # max_steps reached before this call: still leave usable weights
    barrier()
    return run.summary(
        loss=run.last_logged.get("loss"),
        latent_cache=str(cache_path),
        latent_shape=list(latent_shape),
    )
