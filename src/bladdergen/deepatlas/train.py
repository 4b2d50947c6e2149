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
from bladdergen.deepatlas.align import (
    compose,
    filled_bladder,
    filled_bladder_from_probs,
    prealignment,
)
from bladdergen.deepatlas.augment import AugmentRanges, augment_labeled, with_target_context
from bladdergen.deepatlas.config import DeepAtlasConfig
from bladdergen.deepatlas.fields import Warper, folding_fraction
from bladdergen.deepatlas.handoff import HANDOFF_NAME, handoff_identity, read_handoff, write_handoff
from bladdergen.deepatlas.losses import (
    TUMOR,
    DeepAtlasLosses,
    anatomy_channels,
    disable_tf32,
    one_hot,
    without_tumor,
)
from bladdergen.deepatlas.networks import RegistrationNet, SegmentationNet, portable_state_dict
from bladdergen.deepatlas.pairs import (
    REG,
    REG_PRETRAIN,
    SEG,
    SEG_PRETRAIN,
    SUPERVISED,
    labeled_batch,
    phase_of,
    registration_pairs,
    segmentation_pairs,
    segmentation_updates,
    step_rng,
    tumor_or,
)
from bladdergen.deepatlas.pools import PoolImage, VolumeCache, pool_from_folder, split_labeled
from bladdergen.deepatlas.segment import dice_per_class, predict_classes
from bladdergen.engine.run import RunFolder, RunKind, unwrap
from bladdergen.errors import ConfigError, InputError
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
RUN_KIND = RunKind(KIND, RESUMABLE_KEYS, entries={"split.json", PREPARED_DIR, HANDOFF_NAME})


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

    def loss_labels(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """:meth:`labels` as the supervised loss takes them: with ``ignore_synthetic_tumor``, a
        synthetic pair's tumor voxels are :data:`IGNORED`."""
        return self.mark_ignored(indices, self.labels(indices, device))

    def mark_ignored(self, indices: list[int], classes: torch.Tensor) -> torch.Tensor:
        """``classes`` (B, 1, X, Y, Z) of the images ``indices`` (e.g. warped), with a synthetic
        pair's tumor :data:`IGNORED` under ``ignore_synthetic_tumor``; changed in place."""
        if self.ignore_synthetic_tumor:
            for row, i in enumerate(indices):
                if self.items[i].source == "synthetic":
                    classes[row] = without_tumor(classes[row])
        return classes

    synthetic_weight = 1.0
    ignore_synthetic_tumor = False

    def weights(self, indices: list[int]) -> np.ndarray | None:
        """Draw weights of labeled ``indices``: real cases weigh 1, synthetic pairs
        ``synthetic_weight``; None when they are all equal (a uniform draw, whose random numbers
        are those of runs without synthetic pairs)."""
        weights = np.array(
            [self.synthetic_weight if self.items[i].source == "synthetic" else 1.0 for i in indices]
        )
        return None if weights.min() == weights.max() else weights

    def draw(self, rng: np.random.Generator, count: int) -> list[int]:
        """``count`` labeled indices with replacement, in proportion to :meth:`weights`."""
        weights = self.weights(list(range(self.n_labeled)))
        if weights is None:
            return labeled_batch(rng, self.n_labeled, count)
        return [int(i) for i in rng.choice(self.n_labeled, size=count, p=weights / weights.sum())]

    def tumor_cases(self) -> list[int]:
        """Indices of the labeled images whose label holds tumor voxels the loss learns from."""
        return [
            i
            for i in range(self.n_labeled)
            if not (self.ignore_synthetic_tumor and self.items[i].source == "synthetic")
            and (self.cache.get(self.items[i].label_path, np.uint8) == TUMOR).any()
        ]

    def with_unlabeled(self, keep: list[str]) -> _Images:
        """The same labeled images with only the unlabeled ones whose case id is in ``keep``."""
        kept = [p for p in self.items[self.n_labeled :] if p.case_id in keep]
        subset = _Images(self.items[: self.n_labeled], kept, self.cache.capacity)
        subset.cache = self.cache
        subset.synthetic_weight = self.synthetic_weight
        subset.ignore_synthetic_tumor = self.ignore_synthetic_tumor
        return subset


def _check_shapes(items: list[PoolImage], shape: tuple[int, ...], multiple: tuple[int, ...]):
    from bladdergen.data.volumes import open_nifti  # the header only, checked, no voxels read

    for item in items:
        found = tuple(int(n) for n in open_nifti(item.image_path).shape[:3])
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
    from_baseline: Path | None = None,
    resume: bool = False,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Train DeepAtlas (or the supervised-only baseline) and write the run folder.

    ``data_dir``: a preprocessed set; its labeled cases are split into training and validation
    (``cfg.val_cases``), its unlabeled cases join the unlabeled pool. ``unlabeled_dirs`` and
    ``synthetic_dir``: more unlabeled images (preprocessed sets or raw HU volumes, prepared with
    DATA_DIR's recorded preprocess settings). ``from_baseline``: the run folder of the
    supervised-only baseline of the same data, seed and settings, whose state after
    ``seg_pretrain_steps`` updates replaces DeepAtlas's supervised pre-training (identical by
    design; see :mod:`bladdergen.deepatlas.handoff`). Returns the run summary with the
    schedule's update counts, pool sizes and the best validation Dice.

    Raises InputError for unusable data or run folders, CheckpointError when ``resume`` does not
    match the run, TrainingDiverged when a loss becomes non-finite.
    """
    mode = MODE_SUPERVISED if supervised_only else MODE_DEEPATLAS
    check_budget(cfg, supervised_only)
    if from_baseline is not None:
        if supervised_only:
            raise InputError(
                "--from-baseline starts DeepAtlas from a baseline; drop --supervised-only"
            )
        obstacle = schedule_fits_baseline(cfg)
        if obstacle is not None:
            raise InputError(f"--from-baseline: {obstacle}")
    runtime = start_runtime(cfg.device)
    disable_tf32()

    # ---- data
    dataset = PreprocessedSet.open(data_dir)
    preprocess = dataset.preprocess_config()
    train_ids, val_ids = split_labeled(dataset, cfg.val_cases, seed)
    labeled = [_pool_image(dataset.case(c), "labeled") for c in train_ids]
    validation = [_pool_image(dataset.case(c), "validation") for c in val_ids]
    unlabeled: list[PoolImage] = []
    if supervised_only and unlabeled_dirs:
        reporter.notice("--supervised-only: the unlabeled pools are not used")
    if not supervised_only:
        unlabeled = [
            PoolImage(f"unlabeled:{c.case_id}", "unlabeled", c.image_path)
            for c in dataset.unlabeled_cases
        ]
    pools_wanted = [] if supervised_only else [(d, "unlabeled") for d in unlabeled_dirs or []]
    pools_wanted += [(synthetic_dir, "synthetic")] if synthetic_dir is not None else []
    pools = {
        "labeled": [p.case_id for p in labeled],
        "validation": [p.case_id for p in validation],
        "unlabeled": [p.case_id for p in unlabeled],
        "folders": [[str(Path(d).resolve()), s] for d, s in pools_wanted],
        "synthetic_pairs": cfg.synthetic_pairs,
    }
    facts = {"mode": mode, "pools": pools}
    if from_baseline is not None:
        facts["from_baseline"] = str(Path(from_baseline).resolve())
    run = RunFolder.open(
        run_dir, RUN_KIND, cfg, runtime, seed=seed, resume=resume, reporter=reporter, facts=facts
    )
    with main_process_first(runtime):
        synthetic_pairs, images_only = _folder_pools(pools_wanted, run, preprocess, cfg)
    if synthetic_pairs:
        weight, n_real = cfg.synthetic_pair_weight, len(labeled)
        share = len(synthetic_pairs) * weight / (len(synthetic_pairs) * weight + n_real)
        run.reporter.notice(
            f"{len(synthetic_pairs)} synthetic CT + label pairs join the {n_real} labeled cases, "
            f"each drawn with weight {weight:g} against a real case: {share:.0%} of the "
            f"supervised draws (their tumors: {cfg.synthetic_pair_tumor})"
        )
    labeled += synthetic_pairs  # synthetic CT + label pairs are labeled data
    identity = handoff_identity(seed, to_mapping(cfg), data_dir, _ids(labeled), val_ids)
    handoff = None  # a resumed run past the hand-off no longer needs the baseline's folder
    if from_baseline is not None and run.step <= cfg.reg_pretrain_steps:
        handoff = read_handoff(Path(from_baseline), identity)
    unlabeled += [] if supervised_only else images_only
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
    losses = DeepAtlasLosses(cfg.lncc_kernel, cfg.lncc_scales, cfg.class_weights)
    losses = losses.to(runtime.device)
    warper = Warper().to(runtime.device)
    stateful = {"seg_net": seg_net, "reg_net": reg_net, "seg_opt": seg_opt, "reg_opt": reg_opt}
    run.restore(**stateful)
    best_score = run.state["best_score"] if run.state else -math.inf
    best_step = run.state["best_step"] if run.state else None
    # the smoothed validation score the best checkpoint is chosen on (None: no validation yet)
    val_ema = run.state.get("val_ema") if run.state else None
    # the anatomy gate, and the unlabeled ids left after the synthetic filter (None: not yet run)
    gate_open = run.state["gate_open"] if run.state else False
    kept_unlabeled = run.state["kept_unlabeled"] if run.state else None
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
    images.synthetic_weight = cfg.synthetic_pair_weight
    images.ignore_synthetic_tumor = cfg.synthetic_pair_tumor == "ignore"
    if kept_unlabeled is not None:
        images = images.with_unlabeled(kept_unlabeled)
    val_images = _Images(validation, [], cfg.cache_volumes)
    total = segmentation_updates(cfg, cfg.max_steps) if supervised_only else cfg.max_steps
    last_val: dict[str, Any] = {}
    description = f"train-deepatlas ({mode})"
    for step in run.steps(total, log_every=cfg.log_every, description=description, show=("loss",)):
        phase = SUPERVISED if supervised_only else phase_of(step, cfg)
        handed_off = handoff is not None and step == cfg.reg_pretrain_steps
        if handed_off:  # the baseline's pre-training is this run's: take it, skip its updates
            best_score, best_step, val_ema = _take_handoff(
                handoff, run, seg_net, seg_opt, reg_net, metadata
            )
            done = run.skip_to(step + cfg.seg_pretrain_steps)
        else:
            # Supervised pre-training draws the baseline's batches (keyed by the segmentation
            # update, not the global step), so both arms leave pre-training with the same F_S
            # and differ only by what the alternating phase adds: a paired comparison.
            draw = step - cfg.reg_pretrain_steps if phase == SEG_PRETRAIN else step
            rng = step_rng(seed, draw, runtime.rank)
            # with seg_supervised_draw "baseline" the alternating phase's supervised batch is
            # the baseline's batch of the same segmentation update, drawn the same way
            baseline_rng = step_rng(seed, segmentation_updates(cfg, step), runtime.rank)
            if kept_unlabeled is None and phase in (REG, SEG):  # pre-training just ended
                kept_unlabeled, record = filter_synthetic(images, seg_net, cfg, spacing, runtime)
                images = images.with_unlabeled(kept_unlabeled)
                # logged as part of this step (1-based), so a resume from the checkpoint before
                # it truncates it and logs it once again, never twice
                run.log(step + 1, record)
            if phase in (REG_PRETRAIN, REG):
                terms = _registration_step(
                    phase, rng, images, seg_ddp, reg_ddp, reg_opt, losses, warper, cfg, runtime
                )
            else:
                terms = _segmentation_step(
                    phase,
                    rng,
                    images,
                    seg_ddp,
                    reg_ddp,
                    seg_opt,
                    losses,
                    warper,
                    cfg,
                    runtime,
                    anatomy_on=gate_open,
                    baseline_rng=baseline_rng,
                )
            done = run.end_step(step, terms, phase=phase)
        if supervised_only and done == cfg.seg_pretrain_steps and runtime.is_main:
            # before this update's validation: DeepAtlas validates (and scores registration) here
            state = {"seg_net": seg_net, "seg_opt": seg_opt, "identity": identity}
            scores = {"best_score": best_score, "best_step": best_step, "val_ema": val_ema}
            write_handoff(run.path, step=done, **scores, **state)
        # scoring only starts once F_S has been trained: an untrained net that paints "wall"
        # over a region can out-score one that predicts nothing and would be kept as "best"
        seg_trained = supervised_only or done > cfg.reg_pretrain_steps
        if runtime.is_main and val_images.items and seg_trained and run.due(done, cfg.val_every):
            last_val = validate(seg_net, reg_net, val_images, images, warper, runtime, cfg.prealign)
            if reg_net is not None:
                # re-decided at every validation: a registration that stops beating the identity
                # (it can, while F_S and F_R train each other) switches the anatomy term off again
                gate_open = registration_beats_identity(last_val, cfg)
                last_val["anatomy_gate"] = gate_open
            val_ema = smoothed_score(val_ema, last_val["dice_mean"], cfg.val_smoothing)
            last_val["dice_mean_smoothed"] = val_ema
            improved = val_ema > best_score
            if improved:
                best_score, best_step = val_ema, done
                write_weights(run.path / ckpt.BEST_WEIGHTS_NAME, validation=last_val)
            run.log_validation(done, {**last_val, "best": improved})
        if runtime.distributed and reg_net is not None and run.due(done, cfg.val_every):
            gate_open = _from_main_rank(gate_open, runtime)  # rank 0 validated
        if run.due(done, cfg.checkpoint_every) or handed_off:
            scores = {"best_score": best_score, "best_step": best_step, "gate_open": gate_open}
            scores |= {"kept_unlabeled": kept_unlabeled, "val_ema": val_ema}
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
        synthetic_pairs=len(synthetic_pairs),
        synthetic_images_kept=sum(p.source == "synthetic" for p in images.items),
        anatomy_gate_open=gate_open,
        from_baseline=facts.get("from_baseline"),
        best_step=best_step,
        best_dice_mean_smoothed=None if best_step is None else best_score,
        last_validation=last_val,
    )


def _folder_pools(
    folders: list[tuple[Path, str]], run: RunFolder, preprocess, cfg: DeepAtlasConfig
) -> tuple[list[PoolImage], list[PoolImage]]:
    """The ``--unlabeled`` / ``--synthetic`` folders prepared into ``RUN/prepared``: (synthetic
    CT + label pairs, images without a label)."""
    pairs, images = [], []
    for folder, source in folders:
        paired = cfg.synthetic_pairs and source == "synthetic"
        pool = pool_from_folder(
            folder, source, run.path / PREPARED_DIR, preprocess, run.reporter, paired
        )
        pairs += [p for p in pool if p.label_path is not None]
        images += [p for p in pool if p.label_path is None]
    return pairs, images


def _pool_image(case: CaseRecord, source: str) -> PoolImage:
    return PoolImage(case.case_id, source, case.image_path, case.label_path)


def _ids(images: list[PoolImage]) -> list[str]:
    return [p.case_id for p in images]


# ----------------------------------------------------------------------------------------------
# One step of each kind


def check_budget(cfg: DeepAtlasConfig, supervised_only: bool) -> None:
    """ConfigError (exit 2) when ``max_steps`` ends inside pre-training: the run would stop with a
    segmentation net that never saw its pre-training budget, or a registration net never trained.
    The message says what would fit."""
    pretrain = cfg.reg_pretrain_steps + cfg.seg_pretrain_steps
    if supervised_only or cfg.max_steps >= pretrain:
        return
    updates = segmentation_updates(cfg, cfg.max_steps)
    raise ConfigError(
        f"deepatlas.max_steps (--max-steps): got {cfg.max_steps}, shorter than pre-training "
        f"(reg_pretrain_steps {cfg.reg_pretrain_steps} + seg_pretrain_steps "
        f"{cfg.seg_pretrain_steps} = {pretrain}); the segmentation net would get {updates} of its "
        f"{cfg.seg_pretrain_steps} pre-training updates. Give --max-steps >= {pretrain} "
        f"({pretrain + cfg.reg_steps_per_cycle + cfg.seg_steps_per_cycle} for one alternating "
        "cycle), or lower deepatlas.reg_pretrain_steps / seg_pretrain_steps"
    )


def schedule_fits_baseline(cfg: DeepAtlasConfig) -> str | None:
    """Why this schedule cannot start from the baseline's hand-off, or None when it can: the
    baseline validated at updates k*val_every, DeepAtlas's pre-training would have validated at
    reg_pretrain_steps + k*val_every and kept its best among those."""
    if cfg.seg_pretrain_steps >= 1 and cfg.reg_pretrain_steps % cfg.val_every == 0:
        return None
    return (
        f"deepatlas.reg_pretrain_steps ({cfg.reg_pretrain_steps}) must be a multiple of "
        f"val_every ({cfg.val_every}) and seg_pretrain_steps ({cfg.seg_pretrain_steps}) at least "
        "1, so the baseline validated where this run's pre-training would have"
    )


def smoothed_score(previous: float | None, score: float, smoothing: float) -> float:
    """The exponential moving average of the validation score that picks the best checkpoint:
    ``smoothing``·previous + (1 − ``smoothing``)·score, the first score itself."""
    return score if previous is None else smoothing * previous + (1.0 - smoothing) * score


def _take_handoff(handoff, run, seg_net, seg_opt, reg_net, metadata):
    """Load the baseline's F_S and optimiser state into this run at the end of registration
    pre-training; copy its log records and best weights (with this run's F_R) at this run's
    step numbers. Returns the best (smoothed) validation score, its step and the running
    smoothed score."""
    shift = run.step  # = reg_pretrain_steps
    unwrap(seg_net).load_state_dict(handoff["seg_net"])
    seg_opt.load_state_dict(handoff["seg_opt"])
    for record in handoff["records"]:
        copied = {k: v for k, v in record.items() if k not in ("step", "seconds")}
        if copied.get("phase") == SUPERVISED:
            copied["phase"] = SEG_PRETRAIN
        run.log(record["step"] + shift, {**copied, "from_baseline": True})
    val_ema = handoff.get("val_ema")
    if handoff["best_step"] is None:
        return handoff["best_score"], None, val_ema
    best_step = handoff["best_step"] + shift
    if run.runtime.is_main:
        reg = portable_state_dict(unwrap(reg_net))
        tensors = dict(handoff["best"]["tensors"]) | {f"reg_net.{k}": v for k, v in reg.items()}
        extra = {"step": best_step, "validation": handoff["best"]["validation"]}
        ckpt.save_weights(run.path / ckpt.BEST_WEIGHTS_NAME, tensors, {**metadata, **extra})
    return handoff["best_score"], best_step, val_ema


def registration_beats_identity(validation: dict[str, Any], cfg: DeepAtlasConfig) -> bool:
    """The anatomy gate: on the validation pairs the warped labels overlap the target's better
    than the unmoved labels by ``cfg.anatomy_gate_margin``, for the wall **and** for the filled
    bladder. The wall alone is not enough: thin walls of two patients barely overlap unmoved
    (identity ~0.06), so a field that shifts the shells a little clears the margin on the wall
    while the bladders it aligns overlap no better than unmoved (measured on phantoms:
    wall 0.13 vs 0.07, filled bladder 0.19-0.25 vs 0.23), and the anatomy term then taught
    F_S misplaced walls.

    With ``cfg.anatomy_gate_segmenter`` the warped labels must also overlap the truth at least as
    well as F_S's own prediction does (``dice_wall``, ``dice_bladder``): the anatomy term makes
    warped labels F_S's targets on unlabeled images, and targets less accurate than F_S's own
    output can only pull it down."""
    for key, own in (
        ("registration_dice", "dice_wall"),
        ("registration_dice_bladder", "dice_bladder"),
    ):
        registered = validation.get(key)
        identity = validation.get(key.replace("registration", "identity"))
        if registered is None or identity is None:
            return False
        if registered < identity + cfg.anatomy_gate_margin:
            return False
        own_dice = validation.get(own)  # no score of F_S's own: nothing shows the labels better
        if cfg.anatomy_gate_segmenter and (own_dice is None or registered < own_dice):
            return False
    return True


def filter_synthetic(
    images: _Images, seg_net: SegmentationNet, cfg: DeepAtlasConfig, spacing, rt: Runtime
) -> tuple[list[str], dict[str, Any]]:
    """Case ids of the unlabeled images that stay in the pool after pre-training, and a log record.

    Real unlabeled scans always stay. With ``cfg.synthetic_filter`` a synthetic volume stays only
    when F_S's segmentation of it passes :func:`passes_synthetic_filter`.
    """
    unlabeled = images.items[images.n_labeled :]
    synthetic = [i for i, p in enumerate(unlabeled, images.n_labeled) if p.source == "synthetic"]
    keep = [p.case_id for p in unlabeled if p.source != "synthetic"]
    record = {"phase": "synthetic_filter", "synthetic": len(synthetic), "kept": len(synthetic)}
    if not cfg.synthetic_filter:
        return keep + [images.items[i].case_id for i in synthetic], record
    labels = [images.labels([i], rt.device)[0, 0].cpu().numpy() for i in range(images.n_labeled)]
    ranges = synthetic_filter_ranges(labels, spacing)
    kept = 0
    for index in synthetic:
        classes = predict_classes(seg_net, images.images([index], rt.device)).cpu().numpy()
        if passes_synthetic_filter(classes, spacing, ranges):
            keep.append(images.items[index].case_id)
            kept += 1
    record["kept"] = kept
    return keep, record


def synthetic_filter_ranges(labels: list[np.ndarray], spacing) -> dict[str, list[float]]:
    """The wall thickness and bladder volume ranges the synthetic filter judges against: those of
    the labeled training cases' manual class maps (X, Y, Z), [min, max] widened by 25 %, without
    the prediction interval that ``sample`` and ``evaluate gen`` add (the filter was measured
    better than none with this rule; at 2 labeled cases the interval would leave little of the
    size checks)."""
    from bladdergen.evaluate.anatomy import measure_anatomy, real_ranges

    return real_ranges([measure_anatomy(c, spacing) for c in labels], margin=0.25, coverage=None)


def passes_synthetic_filter(classes: np.ndarray, spacing, ranges: dict[str, list[float]]) -> bool:
    """Whether F_S's class map (X, Y, Z) of a synthetic volume lets it into DeepAtlas's pool: the
    anatomy plausibility check (:func:`bladdergen.evaluate.anatomy.plausibility`) against
    :func:`synthetic_filter_ranges`, the tumor judged as a whole, not per piece. Per piece, F_S's
    own stray tumor specks decide: they fail it on real scans too, and the paper's arm lost
    tumor Dice with it (−0.048 [−0.084, −0.008], 2 labeled phantoms, six seeds;
    docs/benchmarks.md, "The synthetic filter under the per-piece check")."""
    from bladdergen.evaluate.anatomy import measure_anatomy, plausibility

    checks = plausibility(measure_anatomy(classes, spacing), ranges, tumor_per_piece=False)
    return bool(checks["plausible"])


def _pair_field(reg_net, warper, moving, target, mask_m, mask_t, prealign: bool, rt):
    """Field (B, 3, X, Y, Z) voxels of moving -> target: the net's residual after the moments
    pre-alignment of the filled-bladder masks (B, X, Y, Z) when ``prealign``, else the net alone.
    Runs with or without gradients as the caller's context says."""
    if not prealign:
        with autocast(rt.device):
            return reg_net(moving, target).float()
    shift, scale = prealignment(mask_m, mask_t)
    with autocast(rt.device):
        residual = reg_net(warper(moving, shift), target).float()
    return compose(shift, scale, residual)


def _registration_step(phase, rng, images, seg_net, reg_net, reg_opt, losses, warper, cfg, rt):
    """Registration update, segmentation frozen: similarity + λ_r·bending (+ λ_a·anatomy).

    In pre-training F_S is untrained, so only manual labels pre-align (an unlabeled image gets no
    pre-alignment); afterwards F_S's prediction stands in for a missing label.
    """
    pairs = registration_pairs(rng, len(images.items), cfg.batch_size)
    moving_idx, target_idx = [p[0] for p in pairs], [p[1] for p in pairs]
    moving = images.images(moving_idx, rt.device)
    target = images.images(target_idx, rt.device)
    net = None if phase == REG_PRETRAIN else unwrap(seg_net)
    seg_m = _segmentations(moving_idx, moving, images, net, rt)
    seg_t = _segmentations(target_idx, target, images, net, rt)
    reg_net.train()
    field = _pair_field(
        reg_net,
        warper,
        moving,
        target,
        filled_bladder_from_probs(seg_m),
        filled_bladder_from_probs(seg_t),
        cfg.prealign,
        rt,
    )
    similarity = losses.similarity(warper(moving, field), target)
    regularity = losses.regularity(field)
    loss = similarity + cfg.reg_weight * regularity
    terms = {"similarity": float(similarity.detach()), "regularity": float(regularity.detach())}
    if phase == REG and cfg.anatomy_weight > 0:
        filled = cfg.anatomy_filled_bladder
        warped = warper(anatomy_channels(seg_m, filled), field)
        anatomy = losses.anatomy(warped, anatomy_channels(seg_t, filled))
        loss = loss + cfg.anatomy_weight * anatomy
        terms["anatomy"] = float(anatomy.detach())
    reg_opt.zero_grad(set_to_none=True)
    loss.backward()
    reg_opt.step()
    return {"loss": float(loss.detach()), **terms, "folding": folding_fraction(field)}


def _supervised_draw(rng, images, cfg) -> list[int]:
    """Labeled indices of a supervised batch: with probability ``tumor_case_fraction`` each draw
    picks a tumor-bearing case (when there is one), else any labeled case. Both draws weigh a
    synthetic pair ``synthetic_pair_weight`` against a real case: were the tumor draw uniform,
    the tiny bench's pairs (69 of 70 carry a tumor) would take ~98 % of it from the 1-2 real
    tumor cases of 4 labeled ones, whatever the weight."""
    tumors = images.tumor_cases() if cfg.tumor_case_fraction > 0 else []
    indices = images.draw(rng, cfg.batch_size)
    if not tumors:
        return indices
    weights = images.weights(tumors)
    return [tumor_or(rng, i, tumors, cfg.tumor_case_fraction, weights) for i in indices]


def _supervised_batch(rng, images, cfg, rt) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline's batch of one segmentation update: drawn labeled images and their loss
    labels, augmented with ``seg_augment``, all from ``rng``."""
    indices = _supervised_draw(rng, images, cfg)
    volume, classes = images.images(indices, rt.device), images.loss_labels(indices, rt.device)
    if cfg.seg_augment:
        volume, classes = augment_labeled(volume, classes, rng, augment_ranges(cfg))
    return volume, classes


def _segmentation_step(
    phase,
    rng,
    images,
    seg_net,
    reg_net,
    seg_opt,
    losses,
    warper,
    cfg,
    rt,
    anatomy_on=True,
    baseline_rng=None,
):
    """Segmentation update, registration frozen.

    Pre-training and the baseline: Dice + CE on a batch of labeled images (augmented with
    ``seg_augment``). Alternating phase:
    λ_a·Dice(S_m∘φ, S_t) (only once the anatomy gate is open, ``anatomy_on``) + λ_sp·(Dice + CE on
    the supervised images) + ``reg_augment_weight``·λ_sp·(Dice + CE on each labeled moving image
    warped onto its target with its warped label: registration as augmentation, in the target's
    surroundings with ``reg_augment_context``, moved once more by a random transform with
    ``augment_warped``); pairs with at least one labeled image only. The
    supervised images are the labeled images of the pairs (``seg_supervised_draw`` "pairs"), or
    the baseline's batch of this segmentation update, drawn from ``baseline_rng`` ("baseline"),
    with every pair's labeled image as its moving image. Both augmented with ``seg_augment``. A
    synthetic pair's tumor voxels are left out of every supervised term under
    ``synthetic_pair_tumor`` "ignore".
    """
    seg_net.train()
    if phase != SEG:
        volume, classes = _supervised_batch(rng, images, cfg, rt)
        with autocast(rt.device):
            logits = seg_net(volume)
        loss = losses.supervised(logits, classes)
        seg_opt.zero_grad(set_to_none=True)
        loss.backward()
        seg_opt.step()
        return {"loss": float(loss.detach()), "supervised": float(loss.detach())}

    from_baseline = cfg.seg_supervised_draw == "baseline"
    n_unlabeled = len(images.items) - images.n_labeled
    tumors = images.tumor_cases() if cfg.pair_tumor_sampling else None
    pairs = segmentation_pairs(
        rng, images.n_labeled, n_unlabeled, cfg.batch_size, tumors, cfg.tumor_case_fraction
    )
    if from_baseline:
        # the labeled image moves, so every pair yields a registration-augmented pair
        pairs = [(m, t) if m < images.n_labeled else (t, m) for m, t in pairs]
    moving_idx, target_idx = [p[0] for p in pairs], [p[1] for p in pairs]
    moving = images.images(moving_idx, rt.device)
    target = images.images(target_idx, rt.device)
    batch = len(pairs)
    with torch.no_grad():
        frozen_m = _segmentations(moving_idx, moving, images, unwrap(seg_net), rt)
        frozen_t = _segmentations(target_idx, target, images, unwrap(seg_net), rt)
        target_bladder = filled_bladder_from_probs(frozen_t)  # pre-alignment and context
        seg_net.train()
        field = _pair_field(
            unwrap(reg_net).eval(),
            warper,
            moving,
            target,
            filled_bladder_from_probs(frozen_m),
            target_bladder,
            cfg.prealign,
            rt,
        )
    anatomy = anatomy_on and cfg.anatomy_weight > 0
    augment_rows = [row for row, i in enumerate(moving_idx) if i < images.n_labeled]
    augment = cfg.reg_augment_weight > 0 and bool(augment_rows)
    # the images of the step's one forward (DDP allows one forward per backward), in row order:
    # supervised images, the pair (for the anatomy term), registration-augmented images
    inputs: list[torch.Tensor] = []
    pair_images = torch.cat([moving, target])
    if from_baseline:
        supervised_volume, supervised_truth = _supervised_batch(baseline_rng, images, cfg, rt)
        inputs.append(supervised_volume)
        supervised_rows = list(range(len(supervised_volume)))
        pair_start = len(supervised_volume)
        if anatomy:
            inputs.append(pair_images)
    else:
        all_idx = moving_idx + target_idx
        supervised_rows = [row for row, i in enumerate(all_idx) if i < images.n_labeled]
        supervised_truth = images.loss_labels([all_idx[r] for r in supervised_rows], rt.device)
        if cfg.seg_augment and supervised_rows:
            # the supervised term sees its labeled images augmented, as the baseline's draws are;
            # the anatomy term replaces labeled rows by their manual labels, so it is unaffected,
            # and the field and registration augmentation use the images as they are
            rows = torch.tensor(supervised_rows, device=rt.device)
            moved, supervised_truth = augment_labeled(
                pair_images[rows], supervised_truth, rng, augment_ranges(cfg)
            )
            pair_images = pair_images.index_copy(0, rows, moved)
        inputs.append(pair_images)
        pair_start = 0
    augment_start = sum(len(x) for x in inputs)
    if augment:
        with torch.no_grad():
            rows = torch.tensor(augment_rows, device=rt.device)
            augment_idx = [moving_idx[r] for r in augment_rows]
            warped_hot = warper(one_hot(images.labels(augment_idx, rt.device)), field[rows])
            warped_image = warper(moving[rows], field[rows])
            if cfg.reg_augment_context:
                warped_image = with_target_context(
                    warped_image,
                    filled_bladder_from_probs(warped_hot),
                    target[rows],
                    target_bladder[rows],
                )
            inputs.append(warped_image)
            augment_labels = warped_hot.argmax(dim=1, keepdim=True)
            augment_labels = images.mark_ignored(augment_idx, augment_labels)
            if cfg.reg_augment_tumor == "ignore":
                augment_labels = without_tumor(augment_labels)
            if cfg.seg_augment and cfg.augment_warped:
                inputs[-1], augment_labels = augment_labeled(
                    inputs[-1], augment_labels, rng, augment_ranges(cfg)
                )
    with autocast(rt.device):
        logits = seg_net(torch.cat(inputs)).float()
    supervised = losses.supervised(logits[supervised_rows], supervised_truth)
    loss = cfg.supervised_weight * supervised
    terms = {"supervised": float(supervised.detach()), "anatomy_on": bool(anatomy_on)}
    if anatomy:
        probs = torch.softmax(logits[pair_start : pair_start + 2 * batch], dim=1)
        filled = cfg.anatomy_filled_bladder
        seg_m = _with_manual_labels(moving_idx, probs[:batch], images, rt)
        seg_t = _with_manual_labels(target_idx, probs[batch:], images, rt)
        warped = warper(anatomy_channels(seg_m, filled), field)
        anatomy_loss = losses.anatomy(warped, anatomy_channels(seg_t, filled))
        loss = loss + cfg.anatomy_weight * anatomy_loss
        terms["anatomy"] = float(anatomy_loss.detach())
    if augment:
        augmented = losses.supervised(logits[augment_start:], augment_labels)
        loss = loss + cfg.reg_augment_weight * cfg.supervised_weight * augmented
        terms["augmented"] = float(augmented.detach())
    seg_opt.zero_grad(set_to_none=True)
    loss.backward()
    seg_opt.step()
    return {"loss": float(loss.detach()), **terms}


def augment_ranges(cfg: DeepAtlasConfig) -> AugmentRanges:
    return AugmentRanges(
        rotation_deg=cfg.augment_rotation_deg,
        scale=cfg.augment_scale,
        shift=cfg.augment_shift,
        intensity=cfg.augment_intensity,
    )


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
    """S for each image: one-hot manual label where present, else the frozen F_S's softmax
    (all background when ``seg_net`` is None: no prediction to stand in)."""
    probs = torch.zeros((volume.shape[0], 3, *volume.shape[2:]), device=volume.device)
    probs[:, 0] = 1.0
    # F_S runs on the unlabeled images only: a labeled image's prediction would be replaced by
    # its manual label anyway (most pairs hold one, so this saves a forward pass per step)
    unlabeled = [row for row, index in enumerate(indices) if index >= images.n_labeled]
    if seg_net is not None and unlabeled:
        rows = torch.tensor(unlabeled, device=volume.device)
        with torch.no_grad(), autocast(rt.device):
            seg_net.eval()
            probs[rows] = torch.softmax(seg_net(volume[rows]).float(), dim=1)
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
    prealign: bool = True,
) -> dict[str, Any]:
    """Score the held-out labeled cases.

    Segmentation: per-class Dice (wall, tumor; a class absent from both prediction and truth is
    skipped) and their mean. Registration (each validation case registered to a labeled training
    case, pre-aligned by F_S's prediction for the validation case, never by its label): the
    warped-label wall Dice ``registration_dice`` beside ``identity_dice`` (labels not moved),
    the same two over the filled bladder, and the folding fraction.
    """
    seg_net.eval()
    wall, tumor, reg_dice, identity, reg_bladder, identity_bladder, folding = ([] for _ in range(7))
    seg_bladder = []
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
            target_truth = train_images.labels([partner], runtime.device)[0, 0]
            mask_m = torch.from_numpy(filled_bladder(predicted.cpu().numpy()))[None]
            mask_t = torch.from_numpy(filled_bladder(target_truth.cpu().numpy()))[None]
            truth_bladder = filled_bladder(truth.cpu().numpy())
            seg_bladder.append(_mask_dice(mask_m[0].numpy(), truth_bladder))
            mask_m, mask_t = mask_m.to(runtime.device), mask_t.to(runtime.device)
            field = _pair_field(reg_net, warper, image, target, mask_m, mask_t, prealign, runtime)
            warped = warper(one_hot(truth[None, None]), field).argmax(dim=1)[0]
            reg_dice.append(dice_per_class(warped, target_truth)[1])
            identity.append(dice_per_class(truth, target_truth)[1])
            reg_bladder.append(
                _mask_dice(filled_bladder(warped.cpu().numpy()), mask_t[0].cpu().numpy())
            )
            identity_bladder.append(_mask_dice(truth_bladder, mask_t[0].cpu().numpy()))
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
        result["identity_dice"] = _nanmean(identity)
        result["registration_dice_bladder"] = _nanmean(reg_bladder)
        result["identity_dice_bladder"] = _nanmean(identity_bladder)
        result["dice_bladder"] = _nanmean(seg_bladder)  # F_S's own, beside registration's
        result["folding"] = float(np.mean(folding))
    return result


def _mask_dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else float("nan")


def _from_main_rank(flag: bool, rt: Runtime) -> bool:
    """Rank 0's value of ``flag`` on every rank (DDP)."""
    import torch.distributed as dist

    shared = torch.tensor([float(flag)], device=rt.device)
    dist.broadcast(shared, src=0)
    return bool(shared.item())


def _nanmean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _save_weights(path: Path, seg_net, reg_net, metadata: dict[str, Any]) -> None:
    tensors = {f"seg_net.{k}": v for k, v in portable_state_dict(unwrap(seg_net)).items()}
    if reg_net is not None:
        reg = portable_state_dict(unwrap(reg_net))
        tensors |= {f"reg_net.{k}": v for k, v in reg.items()}
    ckpt.save_weights(path, tensors, metadata)
