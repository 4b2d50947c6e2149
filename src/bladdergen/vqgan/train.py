"""The VQ-GAN training loop: read it top to bottom.

load config -> read the preprocessed volumes -> build autoencoder + 2 discriminators + 2 Adams ->
for each step: batch (derived from (seed, step)), autoencoder step, discriminator step, log,
checkpoint. ``resume=True`` restores weights, optimisers, step and RNG from ``training_state.pt``
so the run continues exactly (on CPU: bit-identical to an uninterrupted run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from bladdergen.checkpoint import WEIGHTS_NAME
from bladdergen.data.bladder import filled_bladder, lumen
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.engine.run import RunFolder, RunKind, no_sync, scheduled_learning_rate, unwrap
from bladdergen.errors import InputError
from bladdergen.fileio import atomic_write_with
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
from bladdergen.vqgan.model import LUMEN, VQGAN

KIND = "vqgan"
IMAGES_DIR = "images"
# Settings that may change between a run and its resume (they do not change what is learned).
RESUMABLE_CHANGES = {"max_steps", "device", "log_every", "checkpoint_every", "image_every"}
RUN_KIND = RunKind(KIND, RESUMABLE_CHANGES, entries={IMAGES_DIR})


UNLABELED = -1  # label voxels of cases without a label map


def load_volumes(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, PreprocessedSet]:
    """All cases of a preprocessed set: images (N, 1, X, Y, Z) float32 in [-1, 1], labels
    (N, 1, X, Y, Z) int64 classes 0/1/2 (``UNLABELED`` everywhere for an unlabeled case), CPU."""
    dataset = PreprocessedSet.open(Path(data_dir))
    images, labels = [], []
    for case in dataset.cases:
        image = dataset.load_image(case)
        if images and image.shape != images[0].shape:
            raise InputError(
                f"{case.image_path}: shape {list(image.shape)} differs from the set's "
                f"{list(images[0].shape)}; expected one shape (run `bladdergen preprocess`)"
            )
        images.append(image)
        label = dataset.load_label(case).astype(np.int64) if case.labeled else None
        labels.append(label if label is not None else np.full(image.shape, UNLABELED, np.int64))
    volumes = torch.from_numpy(np.stack(images)[:, None]).float()
    return volumes, torch.from_numpy(np.stack(labels)[:, None]), dataset


def batch_plan(seed: int, step: int, n_cases: int, global_batch: int, depth: int) -> dict:
    """The global batch of ``step``, derived from (seed, step) only, so resume needs no sampler state.

    Cases are visited in a fresh random order every epoch. Returns ``indices`` (G,), ``flips``
    (G,) bools for left-right (X) mirroring, and ``slices`` (G,) axial slice indices for the 2D
    losses.
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
    flips = torch.rand(global_batch, generator=generator) < 0.5
    slices = torch.randint(depth, (global_batch,), generator=generator)
    return {"indices": torch.tensor(indices), "flips": flips, "slices": slices}


SHELL = 4  # a training-only mark: the tissue just outside the bladder (a background voxel)
SHELL_VOXELS = 2  # its in-plane width


def with_regions(labels: torch.Tensor) -> torch.Tensor:
    """Label targets (N, 1, X, Y, Z) with each labeled case's lumen marked ``LUMEN`` (the urine
    that wall and tumor enclose, by hole filling in each axial slice) and ``SHELL`` on the
    ``SHELL_VOXELS`` in-plane ring of tissue around the filled bladder; unlabeled cases unchanged.
    The shell is background to the label decoder; the L1 term weighs it as a region, because the
    wall is read from the step between urine and the fat around it."""
    marked = labels.clone()
    ring = np.zeros((3, 3, 1), dtype=bool)
    ring[:, :, 0] = True  # in-plane 8-neighbourhood: the shell stays on the bladder's slices
    for case in marked[:, 0]:
        if bool((case == UNLABELED).all()):
            continue
        classes = case.numpy()
        bladder = filled_bladder(classes)
        outside = ndimage.binary_dilation(bladder, ring, iterations=SHELL_VOXELS) & ~bladder
        case[torch.from_numpy(outside & (classes == 0))] = SHELL
        case[torch.from_numpy(lumen(classes))] = LUMEN
    return marked


