"""``train-deepatlas``: semi-supervised segmentation by joint registration (DeepAtlas), or the
supervised-only baseline, in one readable loop.

One global step is one optimiser update of one network. The DeepAtlas schedule
(:func:`bladdergen.deepatlas.pairs.phase_of`) pre-trains the registration net without labels
(similarity + regularity) and the segmentation net on the labeled cases, then alternates
registration steps (segmentation frozen) and segmentation steps (registration frozen). The
``supervised_only`` baseline trains the same segmentation net on the same labeled cases for the same
number of segmentation updates, with no registration and no unlabeled data.

Run folder (see :mod:`bladdergen.checkpoint`): ``config.yaml``, ``model.safetensors`` (tensors
``seg_net.*`` and, for DeepAtlas, ``reg_net.*``), ``best.safetensors`` (best validation Dice),
``training_state.pt``, ``metrics.jsonl``, ``split.json``, and ``prepared/`` (raw pool volumes after
preprocessing).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bladdergen import checkpoint as ckpt
from bladdergen.data.dataset import CLASS_NAMES, CaseRecord, PreprocessedSet
from bladdergen.deepatlas.config import DeepAtlasConfig
from bladdergen.deepatlas.fields import Warper, folding_fraction
from bladdergen.deepatlas.losses import DeepAtlasLosses, disable_tf32, one_hot
from bladdergen.deepatlas.networks import RegistrationNet, SegmentationNet, portable_state_dict
from bladdergen.deepatlas.pairs import (
    REG,
    REG_PRETRAIN,
    SUPERVISED,
    labeled_batch,
    phase_of,
    registration_pairs,
    segmentation_pairs,
    segmentation_updates,
    step_rng,
)
from bladdergen.deepatlas.pools import PoolImage, VolumeCache, pool_from_folder, split_labeled
from bladdergen.deepatlas.segment import dice_per_class, predict_classes
from bladdergen.engine.run import RunFolder, RunKind, unwrap
from bladdergen.errors import InputError
from bladdergen.fileio import atomic_write_json
from bladdergen.progress import SILENT, Reporter
from bladdergen.runtime import Runtime, autocast, main_process_first, start_runtime
from bladdergen.settings import to_mapping

KIND = "deepatlas"
MODE_DEEPATLAS, MODE_SUPERVISED = "deepatlas", "supervised-only"
# Settings that may change between a run and its resume (the rest must match).
RESUMABLE_KEYS = {"max_steps", "device", "val_every", "checkpoint_every", "log_every"}
RESUMABLE_KEYS |= {"cache_volumes", "sw_overlap"}
PREPARED_DIR = "prepared"
RUN_KIND = RunKind(KIND, RESUMABLE_KEYS, entries={"split.json", PREPARED_DIR})


class _Images:
    """Training images as tensors: index ``i < n_labeled`` is labeled, the rest are unlabeled."""

    def __init__(self, labeled: list[PoolImage], unlabeled: list[PoolImage], capacity: int):
        self.items = labeled + unlabeled
        self.n_labeled = len(labeled)
        self.cache = VolumeCache(capacity)

    def images(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """(B, 1, X, Y, Z) float32 images in [-1, 1]."""
        arrays = [self.cache.get(self.items[i].image_path) for i in indices]
        return torch.from_numpy(np.stack(arrays))[:, None].to(device)

    def labels(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """(B, 1, X, Y, Z) int64 classes of labeled images."""
        arrays = [self.cache.get(self.items[i].label_path, np.uint8) for i in indices]
        return torch.from_numpy(np.stack(arrays).astype(np.int64))[:, None].to(device)


def _check_shapes(items: list[PoolImage], shape: tuple[int, ...], multiple: tuple[int, ...]):
    import nibabel as nib

    for item in items:
        found = tuple(int(n) for n in nib.load(str(item.image_path)).shape)
        if found != shape:
            raise InputError(
                f"{item.image_path}: volume shape {found}, expected {shape} like the labeled "
                "training data (preprocess every pool with the same settings)"
            )
    for axis, (n, m) in enumerate(zip(shape, multiple, strict=True)):
        if n % m:
            raise InputError(
                f"volume shape {shape}: axis {'XYZ'[axis]} has {n} voxels, expected a multiple of "
                f"{m} for the configured networks (deepatlas.*_filters / *_inplane_levels)"
            )


def train_deepatlas(
    cfg: DeepAtlasConfig,
    data_dir: Path,
    run_dir: Path,
    *,
    seed: int = 0,
    unlabeled_dirs: list[Path] | None = None,
    synthetic_dir: Path | None = None,
    supervised_only: bool = False,
    resume: bool = False,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Train DeepAtlas (or the supervised-only baseline) and write the run folder.

    ``data_dir``: a preprocessed set; its labeled cases are split into training and validation
    (``cfg.val_cases``), its unlabeled cases join the unlabeled pool. ``unlabeled_dirs`` and
    ``synthetic_dir``: more unlabeled images (preprocessed sets or raw HU volumes, prepared with
    DATA_DIR's recorded preprocess settings). Returns the run summary with the schedule's update
    counts, pool sizes and the best validation Dice.

    Raises InputError for unusable data or run folders, CheckpointError when ``resume`` does not
    match the run, TrainingDiverged when a loss becomes non-finite.
    """
    mode = MODE_SUPERVISED if supervised_only else MODE_DEEPATLAS
    runtime = start_runtime(cfg.device)
    disable_tf32()

    # ---- data
    dataset = PreprocessedSet.open(data_dir)
    preprocess = dataset.preprocess_config()
    train_ids, val_ids = split_labeled(dataset, cfg.val_cases, seed)
    labeled = [_pool_image(dataset.case(c), "labeled") for c in train_ids]
    validation = [_pool_image(dataset.case(c), "validation") for c in val_ids]
    unlabeled: list[PoolImage] = []
    if supervised_only and (unlabeled_dirs or synthetic_dir is not None):
        reporter.notice("--supervised-only: the unlabeled and synthetic pools are not used")
    elif not supervised_only:
        unlabeled = [
            PoolImage(f"unlabeled:{c.case_id}", "unlabeled", c.image_path)
            for c in dataset.unlabeled_cases
        ]
    pools_wanted = [(d, "unlabeled") for d in unlabeled_dirs or []]
    pools_wanted += [(synthetic_dir, "synthetic")] if synthetic_dir is not None else []
    pools = {
        "labeled": [p.case_id for p in labeled],
        "validation": [p.case_id for p in validation],
        "unlabeled": [p.case_id for p in unlabeled],
        "folders": []
        if supervised_only
        else [[str(Path(d).resolve()), s] for d, s in pools_wanted],
    }
    facts = {"mode": mode, "pools": pools}
    run = RunFolder.open(
        run_dir, RUN_KIND, cfg, runtime, seed=seed, resume=resume, reporter=reporter, facts=facts
    )
    if not supervised_only:
        with main_process_first(runtime):
            for folder, source in pools_wanted:
                prepared = run.path / PREPARED_DIR
                unlabeled += pool_from_folder(folder, source, prepared, preprocess, run.reporter)
    if runtime.is_main:
        atomic_write_json(run.path / "split.json", {**pools, "unlabeled": _ids(unlabeled)})
    shape = tuple(int(n) for n in dataset.load_image(dataset.case(train_ids[0])).shape)
    spacing = dataset.spacing(dataset.case(train_ids[0]))
    if not supervised_only and len(labeled) + len(unlabeled) < 2:
        raise InputError(f"{data_dir}: DeepAtlas needs at least 2 training images, found 1")

    # ---- networks, losses, optimisers (same initial weights on every rank)
    torch.manual_seed(seed)
    seg_net = SegmentationNet.from_config(cfg).to(runtime.device)
    reg_net = None if supervised_only else RegistrationNet.from_config(cfg).to(runtime.device)
    multiple = tuple(
        max(a, b)
        for a, b in zip(seg_net.multiple, reg_net.multiple if reg_net else (1, 1, 1), strict=True)
    )
    _check_shapes(labeled + validation + unlabeled, shape, multiple)
    seg_net.roi_size = shape
    seg_opt = torch.optim.Adam(seg_net.parameters(), lr=cfg.seg_lr)
    reg_opt = torch.optim.Adam(reg_net.parameters(), lr=cfg.reg_lr) if reg_net else None
    losses = DeepAtlasLosses(cfg.lncc_kernel).to(runtime.device)
    warper = Warper().to(runtime.device)
    stateful = {"seg_net": seg_net, "reg_net": reg_net, "seg_opt": seg_opt, "reg_opt": reg_opt}
    run.restore(**stateful)
    best_score = run.state["best_score"] if run.state else -math.inf
    best_step = run.state["best_step"] if run.state else None
    seg_ddp = run.wrap(seg_net)
    reg_ddp = run.wrap(reg_net) if reg_net is not None else None

    metadata = {
        "kind": KIND,
        "mode": mode,
        "config": {"seed": seed, "deepatlas": to_mapping(cfg)},
        "preprocess": to_mapping(preprocess),
        "window": list(dataset.window),
        "label_map": {str(k): v for k, v in dataset.label_map.items()},
        "train_shape": list(shape),
        "spacing": list(spacing),
        "class_names": list(CLASS_NAMES),
    }

    def write_weights(path: Path = run.path / ckpt.WEIGHTS_NAME, **extra: Any) -> None:
        _save_weights(path, seg_net, reg_net, {**metadata, "step": run.step, **extra})

    images = _Images(labeled, unlabeled, cfg.cache_volumes)
    val_images = _Images(validation, [], cfg.cache_volumes)
    total = segmentation_updates(cfg, cfg.max_steps) if supervised_only else cfg.max_steps
    last_val: dict[str, Any] = {}
    description = f"train-deepatlas ({mode})"
    for step in run.steps(total, log_every=cfg.log_every, description=description, show=("loss",)):
        phase = SUPERVISED if supervised_only else phase_of(step, cfg)
        rng = step_rng(seed, step, runtime.rank)
        if phase in (REG_PRETRAIN, REG):
            terms = _registration_step(
                phase, rng, images, seg_ddp, reg_ddp, reg_opt, losses, warper, cfg, runtime
            )
        else:
            terms = _segmentation_step(
                phase, rng, images, seg_ddp, reg_ddp, seg_opt, losses, warper, cfg, runtime
            )
        done = run.end_step(step, terms, phase=phase)
        # scoring only starts once F_S has been trained: an untrained net that paints "wall"
        # over a region can out-score one that predicts nothing and would be kept as "best"
        seg_trained = supervised_only or done > cfg.reg_pretrain_steps
        if runtime.is_main and val_images.items and seg_trained and run.due(done, cfg.val_every):
            last_val = validate(seg_net, reg_net, val_images, images, warper, runtime)
            improved = last_val["dice_mean"] > best_score
            if improved:
                best_score, best_step = last_val["dice_mean"], done
                write_weights(run.path / ckpt.BEST_WEIGHTS_NAME, validation=last_val)
            run.log_validation(done, {**last_val, "best": improved})
        if run.due(done, cfg.checkpoint_every):
            scores = {"best_score": best_score, "best_step": best_step}
            run.save(done, stateful, write_weights, extra=scores)

    updates = segmentation_updates(cfg, cfg.max_steps)
    return run.summary(
        mode=mode,
        segmentation_updates=updates,
        registration_updates=0 if supervised_only else cfg.max_steps - updates,
        labeled_training_cases=len(labeled),
        validation_cases=len(validation),
        unlabeled_images=sum(p.source == "unlabeled" for p in unlabeled),
        synthetic_images=sum(p.source == "synthetic" for p in unlabeled),
        best_step=best_step,
        best_dice_mean=None if best_step is None else best_score,
        last_validation=last_val,
    )


