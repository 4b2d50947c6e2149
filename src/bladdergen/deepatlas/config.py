"""Settings of ``bladdergen train-deepatlas`` and ``bladdergen segment`` (defaults: ``paper``).

The paper profile follows SPEC §1.5 and the MONAI ``deep_atlas`` tutorial: anatomy weight
λ_a = 2, supervised weight λ_sp = 3, local NCC with a 3-voxel window, bending energy (normalised so
λ_r does not depend on the volume size), 40 registration steps : 5 segmentation steps per cycle,
Adam 5e-4 (registration) / 1e-3 (segmentation), whole 512x512x24 volumes at batch 1.
"""

from __future__ import annotations

import dataclasses

from bladdergen.errors import ConfigError

# what the tumor voxels of a synthetic pair (DeepAtlasConfig.synthetic_pair_tumor) or of a
# registration-augmented pair (DeepAtlasConfig.reg_augment_tumor) teach
TUMOR_RULES = ("label", "ignore")
# what the supervised term of an alternating-phase segmentation step learns from
# (DeepAtlasConfig.seg_supervised_draw)
SUPERVISED_DRAWS = ("pairs", "baseline")


@dataclasses.dataclass
class DeepAtlasConfig:
    """Segmentation and registration networks, losses and the alternating schedule.

    Networks (both MONAI ``DynUNet``, layout (B, C, X, Y, Z)): ``*_filters`` are the channels per
    resolution level; the first ``*_inplane_levels`` downsamplings halve X and Y only (kernel
    (3, 3, 1), stride (2, 2, 1)) because CT slices are thick, the deeper ones halve all three axes.
    The registration net sees ``cat(moving, target)`` and predicts a displacement field in voxels,
    channel k along spatial axis k; with ``diffeomorphic`` it is a velocity field integrated by
    scaling and squaring (``integration_steps``). ``reg_inplane_downsample`` runs the registration
    net on an in-plane average-pooled pair and upsamples the field (memory at 512x512), and
    ``activation_checkpointing`` recomputes conv blocks in the backward pass instead of storing
    them (whole 512x512x24 volumes on one 24 GB GPU).

    Losses: registration ``similarity + reg_weight·bending + anatomy_weight·Dice(S_m∘φ, S_t)``;
    segmentation ``anatomy_weight·Dice(S_m∘φ, S_t) + supervised_weight·(Dice + CE)`` on labeled
    images. ``lncc_kernel`` is the local NCC window (voxels, odd), averaged over the in-plane
    pooling factors ``lncc_scales``. ``reg_weight`` multiplies the bending energy of the field *in
    voxels* (mean squared second difference per voxel, MONAI ``normalize=False``). With
    ``prealign`` the pair is first aligned by the moments of the filled bladder (manual label, else
    F_S's prediction; :mod:`bladdergen.deepatlas.align`) and the net predicts the residual.
    ``anatomy_filled_bladder`` compares wall and filled bladder (wall ∪ lumen ∪ tumor) instead of
    the three classes. The supervised term is foreground-only batch Dice + cross-entropy weighted
    by ``class_weights`` (background, wall, tumor); ``tumor_case_fraction`` of the supervised draws
    pick a labeled case that has a tumor, and with ``pair_tumor_sampling`` so do the labeled images
    of the alternating phase's pairs (else those are uniform over the labeled cases).

    Gate: the segmentation-phase anatomy term is on only while the last validation found the
    registration's warped-label Dice above the identity's by ``anatomy_gate_margin`` for both the
    wall and the filled bladder; with ``anatomy_gate_segmenter`` also only while those warped
    labels are at least as accurate as F_S's own validation prediction (wall and filled bladder):
    below that, the anatomy term's targets are worse than what F_S already predicts.
    ``reg_augment_weight``: registration as augmentation, a labeled image and its label warped onto
    the other image of a segmentation pair, as an extra supervised pair (0 turns it off).
    ``reg_augment_tumor`` "ignore" leaves the warped tumor voxels of those pairs out of the
    supervised loss (the warp resamples a tumor of a few voxels and blurs its 10-40 HU contrast, so
    F_S would learn tumor boundaries from resampled images); "label" (default) learns them.
    Measured on phantoms (docs/benchmarks.md, 2 labeled cases, three seeds): "ignore" did not raise
    tumor Dice in either DeepAtlas arm (+0.006 with real unlabeled scans, −0.046 with synthetic
    volumes added), so it stays off.
    ``reg_augment_context``: a registration-augmented image keeps the warped atlas only in and
    next to the two bladders (the warped atlas's filled bladder grown by 1 voxel in-plane, the
    target's, F_S's prediction where it has no label, grown by 2) and shows the target image
    everywhere else (:func:`bladdergen.deepatlas.augment.with_target_context`): the warp carries
    the labeled scans' surroundings along, stretched, so without it every augmented pair shows the
    bladder against the one or two labeled scans' tissue.
    ``seg_supervised_draw``: "pairs" (paper profile, the paper's DeepAtlas): the supervised term
    of an alternating segmentation step is on the labeled images of its pairs. "baseline" (tiny
    profile): it is on the baseline's own batch of that segmentation update (the same cases,
    tumor-aware draws and augmentation, from the same random numbers), and each pair's labeled
    image is its moving image, so every step adds a registration-augmented pair: the step is the
    baseline's step plus what registration adds. Measured on phantoms (docs/benchmarks.md): the
    same wall Dice as "pairs" (−0.001 at 2 labeled cases, −0.002 at 4), and at 4 labeled cases the
    tumor Dice that "pairs" costs against the baseline comes back (0.367 → 0.429, baseline 0.447;
    a tie at 2).
    ``seg_augment``: every supervised image (pre-training, the baseline and the labeled images of
    the alternating phase's pairs) is moved by a random
    in-plane rotation (±``augment_rotation_deg``), scale (1 ± ``augment_scale``) and shift
    (± ``augment_shift`` of the in-plane size), a left-right flip half the time and an intensity
    gain/offset (± ``augment_intensity``; :mod:`bladdergen.deepatlas.augment`). In the
    alternating phase only the supervised term sees the moved images: the registration field and
    the anatomy term use the images as they are. ``augment_warped`` (with ``seg_augment``) also
    moves each registration-augmented pair (warped image and warped label) by its own random
    transform after the warp, so those pairs vary in pose and intensity as the baseline's do.
    ``synthetic_filter``: after pre-training, synthetic volumes whose F_S segmentation fails the
    anatomy plausibility check (:func:`bladdergen.deepatlas.train.passes_synthetic_filter`: the
    tumor judged as a whole, not per piece) leave the pool.
    ``synthetic_pairs`` (off by default): a ``--synthetic`` sample whose generated label map passed
    ``sample``'s anatomy checks is a labeled case (also for ``--supervised-only``: the "supervised +
    synthetic pairs" arm); samples without a (plausible) label stay unlabeled images. In supervised
    draws, the tumor-aware ones included, a synthetic pair is picked ``synthetic_pair_weight``
    times as often as a real labeled case, so n pairs make n·w / (n·w + real cases) of the draws
    (the run's notice says how much). ``synthetic_pair_tumor`` "ignore" (default) leaves a pair's
    generated tumor voxels out of the supervised loss (nothing is taught there) and the pairs out
    of the tumor-aware draws, so they teach the wall and not the tumors their images do not show;
    "label" learns the generated tumors too. Measured on phantoms (docs/benchmarks.md): with
    their tumors ignored and 25-58 % of the draws (weight 0.04 for 34 or 70 pairs, 0.02 for 70), the
    tiny generator's pairs raise held-out wall Dice by +0.07 to +0.08 at 2 labeled cases and tie
    at 4; with their tumors learned they lowered wall and tumor Dice at every weight (0.5 to 0.02).
    Off by default, as in the paper (synthetic volumes are unlabeled images): with pairs among
    its labeled cases DeepAtlas cannot start from the baseline's pre-training, and its measured
    gain with them (+0.059 at 2 labeled cases) came from that pre-training, not registration.

    Schedule (global step = one optimiser update of either network): ``reg_pretrain_steps`` of
    unsupervised registration, then ``seg_pretrain_steps`` of supervised segmentation, then cycles
    of ``reg_steps_per_cycle`` registration steps (segmentation frozen) and ``seg_steps_per_cycle``
    segmentation steps (registration frozen) until ``max_steps``. ``--supervised-only`` trains the
    segmentation net alone for exactly as many updates as it gets in that schedule.

    Validation: ``val_cases`` labeled cases of DATA_DIR are held out (seeded choice) and scored every
    ``val_every`` steps; the weights with the best *smoothed* mean foreground Dice are kept as
    ``best.safetensors``: s ← ``val_smoothing``·s + (1 − ``val_smoothing``)·Dice over the
    validations so far (nnU-Net v2 picks its best checkpoint on such an average with 0.9; 0 picks
    on each validation's own score). Measured on phantoms (docs/benchmarks.md): on 3 validation
    cases the raw score follows the tumor Dice of one or two small tumors, which swings by 0.3
    between validations, and picked checkpoints far worse than the last weights (2 labeled cases:
    test wall Dice 0.661 against 0.691, tumor 0.244 against 0.431).
    """

    # segmentation network
    seg_filters: tuple[int, ...] = (16, 32, 64, 128, 256, 320)
    seg_inplane_levels: int = 2
    # registration network
    reg_filters: tuple[int, ...] = (16, 32, 32, 64, 64)
    reg_inplane_levels: int = 1
    reg_inplane_downsample: int = 2
    diffeomorphic: bool = False
    integration_steps: int = 7
    activation_checkpointing: bool = True
    # losses
    lncc_kernel: int = 7
    lncc_scales: tuple[int, ...] = (1, 2, 4)
    reg_weight: float = 1.0
    prealign: bool = True
    anatomy_weight: float = 2.0
    anatomy_filled_bladder: bool = True
    anatomy_gate_margin: float = 0.02
    anatomy_gate_segmenter: bool = False
    supervised_weight: float = 3.0
    class_weights: tuple[float, ...] = (1.0, 1.0, 3.0)
    tumor_case_fraction: float = 0.5
    pair_tumor_sampling: bool = False
    seg_supervised_draw: str = "pairs"
    reg_augment_weight: float = 1.0
    reg_augment_tumor: str = "label"
    reg_augment_context: bool = False
    seg_augment: bool = False
    augment_warped: bool = False
    augment_rotation_deg: float = 15.0
    augment_scale: float = 0.1
    augment_shift: float = 0.05
    augment_intensity: float = 0.1
    # synthetic CT + label pairs from `sample` (--synthetic) as labeled data
    synthetic_pairs: bool = False
    synthetic_pair_weight: float = 0.04
    synthetic_pair_tumor: str = "ignore"
    synthetic_filter: bool = True
    # optimisation and schedule
    reg_lr: float = 5e-4
    seg_lr: float = 1e-3
    batch_size: int = 1
    max_steps: int = 20_000
    reg_pretrain_steps: int = 2_000
    seg_pretrain_steps: int = 1_000
    reg_steps_per_cycle: int = 40
    seg_steps_per_cycle: int = 5
    # validation, checkpoints, data
    val_cases: int = 3
    val_every: int = 450
    val_smoothing: float = 0.9
    checkpoint_every: int = 450
    log_every: int = 10
    cache_volumes: int = 256
    sw_overlap: float = 0.25
    device: str = "auto"

    def validate(self) -> None:
        for key in ("seg_filters", "reg_filters"):
            filters = getattr(self, key)
            if len(filters) < 2 or min(filters) < 1:
                raise ConfigError(
                    f"deepatlas.{key}: got {list(filters)}, expected >= 2 positive channel counts"
                )
        for key, filters in (
            ("seg_inplane_levels", self.seg_filters),
            ("reg_inplane_levels", self.reg_filters),
        ):
            value = getattr(self, key)
            if not 0 <= value <= len(filters) - 1:
                raise ConfigError(
                    f"deepatlas.{key}: got {value}, expected 0..{len(filters) - 1} "
                    "(the number of downsamplings)"
                )
        if self.lncc_kernel < 1 or self.lncc_kernel % 2 == 0:
            raise ConfigError(f"deepatlas.lncc_kernel: got {self.lncc_kernel}, expected odd >= 1")
        positive_ints = (
            "reg_inplane_downsample",
            "batch_size",
            "max_steps",
            "val_every",
            "checkpoint_every",
            "log_every",
            "cache_volumes",
        )
        for key in positive_ints:
            if getattr(self, key) < 1:
                raise ConfigError(f"deepatlas.{key}: got {getattr(self, key)}, expected >= 1")
        for key in (
            "reg_pretrain_steps",
            "seg_pretrain_steps",
            "reg_steps_per_cycle",
            "seg_steps_per_cycle",
            "val_cases",
            "integration_steps",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"deepatlas.{key}: got {getattr(self, key)}, expected >= 0")
        if self.reg_steps_per_cycle + self.seg_steps_per_cycle < 1:
            raise ConfigError(
                "deepatlas.reg_steps_per_cycle + seg_steps_per_cycle: got 0, expected >= 1"
            )
        for key in ("reg_weight", "anatomy_weight", "supervised_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"deepatlas.{key}: got {getattr(self, key)}, expected >= 0")
        for key in ("reg_lr", "seg_lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"deepatlas.{key}: got {getattr(self, key)}, expected > 0")
        if not self.lncc_scales or min(self.lncc_scales) < 1:
            raise ConfigError(
                f"deepatlas.lncc_scales: got {list(self.lncc_scales)}, expected pooling factors >= 1"
            )
        if len(self.class_weights) != 3 or min(self.class_weights) <= 0:
            raise ConfigError(
                f"deepatlas.class_weights: got {list(self.class_weights)}, expected 3 positive "
                "weights (background, wall, tumor)"
            )
        if not 0.0 <= self.tumor_case_fraction <= 1.0:
            raise ConfigError(
                f"deepatlas.tumor_case_fraction: got {self.tumor_case_fraction}, expected in [0, 1]"
            )
        if self.synthetic_pair_weight <= 0:
            raise ConfigError(
                f"deepatlas.synthetic_pair_weight: got {self.synthetic_pair_weight}, expected > 0"
            )
        choices = {"synthetic_pair_tumor": TUMOR_RULES, "reg_augment_tumor": TUMOR_RULES}
        choices["seg_supervised_draw"] = SUPERVISED_DRAWS
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"deepatlas.{key}: got {getattr(self, key)!r}, expected one "
                    f"of {', '.join(allowed)}"
                )
        if self.reg_augment_weight < 0:
            raise ConfigError(
                f"deepatlas.reg_augment_weight: got {self.reg_augment_weight}, expected >= 0"
            )
        for key in ("augment_rotation_deg", "augment_shift", "augment_intensity"):
            if getattr(self, key) < 0:
                raise ConfigError(f"deepatlas.{key}: got {getattr(self, key)}, expected >= 0")
        if not 0.0 <= self.augment_scale < 1.0:
            raise ConfigError(
                f"deepatlas.augment_scale: got {self.augment_scale}, expected in [0, 1)"
            )
        if not 0.0 <= self.val_smoothing < 1.0:
            raise ConfigError(
                f"deepatlas.val_smoothing: got {self.val_smoothing}, expected in [0, 1)"
            )
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ConfigError(f"deepatlas.sw_overlap: got {self.sw_overlap}, expected in [0, 1)")


TINY = {
    "seg_filters": [8, 16, 32, 64],
    "seg_inplane_levels": 1,
    "reg_filters": [8, 16, 16, 32],
    "reg_inplane_levels": 1,
    "reg_inplane_downsample": 1,
    "activation_checkpointing": False,
    # Measured on phantoms (4 labeled, supervised, 3e-3; validation every 100 updates): the wall
    # shows up after ~200 updates and levels off at ~0.74 Dice by 600-900; the tumor class stays
    # at 0 until ~700 updates and reaches ~0.3 by 900-1200 (fewer updates never find a tumor).
    # So 1,000 segmentation updates in both arms: 700 of pre-training (F_S must predict a wall
    # before its pseudo-labels mean anything), then cycles of 5 registration : 5 segmentation steps.
    "seg_lr": 3e-3,
    "max_steps": 1400,
    "reg_pretrain_steps": 100,
    "seg_pretrain_steps": 700,
    "reg_steps_per_cycle": 5,
    "seg_steps_per_cycle": 5,
    # Measured on phantoms (docs/benchmarks.md, "The tiny defaults"): augmentation makes the
    # stronger baseline at every labeled count, and on top of it DeepAtlas gains only without
    # the anatomy term (wall Dice with real unlabeled scans: +0.102 at 1 labeled case, +0.022 at
    # 2 over six seeds, +0.025 at 4; with the term it tied the augmented baseline). The
    # registration still trains the segmenter through registration-as-augmentation pairs.
    "seg_augment": True,
    "anatomy_weight": 0.0,
    # Measured on phantoms (docs/benchmarks.md, "The baseline's own batch"): learning the
    # alternating phase's supervised term from the baseline's batch keeps the wall gain (−0.001
    # at 2 labeled cases, −0.002 at 4) and gives back the tumor Dice DeepAtlas cost at 4 labeled
    # cases (0.367 → 0.429, the baseline 0.447; a tie at 2). And the arms then differ by the
    # registration terms alone.
    "seg_supervised_draw": "baseline",
    # Measured on phantoms (docs/benchmarks.md, "The warped atlas in the target's own
    # surroundings", six seeds): the registration-augmented pairs in their targets' surroundings
    # find the wall DeepAtlas missed (recall 0.721 -> 0.764 at 2 labeled cases): wall Dice +0.005
    # at 2 labeled cases (within noise) and +0.011 [+0.005, +0.017] at 4, HD95 -2.3 and -1.1 mm;
    # tumor Dice -0.035 at 2 and +0.019 at 4 (both within noise).
    "reg_augment_context": True,
    "val_cases": 3,
    "val_every": 50,
    "checkpoint_every": 50,
    "log_every": 5,
}
