"""Which images a DeepAtlas step sees: the schedule of phases and pair sampling by label availability.

Images are numbered so that ``0 .. n_labeled-1`` have manual labels and ``n_labeled .. n-1`` do not
(real unlabeled scans and synthetic volumes). Pairs are ordered ``(moving, target)``, never an image
with itself. Registration steps draw uniformly from all ordered pairs; segmentation steps draw
uniformly from the pairs with at least one labeled image (classes 11, 10, 01 weighted by how many
pairs they hold): a pair of two unlabeled images has no manual label to learn from and admits
degenerate self-consistent solutions, so it never trains the segmentation net.

Every step's randomness comes from ``(seed, step, rank)``, so a resumed run draws the same pairs.
"""

from __future__ import annotations

import numpy as np

from bladdergen.deepatlas.config import DeepAtlasConfig

REG_PRETRAIN, SEG_PRETRAIN, REG, SEG, SUPERVISED = (
    "reg_pretrain",
    "seg_pretrain",
    "reg",
    "seg",
    "supervised",
)


def phase_of(step: int, config: DeepAtlasConfig) -> str:
    """The phase of global step ``step`` (0-based) in the DeepAtlas schedule.

    ``reg_pretrain`` (unsupervised registration), ``seg_pretrain`` (supervised segmentation), then
    cycles of ``reg`` (segmentation frozen) and ``seg`` (registration frozen) steps.
    """
    r0, s0 = config.reg_pretrain_steps, config.seg_pretrain_steps
    if step < r0:
        return REG_PRETRAIN
    if step < r0 + s0:
        return SEG_PRETRAIN
    position = (step - r0 - s0) % (config.reg_steps_per_cycle + config.seg_steps_per_cycle)
    return REG if position < config.reg_steps_per_cycle else SEG


def segmentation_updates(config: DeepAtlasConfig, max_steps: int) -> int:
    """How many segmentation-net updates the DeepAtlas schedule makes in ``max_steps`` steps.

    The ``--supervised-only`` baseline trains for exactly this many steps (the same budget of
    segmentation updates, without registration or unlabeled data).
    """
    r0, s0 = config.reg_pretrain_steps, config.seg_pretrain_steps
    pretrain = min(max(max_steps - r0, 0), s0)
    rest = max(max_steps - r0 - s0, 0)
    cycle = config.reg_steps_per_cycle + config.seg_steps_per_cycle
    full, partial = divmod(rest, cycle)
    in_partial = max(partial - config.reg_steps_per_cycle, 0)
    return pretrain + full * config.seg_steps_per_cycle + in_partial


def step_rng(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """The random generator of one training step on one rank."""
    return np.random.default_rng([seed, step, rank])


def registration_pairs(
    rng: np.random.Generator, n_images: int, count: int
) -> list[tuple[int, int]]:
    """``count`` ordered pairs of distinct images, uniform over all ``n*(n-1)`` pairs."""
    if n_images < 2:
        raise ValueError(f"registration needs at least 2 images, got {n_images}")
    pairs = []
    for _ in range(count):
        moving = int(rng.integers(n_images))
        target = int(rng.integers(n_images - 1))
        target += target >= moving  # skip the moving image itself
        pairs.append((moving, target))
    return pairs


def segmentation_pairs(
    rng: np.random.Generator,
    n_labeled: int,
    n_unlabeled: int,
    count: int,
    tumor_cases: list[int] | None = None,
    tumor_fraction: float = 0.0,
) -> list[tuple[int, int]]:
    """``count`` ordered pairs with at least one labeled image, uniform over all such pairs.

    Labeled images are ``0 .. n_labeled-1``, unlabeled ``n_labeled .. n_labeled+n_unlabeled-1``.
    With ``tumor_cases`` and ``tumor_fraction`` > 0, the pair's first labeled image is one of
    ``tumor_cases`` with probability ``tumor_fraction`` (else uniform), as the supervised draws
    are; without them no extra random number is drawn, so the pairs are those of uniform draws.
    """
    both = n_labeled * (n_labeled - 1)  # 11: labeled moving, labeled target
    one = n_labeled * n_unlabeled  # 10 and 01 each
    total = both + 2 * one
    if total == 0:
        raise ValueError(
            f"no pair with a labeled image among {n_labeled} labeled and {n_unlabeled} unlabeled"
        )
    pairs = []
    for _ in range(count):
        pick = int(rng.integers(total))
        labeled = int(rng.integers(n_labeled))
        if tumor_cases and tumor_fraction > 0:
            labeled = tumor_or(rng, labeled, tumor_cases, tumor_fraction)
        if pick < both:
            other = int(rng.integers(n_labeled - 1))
            other += other >= labeled
            pairs.append((labeled, other))
            continue
        unlabeled = n_labeled + int(rng.integers(n_unlabeled))
        if pick < both + one:
            pairs.append((labeled, unlabeled))
        else:
            pairs.append((unlabeled, labeled))
    return pairs


def tumor_or(
    rng: np.random.Generator,
    index: int,
    tumor_cases: list[int],
    fraction: float,
    weights: np.ndarray | None = None,
) -> int:
    """One of ``tumor_cases`` with probability ``fraction``, else ``index``: the tumor-aware
    draw of supervised batches and, optionally, of segmentation pairs. The tumor case is uniform,
    or drawn in proportion to ``weights`` (one per tumor case) when they are given."""
    if rng.random() < fraction:
        if weights is None:
            return tumor_cases[int(rng.integers(len(tumor_cases)))]
        return tumor_cases[int(rng.choice(len(tumor_cases), p=weights / weights.sum()))]
    return index


def labeled_batch(rng: np.random.Generator, n_labeled: int, count: int) -> list[int]:
    """``count`` labeled image indices drawn uniformly with replacement (supervised steps)."""
    return [int(i) for i in rng.integers(n_labeled, size=count)]