def _pool_image(case: CaseRecord, source: str) -> PoolImage:
    return PoolImage(case.case_id, source, case.image_path, case.label_path)


def _ids(images: list[PoolImage]) -> list[str]:
    return [p.case_id for p in images]


# ----------------------------------------------------------------------------------------------
# One step of each kind


def _registration_step(phase, rng, images, seg_net, reg_net, reg_opt, losses, warper, cfg, rt):
    """Registration update, segmentation frozen: similarity + λ_r·bending (+ λ_a·anatomy)."""
    pairs = registration_pairs(rng, len(images.items), cfg.batch_size)
    moving_idx, target_idx = [p[0] for p in pairs], [p[1] for p in pairs]
    moving = images.images(moving_idx, rt.device)
    target = images.images(target_idx, rt.device)
    reg_net.train()
    with autocast(rt.device):
        field = reg_net(moving, target)
    field = field.float()
    similarity = losses.similarity(warper(moving, field), target)
    regularity = losses.regularity(field)
    loss = similarity + cfg.reg_weight * regularity
    terms = {"similarity": float(similarity.detach()), "regularity": float(regularity.detach())}
    if phase == REG and cfg.anatomy_weight > 0:
        seg_m = _segmentations(moving_idx, moving, images, unwrap(seg_net), rt)
        seg_t = _segmentations(target_idx, target, images, unwrap(seg_net), rt)
        anatomy = losses.anatomy(warper(seg_m, field), seg_t)
        loss = loss + cfg.anatomy_weight * anatomy
        terms["anatomy"] = float(anatomy)
    reg_opt.zero_grad(set_to_none=True)
    loss.backward()
    reg_opt.step()
    return {"loss": float(loss), **terms, "folding": folding_fraction(field)}