def _augment(volumes: torch.Tensor, flips: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Left-right (X) mirroring per volume (B, C, X, Y, Z) where ``flips`` (B,) is set; images and
    their labels get the same flips. Y and Z are never flipped: no scanner makes those anatomies."""
    if not enabled:
        return volumes
    return torch.stack([v.flip(1) if bool(f) else v for v, f in zip(volumes, flips, strict=True)])


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
    return scheduled_learning_rate(cfg.lr_schedule, cfg.lr, step, cfg.max_steps)


def train_vqgan(
    cfg: VQGANConfig,
    data_dir: Path,
    run_dir: Path,
    *,
    seed: int = 0,
    resume: bool = False,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Train the 3D VQ-GAN on a preprocessed set; write checkpoints and logs into ``run_dir``.

    Returns the run summary (steps, weights, seconds) with the code usage, codebook range, latent
    shape and final losses. Raises InputError for a bad data or run folder, CheckpointError for a
    run that cannot be resumed, TrainingDiverged when a loss becomes non-finite.
    """
    runtime = start_runtime(cfg.device)
    volumes, labels, dataset = load_volumes(Path(data_dir))
    labels_trained = cfg.label_head and bool((labels != UNLABELED).any())
    labels = with_regions(labels)  # lumen and shell: regions of the L1 term
    volume_shape = tuple(volumes.shape[2:])
    run = RunFolder.open(
        run_dir, RUN_KIND, cfg, runtime, seed=seed, resume=resume, reporter=reporter
    )

    seed_everything(seed + runtime.rank)
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
    elif cfg.perceptual_weight > 0:
        run.reporter.notice(
            "perceptual loss is off: vqgan.perceptual_weights is not set (needs a local "
            "torchvision ResNet-50 state dict; nothing is downloaded)"
        )
    adversarial = AdversarialLoss(cfg.gan_loss)
    stateful = {
        "model": model,
        "disc2d": disc2d,
        "disc3d": disc3d,
        "opt_ae": opt_ae,
        "opt_d": opt_d,
    }
    run.restore(**stateful)
    # The codebook syncs its own buffers (all-reduced EMA statistics), so DDP need not.
    nets = (run.wrap(model, broadcast_buffers=False), run.wrap(disc2d), run.wrap(disc3d))

    def write_weights() -> None:
        save_vqgan(
            run.path / WEIGHTS_NAME,
            model,
            step=run.step,
            window=dataset.window,
            volume_shape=volume_shape,
            code_usage=_code_usage(model, volumes, runtime.device),
            extra={
                "data_dir": str(dataset.root),
                "n_cases": len(dataset.cases),
                "labels_trained": labels_trained,
            },
        )

    model.train()
    disc2d.train()
    disc3d.train()
    global_batch = cfg.batch_size * runtime.world_size * cfg.grad_accumulation
    metrics: dict[str, Any] = {}
    show = ("l1", "perplexity", "used_fraction")
    for step in run.steps(cfg.max_steps, log_every=cfg.log_every, show=show):
        plan = batch_plan(seed, step, len(volumes), global_batch, volume_shape[2])
        metrics = _train_step(
            step,
            plan,
            (volumes, labels),
            cfg,
            runtime,
            nets,
            (opt_ae, opt_d),
            perceptual,
            adversarial,
        )
        views = metrics.pop("_views")
        if runtime.is_main and (step + 1) % cfg.image_every == 0:
            _save_preview(run.path / IMAGES_DIR / f"step_{step + 1:07d}.png", *views)
        done = run.end_step(step, metrics)
        if run.due(done, cfg.checkpoint_every):
            run.save(done, stateful, write_weights)

    low, high = model.codebook_range()
    return run.summary(
        code_usage=_code_usage(model, volumes, runtime.device),
        codebook_min=low,
        codebook_max=high,
        latent_shape=list(model.latent_shape(volume_shape)),
        final_metrics=metrics,
    )


def _train_step(
    step: int,
    plan: dict,
    data: tuple[torch.Tensor, torch.Tensor],
    cfg: VQGANConfig,
    runtime: Runtime,
    models: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module],
    optimisers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    perceptual,
    adversarial: AdversarialLoss,
) -> dict[str, Any]:
    """One optimiser step of the autoencoder and (after ``disc_start``) of the discriminators.

    Returns the mean loss terms (floats) and, under ``_views``, the last micro-batch's input and
    reconstruction for the preview picture.
    """
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
        volumes, labels = data
        both = torch.cat([volumes[plan["indices"][pick]], labels[plan["indices"][pick]].float()], 1)
        both = _augment(both, plan["flips"][pick], cfg.flip_augmentation).to(runtime.device)
        x, y = both[:, :1], both[:, 1:].long()  # image (B, 1, ...) and classes (B, 1, ...)
        slices = plan["slices"][pick]
        # DDP all-reduces gradients only on the last micro step of an accumulation.
        skip_sync = runtime.distributed and micro < cfg.grad_accumulation - 1

        # ---- autoencoder ----
        with no_sync(model, skip_sync), autocast(runtime.device):
            out = model(x)
            error = (out.x_hat.float() - x).abs()
            l1 = error.mean()
            loss = cfg.l1_weight * l1 + cfg.commitment_weight * out.commitment
            terms = {"l1": l1, "commitment": out.commitment}
            region = region_l1(error, y)
            if cfg.region_weight > 0 and region is not None:
                loss = loss + cfg.region_weight * region
                terms["l1_regions"] = region
            if out.label_logits is not None:
                targets = y.masked_fill(y == SHELL, 0)
                if not cfg.label_lumen:
                    targets = targets.masked_fill(targets == LUMEN, 0)
                label_loss = label_head_loss(out.label_logits.float(), targets)
                loss = loss + cfg.label_weight * label_loss
                terms["label_loss"] = label_loss
            if perceptual is not None:
                p = perceptual(pick_slices(out.x_hat.float(), slices), pick_slices(x, slices))
                loss = loss + cfg.perceptual_weight * p
                terms["perceptual"] = p
            if gan_on:
                # The unwrapped discriminators: only the autoencoder learns from this loss.
                d2, d3 = unwrap(disc2d), unwrap(disc3d)
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
                no_sync(disc2d, skip_sync),
                no_sync(disc3d, skip_sync),
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

    torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), cfg.grad_clip)
    sums["lr"] = learning_rate(cfg, step)
    for group in opt_ae.param_groups:
        group["lr"] = sums["lr"]
    opt_ae.step()
    if gan_on:
        params = [*unwrap(disc2d).parameters(), *unwrap(disc3d).parameters()]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt_d.step()
    return {**sums, "_views": (x.detach(), out.x_hat.detach())}


