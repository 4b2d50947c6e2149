"""Paper-profile GPU check: peak memory and step time of every stage, in one unattended command.

    python bench/gpu_check.py --out DIR [--time-budget 420]           # on a GPU (paper profile)
    python bench/gpu_check.py --out DIR --device cpu --size 128        # same code path on a CPU

Stages (paper profile from the project's config loader, in-plane size ``--size``, 24 slices):

- ``vqgan_train_b1`` / ``vqgan_train_b2``: one VQ-GAN optimiser step at batch 1 / 2 past
  ``vqgan.disc_start`` (both discriminators on) through the trainer's own ``_train_step``;
- ``ldm_train``: one latent-DDPM optimiser step at the profile's batch and gradient accumulation,
  the trainer's loop body reproduced with the same modules (noise, denoiser, loss, Adam, EMA);
- ``deepatlas_registration`` / ``deepatlas_segmentation``: one alternating-phase step of each net
  through the trainer's ``_registration_step`` / ``_segmentation_step`` (all loss terms);
- ``segment``: ``segment_paths`` on one NIfTI volume (read, preprocess, inference, write);
- ``sample_ddim``: the sampling loop of ``sample`` (DDIM noise -> latent, nearest codes, VQ-GAN
  decode, HU) on batches of ``--sample-batch`` volumes, no files written; seconds per volume and
  the ``--sample-volumes`` (200) time extrapolated from the measured batches;
- ``sample_command``: ``sample_volumes`` itself (what ``bladdergen sample`` runs: NIfTI and PNG
  writing included) on one batch, extrapolated to ``--sample-volumes``, plus one measured run of
  all of them when the time budget still allows it.

Weights are random (memory and speed do not depend on training). Per stage: one warm-up step,
then ``--steps`` timed steps (``torch.cuda.synchronize`` around each); the median is reported.
Memory on CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps (peak statistics reset
after the warm-up). On CPU: the growth of the process's peak resident set over its size at the
stage's start (peak reset after the warm-up) — a *proxy* only, labelled ``cpu_rss_proxy``.

Each stage is wrapped: an error (e.g. CUDA out of memory) is recorded in the JSON and the next
stage still runs. ``gpu_check.json`` and ``gpu_check.md`` are (re)written atomically in ``--out``
after every stage, so a run cut short still leaves its results. ``--time-budget`` seconds: when it
runs out, timed loops stop after their first timed step and optional parts (the measured run of
all sample volumes) are skipped; required stages always run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bladdergen.config import PipelineConfig, load_config, to_mapping
from bladdergen.fileio import atomic_write_json, atomic_write_text
from bladdergen.runtime import Runtime, autocast

FORMAT = "bladdergen-gpu-check"
FORMAT_VERSION = 1
JSON_NAME = "gpu_check.json"
MARKDOWN_NAME = "gpu_check.md"
STAGES = (
    "vqgan_train_b1",
    "vqgan_train_b2",
    "ldm_train",
    "deepatlas_registration",
    "deepatlas_segmentation",
    "segment",
    "sample_ddim",
    "sample_command",
)
PEAK_GOAL_GB = 20.0  # every stage's peak on one 24 GB GPU (issue 14)
SAMPLE_GOAL_S = {"24gb_gpu": 600.0, "h100_h200": 180.0}  # all sample volumes, seconds
GB = 1e9


# ----------------------------------------------------------------------------------------------
# Measuring


def _proc_status_kib(field: str) -> int | None:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status in KiB (None where there is no /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the next stage's RSS
    baseline does not include memory that an earlier stage freed but the allocator kept."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the proxy is then rougher for later stages


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one stage: CUDA allocator peak, or on CPU the peak-RSS growth (a proxy)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline_kib = 0
        self.resettable = False
        self.allocated_at_start = 0
        self.warmup_peak: int | None = None  # bytes; None until a warm-up step has run

    def stage_started(self) -> None:
        """Remember the process size before the stage builds anything."""
        self.warmup_peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            # non-zero means an earlier stage left tensors behind (they count in this peak)
            self.allocated_at_start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            _release_freed_memory()
            self.baseline_kib = _proc_status_kib("VmRSS") or 0
            _reset_peak_rss()  # else the warm-up peak would include earlier stages' peaks

    def warmed_up(self) -> None:
        """Keep the warm-up's own peak (first-step allocations: Adam state, codebook init), then
        reset the peak so that ``peak_gb`` covers the timed steps only."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.warmup_peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            high = _proc_status_kib("VmHWM") or self.baseline_kib
            self.warmup_peak = max(high - self.baseline_kib, 0) * 1024
            self.resettable = _reset_peak_rss()

    def peak(self) -> dict[str, Any]:
        """``peak_gb`` (1e9 bytes) over the timed steps, ``warmup_peak_gb``, and how."""
        warmup = {
            "warmup_peak_gb": None if self.warmup_peak is None else round(self.warmup_peak / GB, 3)
        }
        return {**self._peak(), **warmup}

    def _peak(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            allocated = torch.cuda.max_memory_allocated(self.device)
            return {
                "memory_kind": "cuda_max_memory_allocated",
                "peak_gb": round(allocated / GB, 3),
                "peak_gib": round(allocated / 2**30, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved(self.device) / GB, 3),
                "allocated_at_stage_start_gb": round(self.allocated_at_start / GB, 3),
            }
        high = _proc_status_kib("VmHWM")
        if high is None:  # no /proc (not Linux): the lifetime peak is all there is
            import resource

            high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        delta = max(high - self.baseline_kib, 0) * 1024
        return {
            "memory_kind": "cpu_rss_proxy",
            "memory_note": "CPU proxy: peak RSS growth over the stage's start, not GPU memory"
            + ("" if self.resettable else " (peak mark not resettable: lifetime peak)"),
            "peak_gb": round(delta / GB, 3),
            "peak_gib": round(delta / 2**30, 3),
            "process_peak_rss_gb": round(high * 1024 / GB, 3),
        }


@dataclasses.dataclass
class Context:
    """What every stage needs: settings, device, config, scratch folder, deadline."""

    args: argparse.Namespace
    device: torch.device
    config: PipelineConfig
    volume_shape: tuple[int, int, int]
    work_dir: Path
    deadline: float  # time.monotonic() value after which optional work is skipped
    probe: MemoryProbe

    @property
    def runtime(self) -> Runtime:
        return Runtime(device=self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def dtype(self) -> str:
        return "bf16 autocast" if self.device.type == "cuda" else "float32"


def timed_steps(ctx: Context, step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """One warm-up call of ``step``, then up to ``steps`` timed calls (at least one).

    Returns ``warmup_s``, ``step_s_median``, ``step_s`` (all timed steps, seconds),
    ``steps_timed``, ``last`` (the last call's return value).
    """
    started = time.perf_counter()
    last = step()
    ctx.sync()
    warmup = time.perf_counter() - started
    ctx.probe.warmed_up()
    times: list[float] = []
    for _ in range(steps):
        if times and ctx.seconds_left() < 0:
            break  # time budget spent: one timed step is enough to report
        started = time.perf_counter()
        last = step()
        ctx.sync()
        times.append(time.perf_counter() - started)
    return {
        "warmup_s": round(warmup, 4),
        "step_s_median": round(statistics.median(times), 4),
        "step_s": [round(t, 4) for t in times],
        "steps_timed": len(times),
        "last": last,
    }


def _finite(values: dict[str, Any]) -> dict[str, float]:
    """Numeric loss terms rounded (flags and text dropped); raises if one is not finite (a step
    that silently broke)."""
    out = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            continue
        value = float(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} is {value}")
        out[name] = round(value, 5)
    return out


# ----------------------------------------------------------------------------------------------
# Inputs (random weights and synthetic volumes: speed and memory do not depend on content)


def _blob_volumes(
    shape: tuple[int, int, int], count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images (N, X, Y, Z) float32 in [-1, 1] and labels (N, X, Y, Z) uint8 0/1/2.

    A bright shell (wall, 1) around a darker core with a bump (tumor, 2), plus noise: cheap volumes
    with non-trivial labels so every Dice term is defined.
    """
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    images, labels = [], []
    for _ in range(count):
        centre = rng.uniform(-0.2, 0.2, 3).astype(np.float32)
        radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        label = np.zeros(shape, np.uint8)
        label[(radius < 0.5) & (radius > 0.4)] = 1
        label[(radius < 0.42) & (grid[0] > centre[0] + 0.25)] = 2
        image = label * 0.3 - 0.5 + rng.normal(0, 0.05, shape).astype(np.float32)
        images.append(np.clip(image, -1, 1).astype(np.float32))
        labels.append(label)
    return np.stack(images), np.stack(labels)


class MemoryImages:
    """In-memory stand-in for the DeepAtlas trainer's image pool (same interface as ``_Images``).

    Indices ``0 .. n_labeled-1`` are labeled. Volumes live on the CPU as numpy arrays and are
    copied to the device per step, as the trainer's volume cache does.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_labeled: int) -> None:
        self.arrays = images
        self.label_arrays = labels
        # what the trainer's pool entries carry (PoolImage): an id and where the image came from
        self.items = [
            types.SimpleNamespace(
                case_id=f"case_{i:03d}", source="labeled" if i < n_labeled else "unlabeled"
            )
            for i in range(len(images))
        ]
        self.n_labeled = n_labeled

    def weights(self, indices: list[int]) -> None:
        """Draw weights of labeled ``indices``: no synthetic pair here, so a uniform draw."""
        return None

    def draw(self, rng: np.random.Generator, count: int) -> list[int]:
        """``count`` labeled indices, uniform with replacement (the supervised baseline's draw)."""
        from bladdergen.deepatlas.pairs import labeled_batch

        return labeled_batch(rng, self.n_labeled, count)

    def tumor_cases(self) -> list[int]:
        """Labeled indices whose label holds tumor voxels (class 2)."""
        return [i for i in range(self.n_labeled) if (self.label_arrays[i] == 2).any()]

    def images(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """(B, 1, X, Y, Z) float32 images in [-1, 1]."""
        return torch.from_numpy(np.stack([self.arrays[i] for i in indices]))[:, None].to(device)

    def labels(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """(B, 1, X, Y, Z) int64 classes of labeled images."""
        stacked = np.stack([self.label_arrays[i] for i in indices]).astype(np.int64)
        return torch.from_numpy(stacked)[:, None].to(device)

    def loss_labels(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """:meth:`labels`: no synthetic pair here, so no voxel is left out of the loss."""
        return self.labels(indices, device)

    def mark_ignored(self, indices: list[int], classes: torch.Tensor) -> torch.Tensor:
        """No synthetic pair here: ``classes`` as they are."""
        return classes


def _random_codebook(model: torch.nn.Module, seed: int) -> None:
    """Give an untrained VQ-GAN an initialised codebook (what training would have done)."""
    codebook = model.codebook
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(codebook.n_codes, codebook.dim, generator=generator)
    with torch.no_grad():
        codebook.embeddings.copy_(vectors)
        codebook.embed_sum.copy_(vectors)
        codebook.cluster_size.fill_(1.0)
        codebook.initialized.fill_(True)


def _latent_shape(config: PipelineConfig, volume_shape: tuple[int, int, int]) -> tuple[int, ...]:
    fx, fy, fz = config.vqgan.downsample
    x, y, z = volume_shape
    return (config.vqgan.embedding_dim, x // fx, y // fy, z // fz)


def _params_m(*modules: torch.nn.Module) -> float:
    return round(sum(p.numel() for m in modules for p in m.parameters()) / 1e6, 3)


# ----------------------------------------------------------------------------------------------
# Stages


VQGAN_TERMS = ("loss_ae", "loss_d", "l1", "l1_regions", "label_loss", "commitment", "g_2d")


def stage_vqgan(ctx: Context, batch: int) -> dict[str, Any]:
    """VQ-GAN optimiser steps at ``batch`` with both discriminators on (trainer's _train_step)."""
    from bladdergen.vqgan import train as vqgan_train
    from bladdergen.vqgan.discriminators import VolumeDiscriminator, slice_discriminator
    from bladdergen.vqgan.losses import AdversarialLoss, perceptual_loss
    from bladdergen.vqgan.model import VQGAN

    # image_every: no preview PNGs inside the timed steps
    cfg = dataclasses.replace(
        ctx.config.vqgan, batch_size=batch, grad_accumulation=1, image_every=10**9
    )
    device = ctx.device
    torch.manual_seed(ctx.config.seed)
    model = VQGAN(cfg).to(device)
    model.latent_shape(ctx.volume_shape)
    disc2d = slice_discriminator(cfg).to(device)
    disc3d = VolumeDiscriminator(cfg, depth=ctx.volume_shape[2]).to(device)
    opt_ae = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    opt_d = torch.optim.Adam(
        [*disc2d.parameters(), *disc3d.parameters()], lr=cfg.disc_lr, betas=tuple(cfg.betas)
    )
    perceptual = perceptual_loss(cfg.perceptual_weights) if cfg.perceptual_weight > 0 else None
    if perceptual is not None:
        perceptual = perceptual.to(device)
    adversarial = AdversarialLoss(cfg.gan_loss)
    model.train()
    disc2d.train()
    disc3d.train()
    images, labels = _blob_volumes(ctx.volume_shape, max(2, batch), ctx.config.seed)
    # (N, 1, X, Y, Z) on the CPU, as in the trainer: images in [-1, 1], int64 classes 0/1/2
    volumes = torch.from_numpy(images)[:, None]
    classes = torch.from_numpy(labels.astype(np.int64))[:, None]
    step = cfg.disc_start  # past the discriminator start: the full GAN step

    def one_step() -> dict[str, float]:
        nonlocal step
        plan = vqgan_train.batch_plan(
            ctx.config.seed, step, len(volumes), batch, ctx.volume_shape[2]
        )
        metrics = vqgan_train._train_step(
            step,
            plan,
            (volumes, classes),
            cfg,
            ctx.runtime,
            (model, disc2d, disc3d),
            (opt_ae, opt_d),
            perceptual,
            adversarial,
        )
        metrics.pop("_views", None)  # the preview picture's tensors: not kept across steps
        step += 1
        return metrics

    timing = timed_steps(ctx, one_step, ctx.args.steps)
    metrics = timing.pop("last")
    if "loss_d" not in metrics:
        raise RuntimeError("the discriminator step did not run (gan not on)")
    return {
        **timing,
        "settings": {
            "volume": list(ctx.volume_shape),
            "batch": batch,
            "latent": list(model.latent_shape(ctx.volume_shape)),
            "dtype": ctx.dtype,
            "activation_checkpointing": cfg.activation_checkpointing,
            "label_head": cfg.label_head,
            "discriminators": "2D slice + 3D volume, on (step >= disc_start)",
            "perceptual": "on"
            if perceptual is not None
            else "off (vqgan.perceptual_weights unset)",
            "params_m": {
                "autoencoder": _params_m(model),
                "discriminators": _params_m(disc2d, disc3d),
            },
            "n_codes": cfg.n_codes,
            "search_chunk": cfg.search_chunk,
        },
        "losses": _finite({k: metrics[k] for k in VQGAN_TERMS if k in metrics}),
    }


def stage_ldm(ctx: Context) -> dict[str, Any]:
    """Latent-DDPM optimiser steps: the ``train_ldm`` loop body with the same modules."""
    from bladdergen.diffusion import train as ldm_train
    from bladdergen.diffusion.schedule import NoiseSchedule
    from bladdergen.diffusion.unet import build_denoiser

    cfg = ctx.config.ldm
    device = ctx.device
    latent_shape = _latent_shape(ctx.config, ctx.volume_shape)
    torch.manual_seed(ctx.config.seed)
    model = build_denoiser(latent_shape[0], cfg).to(device)
    model.check_shape((1, *latent_shape))
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    schedule = NoiseSchedule.create(cfg.schedule, cfg.timesteps)
    generator = torch.Generator().manual_seed(ctx.config.seed)
    data = torch.rand(8, *latent_shape, generator=generator) * 2 - 1  # scaled latents, on CPU
    model.train()
    step = 0
    seed = ctx.config.seed

    def one_step() -> float:
        nonlocal step
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(cfg.grad_accumulation):
            generator = ldm_train.step_generator(seed, step, 0, micro)
            pick = torch.randint(len(data), (cfg.batch_size,), generator=generator)
            x0 = data[pick]
            t = torch.randint(cfg.timesteps, (cfg.batch_size,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x0, t, noise = x0.to(device), t.to(device), noise.to(device)
            x_t = schedule.q_sample(x0, t, noise)
            with autocast(device):
                prediction = model(x_t, t)
            if cfg.loss == "l1":
                loss = torch.nn.functional.l1_loss(prediction.float(), noise)
            else:
                loss = torch.nn.functional.mse_loss(prediction.float(), noise)
            loss = loss / cfg.grad_accumulation
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        step += 1
        if step % cfg.ema_every == 0:
            if step < cfg.ema_start:
                ema.load_state_dict(model.state_dict())
            else:
                ldm_train.ema_update(ema, model, cfg.ema_decay)
        return step_loss

    timing = timed_steps(ctx, one_step, ctx.args.steps)
    loss = timing.pop("last")
    return {
        **timing,
        "settings": {
            "latent": list(latent_shape),
            "batch": cfg.batch_size,
            "grad_accumulation": cfg.grad_accumulation,
            "dtype": ctx.dtype,
            "params_m": _params_m(model),
            "ema_copy_on_device": True,
        },
        "losses": _finite({"loss": loss}),
    }


def _deepatlas_parts(ctx: Context):
    """Both DeepAtlas nets, optimisers, losses, warper and a 4-image pool (2 labeled)."""
    from bladdergen.deepatlas.fields import Warper
    from bladdergen.deepatlas.losses import DeepAtlasLosses, disable_tf32
    from bladdergen.deepatlas.networks import RegistrationNet, SegmentationNet

    cfg = ctx.config.deepatlas
    device = ctx.device
    disable_tf32()  # as train_deepatlas does (LNCC under TF32)
    torch.manual_seed(ctx.config.seed)
    seg_net = SegmentationNet.from_config(cfg).to(device)
    reg_net = RegistrationNet.from_config(cfg).to(device)
    seg_net.roi_size = ctx.volume_shape
    seg_opt = torch.optim.Adam(seg_net.parameters(), lr=cfg.seg_lr)
    reg_opt = torch.optim.Adam(reg_net.parameters(), lr=cfg.reg_lr)
    losses = DeepAtlasLosses(cfg.lncc_kernel).to(device)
    warper = Warper().to(device)
    images, labels = _blob_volumes(ctx.volume_shape, 4, ctx.config.seed)
    pool = MemoryImages(images, labels, n_labeled=2)
    return cfg, seg_net, reg_net, seg_opt, reg_opt, losses, warper, pool


def stage_deepatlas(ctx: Context, kind: str) -> dict[str, Any]:
    """One alternating-phase DeepAtlas step (``kind`` ``registration`` or ``segmentation``)."""
    from bladdergen.deepatlas import train as deepatlas_train
    from bladdergen.deepatlas.pairs import REG, SEG, step_rng

    cfg, seg_net, reg_net, seg_opt, reg_opt, losses, warper, pool = _deepatlas_parts(ctx)
    step = 0

    def one_step() -> dict[str, float]:
        nonlocal step
        rng = step_rng(ctx.config.seed, step, 0)
        step += 1
        if kind == "registration":
            return deepatlas_train._registration_step(
                REG, rng, pool, seg_net, reg_net, reg_opt, losses, warper, cfg, ctx.runtime
            )
        # the supervised batch's own random numbers (``seg_supervised_draw: baseline``), as the
        # trainer keys them apart from the pair draw
        baseline_rng = step_rng(ctx.config.seed, step, 1)
        return deepatlas_train._segmentation_step(
            SEG,
            rng,
            pool,
            seg_net,
            reg_net,
            seg_opt,
            losses,
            warper,
            cfg,
            ctx.runtime,
            baseline_rng=baseline_rng,
        )

    timing = timed_steps(ctx, one_step, ctx.args.steps)
    terms = timing.pop("last")
    phase = (
        "reg (F_S frozen): similarity + bending + anatomy"
        if kind == "registration"
        else "seg (F_R frozen): anatomy + supervised, moving and target in one forward"
    )
    return {
        **timing,
        "settings": {
            "volume": list(ctx.volume_shape),
            "batch": cfg.batch_size,
            "phase": phase,
            "dtype": ctx.dtype + " (losses in float32, TF32 off)",
            "activation_checkpointing": cfg.activation_checkpointing,
            "reg_inplane_downsample": cfg.reg_inplane_downsample,
            "params_m": {"seg_net": _params_m(seg_net), "reg_net": _params_m(reg_net)},
        },
        "losses": _finite({k: v for k, v in terms.items() if k != "folding"}),
    }


def _save_deepatlas_checkpoint(ctx: Context, run_dir: Path) -> None:
    """A ``train-deepatlas``-style run folder with random weights (what ``segment`` reads)."""
    from bladdergen import checkpoint as ckpt
    from bladdergen.deepatlas.networks import (
        RegistrationNet,
        SegmentationNet,
        portable_state_dict,
    )

    cfg = ctx.config.deepatlas
    torch.manual_seed(ctx.config.seed)
    tensors = {
        f"seg_net.{k}": v for k, v in portable_state_dict(SegmentationNet.from_config(cfg)).items()
    }
    reg = portable_state_dict(RegistrationNet.from_config(cfg))
    tensors |= {f"reg_net.{k}": v for k, v in reg.items()}
    preprocess = ctx.config.preprocess
    metadata = {
        "kind": "deepatlas",
        "mode": "deepatlas",
        "config": to_mapping(ctx.config),
        "preprocess": to_mapping(preprocess),
        "window": list(preprocess.window),
        "label_map": {str(k): v for k, v in preprocess.label_map.items()},
        "train_shape": list(ctx.volume_shape),
        "spacing": [0.8, 0.8, 4.0],
        "class_names": ["background", "wall", "tumor"],
        "step": 0,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(run_dir / ckpt.WEIGHTS_NAME, tensors, metadata)


def stage_segment(ctx: Context) -> dict[str, Any]:
    """``segment_paths`` on one raw HU volume of the training shape (model load included)."""
    from bladdergen.data.intensity import unit_to_hu
    from bladdergen.data.volumes import write_nifti
    from bladdergen.deepatlas.segment import segment_paths

    run_dir = ctx.work_dir / "segment_model"
    _save_deepatlas_checkpoint(ctx, run_dir)
    images, _ = _blob_volumes(ctx.volume_shape, 1, ctx.config.seed)
    scan = ctx.work_dir / "segment_in" / "ct.nii.gz"
    scan.parent.mkdir(parents=True, exist_ok=True)
    # 512 voxels over ~400 mm in-plane, 4 mm slices: a scan that needs no resampling
    spacing = 400.0 / ctx.volume_shape[0]
    affine = np.diag([spacing, spacing, 4.0, 1.0])
    write_nifti(scan, unit_to_hu(images[0], ctx.config.preprocess.window), affine, np.int16)
    out_dir = ctx.work_dir / "segment_out"

    def one_step() -> dict[str, Any]:
        return segment_paths(run_dir, scan, out_dir, device=str(ctx.device), overwrite=True)

    timing = timed_steps(ctx, one_step, ctx.args.steps)
    result = timing.pop("last")
    if result["segmented"] != 1:
        raise RuntimeError(f"segment wrote {result['segmented']} volumes, expected 1")
    return {
        **timing,
        "settings": {
            "volume": list(ctx.volume_shape),
            "input": "int16 NIfTI (.nii.gz), no resampling needed",
            "dtype": "float32 (segment runs without autocast)",
            "includes": "model load, read, preprocess, forward, restore, NIfTI write",
        },
    }


def _sampling_parts(ctx: Context):
    """Random-weight VQ-GAN (initialised codebook) and denoiser in eval mode, sampler, scaler."""
    from bladdergen.diffusion.latents import LatentScaler
    from bladdergen.diffusion.samplers import make_sampler
    from bladdergen.diffusion.schedule import NoiseSchedule
    from bladdergen.diffusion.unet import build_denoiser
    from bladdergen.vqgan.model import VQGAN

    config = ctx.config
    torch.manual_seed(config.seed)
    vqgan = VQGAN(config.vqgan)
    _random_codebook(vqgan, config.seed)
    latent_shape = tuple(vqgan.latent_shape(ctx.volume_shape))
    denoiser = build_denoiser(latent_shape[0], config.ldm)
    schedule = NoiseSchedule.create(config.ldm.schedule, config.ldm.timesteps)
    sampler = make_sampler(
        config.sample.sampler,
        schedule,
        config.sample.steps,
        config.sample.clip_x0,
        config.sample.eta,
    )
    scaler = LatentScaler.from_codebook(*vqgan.codebook_range(), latent_shape[0])
    return vqgan.eval(), denoiser.eval(), sampler, scaler, latent_shape


def stage_sample_ddim(ctx: Context) -> dict[str, Any]:
    """The ``sample`` loop (noise -> sampler -> codes -> decode -> HU) on batches, no file I/O."""
    from bladdergen.data.intensity import unit_to_hu
    from bladdergen.diffusion.sample import sample_seed
    from bladdergen.diffusion.samplers import make_sampler, per_sample_noise

    vqgan, denoiser, sampler, scaler, latent_shape = _sampling_parts(ctx)
    warm_sampler = make_sampler(
        ctx.config.sample.sampler, sampler.schedule, 1, sampler.clip_x0, ctx.config.sample.eta
    )
    device = ctx.device
    vqgan.to(device)
    denoiser.to(device)
    window = ctx.config.preprocess.window
    batch = ctx.config.sample.batch_size
    paired = vqgan.label_decoder is not None
    split = {"denoise_s": [], "decode_s": []}
    first = 0
    warmed = False

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return denoiser(x, t)

    @torch.no_grad()
    def one_batch() -> int:
        nonlocal first, warmed
        indices = list(range(first, first + batch))
        first += batch
        generators = [
            torch.Generator().manual_seed(sample_seed(ctx.config.seed, i)) for i in indices
        ]
        started = time.perf_counter()
        x_T = per_sample_noise(latent_shape, generators, device)
        # the warm-up batch takes one sampler step: every kernel runs once, 49 steps cheaper
        z = scaler.from_unit((sampler if warmed else warm_sampler).sample(denoise, x_T, generators))
        warmed = True
        ctx.sync()
        middle = time.perf_counter()
        z_q, _ = vqgan.quantize(z)
        for row in range(len(indices)):
            # one volume at a time, like sample_volumes (a file must not depend on its batch)
            volume = vqgan.decode(z_q[row : row + 1]).float()[0, 0].cpu().numpy()
            hu = unit_to_hu(volume, window)
            if not np.isfinite(hu).all():
                raise FloatingPointError("decoded volume is not finite")
            if paired:  # a VQ-GAN trained with labels decodes each sample's label map too
                vqgan.decode_label_classes(z_q[row : row + 1])[0].cpu().numpy()
        ctx.sync()
        split["denoise_s"].append(middle - started)
        split["decode_s"].append(time.perf_counter() - middle)
        return len(indices)

    timing = timed_steps(ctx, one_batch, ctx.args.sample_batches)
    timing.pop("last")
    per_batch = timing["step_s_median"]
    n = ctx.args.sample_volumes
    # the warm-up batch is not part of the split medians
    denoise_s = statistics.median(split["denoise_s"][1:])
    decode_s = statistics.median(split["decode_s"][1:])
    return {
        **timing,
        "seconds_per_volume": round(per_batch / batch, 4),
        "denoise_s_per_batch": round(denoise_s, 4),
        "decode_s_per_batch": round(decode_s, 4),
        "volumes_extrapolated": n,
        "extrapolated_s": round(math.ceil(n / batch) * per_batch, 2),
        "settings": {
            "volume": list(ctx.volume_shape),
            "latent": list(latent_shape),
            "batch": batch,
            "sampler": f"{ctx.config.sample.sampler}-{len(sampler.timesteps)}",
            "dtype": ctx.dtype + " denoiser, float32 decode (as sample_volumes)",
            "label_decoder": paired,
            "includes": "noise, sampler, nearest codes, decode (+ labels), HU; no file writing",
            "warmup": "one batch with a 1-step sampler",
        },
    }


def _save_sampling_checkpoints(ctx: Context, root: Path) -> tuple[Path, Path]:
    """Random-weight VQ-GAN and LDM run folders in the format ``sample_volumes`` reads."""
    from bladdergen.checkpoint import WEIGHTS_NAME, save_weights
    from bladdergen.diffusion.train import FORMAT_VERSION as LDM_FORMAT
    from bladdergen.diffusion.train import KIND as LDM_KIND
    from bladdergen.vqgan.load import save_vqgan

    vqgan, denoiser, _, scaler, latent_shape = _sampling_parts(ctx)
    window = tuple(ctx.config.preprocess.window)
    vq_dir, ldm_dir = root / "vqgan", root / "ldm"
    vq_dir.mkdir(parents=True, exist_ok=True)
    ldm_dir.mkdir(parents=True, exist_ok=True)
    # labels_trained: as a run on labeled cases would be, so sample also decodes and writes labels
    labels_trained = vqgan.label_decoder is not None
    vq_meta = save_vqgan(
        vq_dir / WEIGHTS_NAME,
        vqgan,
        0,
        window,
        ctx.volume_shape,
        code_usage=0.0,
        extra={"labels_trained": labels_trained},
    )
    spacing = 400.0 / ctx.volume_shape[0]
    metadata = {
        "kind": LDM_KIND,
        "format_version": LDM_FORMAT,
        "config": to_mapping(ctx.config),
        "scaler": scaler.to_dict(),
        "latent_shape": list(latent_shape),
        "vqgan_hash": vq_meta["weights_sha256"],
        "vqgan_path": str((vq_dir / WEIGHTS_NAME).resolve()),
        "window": [float(w) for w in window],
        "volume_shape": list(ctx.volume_shape),
        "affine": np.diag([spacing, spacing, 4.0, 1.0]).tolist(),
        "training_cases": 0,
        "label_map": {str(k): int(v) for k, v in ctx.config.preprocess.label_map.items()},
        "anatomy_ranges": {},  # no training set: every anatomy check is reported unranged
        # a noise model as train-ldm measures one (the demo's phantoms): with sample.noise
        # residual the timing includes adding it, whose cost depends on the size, not the values
        "noise_model": {"sd_hu": 13.5, "sigma_voxels": [0.75, 0.71, 0.53], "voxels": 0},
        "step": 0,
    }
    save_weights(ldm_dir / WEIGHTS_NAME, denoiser.state_dict(), metadata)
    return vq_dir, ldm_dir


def stage_sample_command(ctx: Context) -> dict[str, Any]:
    """``sample_volumes`` (the ``sample`` command's core, files included) on one batch, then a
    measured run of all ``--sample-volumes`` when the estimate fits in the time left."""
    from bladdergen.diffusion.sample import sample_volumes

    root = ctx.work_dir / "sample_command"
    vq_dir, ldm_dir = _save_sampling_checkpoints(ctx, root)
    batch = ctx.config.sample.batch_size
    calls = 0

    def run(n: int, config: PipelineConfig = ctx.config) -> tuple[dict[str, Any], float]:
        nonlocal calls
        calls += 1
        out = root / f"out_{calls}"  # a fresh folder: existing samples would be skipped
        started = time.perf_counter()
        summary = sample_volumes(config, ldm_dir, out, n, vq_dir, runtime=ctx.runtime)
        ctx.sync()
        wall = time.perf_counter() - started
        if summary["complete"] != n:
            raise RuntimeError(f"sample wrote {summary['complete']} of {n} volumes")
        shutil.rmtree(out, ignore_errors=True)  # 200 paper volumes are ~GBs of scratch
        return summary, wall

    started = time.perf_counter()
    # warm-up: one volume with one sampler step runs every part once (loading, denoiser, codes,
    # decoder, NIfTI and PNG writing) for a fraction of a full sampling
    warm = dataclasses.replace(ctx.config.sample, steps=1)
    run(1, dataclasses.replace(ctx.config, sample=warm))
    ctx.sync()
    warmup = time.perf_counter() - started
    ctx.probe.warmed_up()
    summary, wall = run(batch)
    n = ctx.args.sample_volumes
    overhead = max(wall - summary["seconds"], 0.0)  # loading + hashing checkpoints, manifest
    estimate = overhead + math.ceil(n / batch) * summary["seconds"]
    result: dict[str, Any] = {
        "warmup_s": round(warmup, 4),
        "step_s_median": round(wall, 4),
        "step_s": [round(wall, 4)],
        "steps_timed": 1,
        "seconds_per_volume": round(summary["seconds"] / batch, 4),
        "call_overhead_s": round(overhead, 3),
        "volumes_extrapolated": n,
        "extrapolated_s": round(estimate, 2),
        "settings": {
            "volume": list(ctx.volume_shape),
            "batch": batch,
            "sampler": f"{summary['sampler']}-{summary['steps']}",
            "previews": ctx.config.sample.previews,
            "labels": summary.get("labels"),
            "includes": "sample_volumes: checkpoint load + hash, sampling, NIfTI + PNG writing "
            "(+ label maps and anatomy checks with a label decoder)",
        },
    }
    left = ctx.seconds_left()
    if ctx.args.no_measured_run:
        result["measured_run"] = {"status": "skipped", "reason": "--no-measured-run"}
    elif estimate * 1.15 + 5 > left:
        result["measured_run"] = {
            "status": "skipped",
            "reason": f"time budget: estimated {estimate:.0f} s, {max(left, 0):.0f} s left",
        }
    else:
        try:
            full, full_wall = run(n)
        except Exception as error:  # noqa: BLE001 - keep the batch measurement above
            result["measured_run"] = {"status": "error", "reason": f"{type(error).__name__}: "}
            result["measured_run"]["reason"] += str(error).strip().splitlines()[0][:300]
            return result
        result["measured_run"] = {
            "status": "ok",
            "volumes": n,
            "wall_s": round(full_wall, 2),
            "sampling_loop_s": full["seconds"],
            "seconds_per_volume": full["seconds_per_volume"],
        }
    return result


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "vqgan_train_b1": lambda ctx: stage_vqgan(ctx, 1),
    "vqgan_train_b2": lambda ctx: stage_vqgan(ctx, 2),
    "ldm_train": stage_ldm,
    "deepatlas_registration": lambda ctx: stage_deepatlas(ctx, "registration"),
    "deepatlas_segmentation": lambda ctx: stage_deepatlas(ctx, "segmentation"),
    "segment": stage_segment,
    "sample_ddim": stage_sample_ddim,
    "sample_command": stage_sample_command,
}


def run_stage(name: str, ctx: Context) -> dict[str, Any]:
    """Run one stage; any failure (CUDA OOM included) becomes ``status`` + ``error`` in the result."""
    started = time.perf_counter()
    # DeepAtlas turns TF32 off for its process; the other commands run with PyTorch's defaults,
    # so every stage gets back the flags it would have as its own command
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    ctx.probe.stage_started()
    try:
        result = {"status": "ok", **STAGE_FUNCTIONS[name](ctx)}
        result.update(ctx.probe.peak())
    except Exception as error:  # noqa: BLE001 - one stage's failure must not stop the others
        oom = isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)
        result = {
            "status": "oom" if oom else "error",
            "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:500]}"
            if str(error).strip()
            else type(error).__name__,
            "traceback_tail": traceback.format_exc().strip().splitlines()[-6:],
        }
        try:
            result.update(ctx.probe.peak())  # how far it got before failing
        except Exception:  # noqa: BLE001 - a broken CUDA context may refuse even this
            pass
    result["wall_s"] = round(time.perf_counter() - started, 2)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    # free this stage's models and optimiser state before the next stage measures its peak
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------
# Report


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device: GPU name, memory, CUDA, cuDNN, device count."""
    import monai

    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu_name": props.name,
            "gpu_total_memory_gb": round(props.total_memory / GB, 2),
            "gpu_compute_capability": f"{props.major}.{props.minor}",
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    else:
        env |= {"gpu_name": None, "gpu_total_memory_gb": None}
    return env


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, evaluated from the measurements (never on CPU proxies)."""
    stages = report["stages"]
    on_gpu = report["settings"]["device"].startswith("cuda")
    paper_size = report["settings"]["volume"] == [512, 512, 24]
    out: dict[str, Any] = {"evaluated": on_gpu and paper_size}
    if not out["evaluated"]:
        out["note"] = "goals are judged on a GPU at 512x512x24 only; these numbers are a proxy"
        return out
    peaks = {n: s.get("peak_gb") for n, s in stages.items() if s.get("status") == "ok"}
    failed = [n for n, s in stages.items() if s.get("status") != "ok"]
    out["max_peak_gb"] = max(peaks.values()) if peaks else None
    # a first step above the limit would stop training before the steady state is reached
    warmups = [s["warmup_peak_gb"] for s in stages.values() if s.get("warmup_peak_gb") is not None]
    out["max_warmup_peak_gb"] = max(warmups) if warmups else None
    out[f"every_stage_peak_le_{PEAK_GOAL_GB:g}gb"] = (
        not failed and all(p <= PEAK_GOAL_GB for p in peaks.values()) if peaks else False
    )
    command = stages.get("sample_command", {})
    measured = command.get("measured_run", {})
    seconds = measured.get("wall_s") if measured.get("status") == "ok" else None
    out["sample_seconds"] = seconds if seconds is not None else command.get("extrapolated_s")
    out["sample_seconds_source"] = "measured" if seconds is not None else "extrapolated"
    out["sample_volumes"] = report["settings"]["sample_volumes"]
    for name, limit in SAMPLE_GOAL_S.items():
        value = out["sample_seconds"] if out["sample_volumes"] == 200 else None
        out[f"sample_200_le_{limit:g}s_{name}"] = None if value is None else value <= limit
    return out


def _cell(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return fmt.format(value)
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: environment, one row per stage, sampling, goals."""
    env, settings = report["environment"], report["settings"]
    memory = (
        "peak GB (`torch.cuda.max_memory_allocated`)"
        if settings["device"].startswith("cuda")
        else "peak GB (CPU proxy: peak RSS growth)"
    )
    lines = [
        "# bladdergen GPU check",
        "",
        f"`{report['command']}` — {report['started_utc']}, {report['wall_s']} s wall"
        + ("" if report["complete"] else " (incomplete)"),
        "",
        f"Device: {env.get('gpu_name') or 'CPU'}"
        + (f", {env['gpu_total_memory_gb']} GB" if env.get("gpu_total_memory_gb") else "")
        + f"; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"{env['cuda_device_count']} CUDA device(s); MONAI {env['monai']}.",
        f"Profile `{settings['profile']}`, volume {'x'.join(map(str, settings['volume']))}, "
        f"{settings['dtype']}, 1 warm-up + up to {settings['steps']} timed steps (median).",
        "",
        f"| stage | status | settings | {memory} | warm-up peak GB | median s / step | steps "
        "| wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in STAGES:
        stage = report["stages"].get(name)
        if stage is None:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        s = stage.get("settings", {})
        brief = ", ".join(
            f"{k} {v if not isinstance(v, list) else 'x'.join(map(str, v))}"
            for k, v in s.items()
            if k in ("batch", "latent", "grad_accumulation", "sampler")
        )
        status = stage["status"]
        if status != "ok":
            status += f": {stage.get('error', '')[:120]}".replace("|", "/")
        lines.append(
            f"| {name} | {status} | {brief} | {_cell(stage.get('peak_gb'))} | "
            f"{_cell(stage.get('warmup_peak_gb'))} | "
            f"{_cell(stage.get('step_s_median'), '{:.4f}')} | {_cell(stage.get('steps_timed'))} | "
            f"{_cell(stage.get('wall_s'), '{:.1f}')} |"
        )
    lines += [
        "",
        "| sampling | s / volume | volumes | extrapolated s | measured s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("sample_ddim", "sample_command"):
        stage = report["stages"].get(name, {})
        if stage.get("status") != "ok":
            continue
        measured = stage.get("measured_run", {})
        measured_cell = (
            _cell(measured.get("wall_s"), "{:.1f}")
            if measured.get("status") == "ok"
            else (measured.get("reason", "-") if measured else "n/a")
        )
        lines.append(
            f"| {name} | {_cell(stage.get('seconds_per_volume'), '{:.3f}')} | "
            f"{stage.get('volumes_extrapolated')} | {_cell(stage.get('extrapolated_s'), '{:.1f}')} "
            f"| {measured_cell} |"
        )
    lines += ["", "Goals: " + json.dumps(report.get("goals", {}), sort_keys=True), ""]
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Both files, atomically (a reader never sees a half-written file)."""
    report["goals"] = goals(report)
    atomic_write_json(out_dir / JSON_NAME, report)
    atomic_write_text(out_dir / MARKDOWN_NAME, markdown(report))


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json/.md")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cpu")
    parser.add_argument("--profile", default="paper", choices=("paper", "tiny"))
    parser.add_argument("--size", type=int, default=None, help="in-plane voxels (paper: 512)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage (median)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds (see top)")
    parser.add_argument("--sample-volumes", type=int, default=200, help="volumes to extrapolate")
    parser.add_argument("--sample-batch", type=int, default=None, help="default: profile's")
    parser.add_argument("--sample-batches", type=int, default=2, help="timed sampling batches")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps per volume")
    parser.add_argument("--no-measured-run", action="store_true", help="extrapolate only")
    parser.add_argument(
        "--perceptual-weights",
        default=None,
        help="local torchvision ResNet-50 state dict: VQ-GAN steps with the perceptual loss on",
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch (default: a tmp dir)")
    args = parser.parse_args(argv)
    for key in ("steps", "sample_volumes", "sample_batches", "ddim_steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def build_config(args: argparse.Namespace, device: torch.device) -> PipelineConfig:
    """The profile through the project's loader, with the in-plane size and sampling overrides."""
    overrides: dict[str, Any] = {
        "sample.steps": args.ddim_steps,
        "sample.batch_size": args.sample_batch,
        "vqgan.perceptual_weights": args.perceptual_weights,
    }
    if args.size is not None:
        overrides["preprocess.target_size"] = [args.size, args.size]
    for section in ("vqgan", "ldm", "sample", "deepatlas"):
        overrides[f"{section}.device"] = str(device)
    return load_config(args.profile, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when every requested stage succeeded, else 1 (files written)."""
    from bladdergen.runtime import resolve_device

    args = parse_args(argv)
    # MONAI announces its grid_sample fallback on every Warp: noise in an unattended log
    warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp")
    started_wall = time.perf_counter()
    deadline = time.monotonic() + args.time_budget
    device = resolve_device(args.device)
    config = build_config(args, device)
    size = config.preprocess.target_size
    volume_shape = (int(size[0]), int(size[1]), int(config.preprocess.target_depth))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_dir))
    ctx = Context(args, device, config, volume_shape, scratch, deadline, MemoryProbe(device))
    report: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "command": " ".join(
            ["python bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "complete": False,
        "wall_s": 0.0,
        "environment": environment(device),
        "settings": {
            "device": str(device),
            "profile": args.profile,
            "volume": list(volume_shape),
            "dtype": ctx.dtype,
            "steps": args.steps,
            "time_budget_s": args.time_budget,
            "sample_volumes": args.sample_volumes,
            "sample_batch": config.sample.batch_size,
            "ddim_steps": config.sample.steps,
            "seed": config.seed,
        },
        "stages": {},
    }
    print(f"gpu_check: {report['environment'].get('gpu_name') or 'CPU'}, volume {volume_shape}")
    try:
        for name in args.stages:
            result = run_stage(name, ctx)
            report["stages"][name] = result
            report["wall_s"] = round(time.perf_counter() - started_wall, 2)
            write_report(out_dir, report)
            print(
                f"  {name}: {result['status']}, peak {result.get('peak_gb', '-')} GB, "
                f"median {result.get('step_s_median', '-')} s, wall {result['wall_s']} s"
                + (f" ({result['error']})" if "error" in result else "")
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["complete"] = True
    report["wall_s"] = round(time.perf_counter() - started_wall, 2)
    write_report(out_dir, report)
    print(f"gpu_check: wrote {out_dir / JSON_NAME} and {out_dir / MARKDOWN_NAME}")
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