def _segmentation_step(phase, rng, images, seg_net, reg_net, seg_opt, losses, warper, cfg, rt):
    """Segmentation update, registration frozen.

    Pre-training and the baseline: Dice + CE on a batch of labeled images. Alternating phase:
    λ_a·Dice(S_m∘φ, S_t) + λ_sp·(Dice + CE on the labeled images of the pair), pairs with at least
    one labeled image only.
    """
    seg_net.train()
    if phase != "seg":
        indices = labeled_batch(rng, images.n_labeled, cfg.batch_size)
        with autocast(rt.device):
            logits = seg_net(images.images(indices, rt.device))
        loss = losses.supervised(logits, images.labels(indices, rt.device))
        seg_opt.zero_grad(set_to_none=True)
        loss.backward()
        seg_opt.step()
        return {"loss": float(loss), "supervised": float(loss)}

    n_unlabeled = len(images.items) - images.n_labeled
    pairs = segmentation_pairs(rng, images.n_labeled, n_unlabeled, cfg.batch_size)
    moving_idx, target_idx = [p[0] for p in pairs], [p[1] for p in pairs]
    moving = images.images(moving_idx, rt.device)
    target = images.images(target_idx, rt.device)
    with torch.no_grad(), autocast(rt.device):
        field = unwrap(reg_net).eval()(moving, target)
    field = field.float()
    # one forward for moving and target together (DDP allows one forward per backward)
    with autocast(rt.device):
        logits = seg_net(torch.cat([moving, target])).float()
    probs = torch.softmax(logits, dim=1)
    batch = len(pairs)
    seg_m = _with_manual_labels(moving_idx, probs[:batch], images, rt)
    seg_t = _with_manual_labels(target_idx, probs[batch:], images, rt)
    anatomy = losses.anatomy(warper(seg_m, field), seg_t)
    all_idx = moving_idx + target_idx
    labeled_rows = [row for row, i in enumerate(all_idx) if i < images.n_labeled]
    supervised = losses.supervised(
        logits[labeled_rows], images.labels([all_idx[r] for r in labeled_rows], rt.device)
    )
    loss = cfg.anatomy_weight * anatomy + cfg.supervised_weight * supervised
    seg_opt.zero_grad(set_to_none=True)
    loss.backward()
    seg_opt.step()
    return {"loss": float(loss), "anatomy": float(anatomy), "supervised": float(supervised)}