REGIONS = (1, 2, LUMEN, SHELL)  # wall, tumor, urine, the tissue around: what segmentation reads


def region_l1(error: torch.Tensor, classes: torch.Tensor) -> torch.Tensor | None:
    """Mean over wall, tumor and urine (those present in the batch) of each one's mean absolute
    error; None when the batch holds none (unlabeled cases).

    ``error`` (B, 1, X, Y, Z) |x̂ - x|, ``classes`` (B, 1, X, Y, Z) with the lumen marked.
    Each structure weighs the same, whatever its size: a tumor of 50 voxels as much as a wall of
    1,500, and the urine too, because the wall and tumor are read against it (a decoder that
    brightened the urine by 15-20 HU, measured at 400 steps with wall and tumor pooled and the
    urine left out, made a segmenter trained on real cases find tumor all over the lumen).
    """
    means = [error[classes == c].mean() for c in REGIONS if bool((classes == c).any())]
    return torch.stack(means).mean() if means else None


def label_head_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + foreground soft Dice of label logits (B, K, X, Y, Z) against classes
    (B, 1, X, Y, Z), over labeled voxels only (``UNLABELED`` ignored).

    The Dice is over the whole batch and every class but background (wall, tumor and, with
    ``label_lumen``, the lumen), so a tumor of 0.1% of the voxels
    still weighs as much as the wall. Always part of the graph (zero when nothing is labeled), so
    DDP sees the label decoder used on every rank.
    """
    known = classes[:, 0] != UNLABELED  # (B, X, Y, Z)
    target = classes[:, 0].clamp(min=0)
    ce = F.cross_entropy(logits, target, reduction="none")
    loss = (ce * known).sum() / known.sum().clamp(min=1)
    probs = torch.softmax(logits, dim=1)
    weight = known[:, None].float()
    hot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    dice_terms = []
    for c in range(1, logits.shape[1]):
        truth = hot[:, c : c + 1] * weight
        if truth.sum() == 0:
            continue  # a class absent from the batch: Dice would only punish predicting it
        p = probs[:, c : c + 1] * weight
        dice_terms.append(1 - 2 * (p * truth).sum() / (p.sum() + truth.sum() + 1e-5))
    if dice_terms:
        loss = loss + torch.stack(dice_terms).mean()
    return loss


@torch.no_grad()
def _code_usage(model: VQGAN, volumes: torch.Tensor, device: torch.device) -> float:
    """Fraction of the codebook that the training volumes map to (eval-mode search, no update)."""
    used = torch.zeros(model.config.n_codes, dtype=torch.bool)
    for volume in volumes:
        _, indices = model.quantize(model.encoder(volume[None].to(device)))
        used[indices.flatten().cpu()] = True
    return float(used.float().mean())