def _with_manual_labels(indices, probs, images, rt) -> torch.Tensor:
    """Probabilities (B, 3, X, Y, Z) with rows of labeled images replaced by their one-hot labels."""
    rows = []
    for row, index in enumerate(indices):
        if index < images.n_labeled:
            rows.append(one_hot(images.labels([index], rt.device))[0])
        else:
            rows.append(probs[row])
    return torch.stack(rows)


def _segmentations(indices, volume, images, seg_net, rt) -> torch.Tensor:
    """S for each image: one-hot manual label where present, else the frozen F_S's softmax."""
    with torch.no_grad(), autocast(rt.device):
        seg_net.eval()
        probs = torch.softmax(seg_net(volume).float(), dim=1)
    return _with_manual_labels(indices, probs, images, rt)


# ----------------------------------------------------------------------------------------------
# Validation and checkpoints


@torch.no_grad()
def validate(
    seg_net: SegmentationNet,
    reg_net: RegistrationNet | None,
    val_images: _Images,
    train_images: _Images,
    warper: Warper,
    runtime: Runtime,
) -> dict[str, Any]:
    """Score the held-out labeled cases: per-class segmentation Dice (wall, tumor), and for the
    registration net, registration Dice and folding fraction of each validation case registered
    to a labeled training case. Classes absent from both prediction and truth are skipped.
    """
    seg_net.eval()
    wall, tumor, reg_dice, folding = [], [], [], []
    for index in range(len(val_images.items)):
        image = val_images.images([index], runtime.device)
        truth = val_images.labels([index], runtime.device)[0, 0]
        predicted = predict_classes(seg_net, image)  # (X, Y, Z)
        scores = dice_per_class(predicted, truth)
        wall.append(scores[1])
        tumor.append(scores[2])
        if reg_net is not None:
            reg_net.eval()
            partner = index % train_images.n_labeled
            target = train_images.images([partner], runtime.device)
            field = reg_net(image, target).float()
            warped = warper(one_hot(truth[None, None]), field).argmax(dim=1)[0]
            target_truth = train_images.labels([partner], runtime.device)[0, 0]
            reg_dice.append(_nanmean(list(dice_per_class(warped, target_truth)[1:])))
            folding.append(folding_fraction(field))
    result = {
        "dice_wall": _nanmean(wall),
        "dice_tumor": _nanmean(tumor),
    }
    result["dice_mean"] = _nanmean([result["dice_wall"], result["dice_tumor"]])
    if result["dice_mean"] is None:
        result["dice_mean"] = 0.0
    if reg_net is not None:
        result["registration_dice"] = _nanmean(reg_dice)
        result["folding"] = float(np.mean(folding))
    return result


def _nanmean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _save_weights(path: Path, seg_net, reg_net, metadata: dict[str, Any]) -> None:
    tensors = {f"seg_net.{k}": v for k, v in portable_state_dict(unwrap(seg_net)).items()}
    if reg_net is not None:
        reg = portable_state_dict(unwrap(reg_net))
        tensors |= {f"reg_net.{k}": v for k, v in reg.items()}
    ckpt.save_weights(path, tensors, metadata)
