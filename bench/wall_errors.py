"""Where the segmenters of ``bench_gain.py`` runs lose wall Dice: found wall, missed wall, and where.

For each arm (a run-folder pattern with ``{seed}``) and seed, the run's best checkpoint segments
the test set as ``bench_gain.py`` scores it (largest bladder component), and the wall voxels are
counted over all test cases and seeds together:

- precision (predicted wall that is wall), recall (true wall that is found) and the predicted
  wall volume over the true one;
- the share of the true wall missed in the anterior and posterior half of the bladder (by each
  slice's filled-bladder centroid along Y; the preprocessed grid is RAS, so +Y is anterior);
- the share missed where fat lies outside the wall and where tissue as dense as the wall does
  (the mean image over the non-bladder voxels of the 5x5 in-plane neighbourhood: within
  ``ISODENSE`` of the wall's median, or more than ``FAT_BELOW`` below it);
- the mean wall Dice with an offset added to the wall logit before the argmax (``--offsets``):
  how much of an arm's deficit a threshold would take back. Chosen on the test set, so an upper
  bound for any offset a validation set would pick::

    python bench/wall_errors.py --test /tmp/B2/data/test --seeds 0 1 2 3 4 5 \\
        --arm supervised=/tmp/B2/runs/n2_s{seed}_supervised \\
        --arm deepatlas=/tmp/V2/runs/n2_s{seed}_deepatlas \\
        --arm oracle=/tmp/O14/runs/n14_s{seed}_supervised --out /tmp/wall_errors.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ISODENSE = 0.08  # window units ([-1, 1]); 20 HU in the tiny profile's 500 HU window
FAT_BELOW = 0.15
FIELDS = (
    "tp",
    "fp",
    "fn",
    "anterior",
    "anterior_missed",
    "posterior",
    "posterior_missed",
    "fat_outside",
    "fat_outside_missed",
    "isodense_outside",
    "isodense_outside_missed",
)


def wall_errors(predicted: np.ndarray, truth: np.ndarray, image: np.ndarray) -> dict[str, int]:
    """Voxel counts of one case: class maps (X, Y, Z) (1 = wall) and the image in [-1, 1]."""
    from bladdergen.data.bladder import filled_bladder

    wall, found = truth == 1, predicted == 1
    missed = wall & ~found
    counts = {"tp": int((wall & found).sum()), "fp": int((found & ~wall).sum())}
    counts["fn"] = int(missed.sum())
    filled = filled_bladder(truth)
    anterior = np.zeros_like(wall)
    for z in np.flatnonzero(filled.any(axis=(0, 1))):
        centre_y = np.nonzero(filled[:, :, z])[1].mean()
        anterior[:, :, z] = np.arange(wall.shape[1])[None, :] > centre_y
    outside = (~filled).astype(np.float32)
    box = np.ones((5, 5, 1), np.float32)
    outside_voxels = ndimage.convolve(outside, box, mode="nearest")
    outside_sum = ndimage.convolve(image * outside, box, mode="nearest")
    outside_mean = outside_sum / np.maximum(outside_voxels, 1.0)
    level = float(np.median(image[wall])) if wall.any() else 0.0
    touches = wall & (outside_voxels > 0)
    groups = {
        "anterior": wall & anterior,
        "posterior": wall & ~anterior,
        "fat_outside": touches & (outside_mean < level - FAT_BELOW),
        "isodense_outside": touches & (np.abs(outside_mean - level) < ISODENSE),
    }
    for name, mask in groups.items():
        counts[name] = int(mask.sum())
        counts[f"{name}_missed"] = int((mask & missed).sum())
    return counts


def summary(counts: dict[str, int]) -> dict[str, float]:
    """Rates from counts summed over cases."""

    def share(part: str, whole: str) -> float:
        return counts[part] / counts[whole] if counts[whole] else float("nan")

    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "volume_ratio": (tp + fp) / (tp + fn) if tp + fn else float("nan"),
        "missed_anterior": share("anterior_missed", "anterior"),
        "missed_posterior": share("posterior_missed", "posterior"),
        "missed_fat_outside": share("fat_outside_missed", "fat_outside"),
        "missed_isodense_outside": share("isodense_outside_missed", "isodense_outside"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, required=True, help="a preprocessed test set")
    parser.add_argument("--arm", action="append", required=True, help="NAME=run folder {seed}")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    parser.add_argument("--out", type=Path, required=True, help="JSON of every number")
    args = parser.parse_args(argv)

    import torch

    from bladdergen.data.dataset import PreprocessedSet
    from bladdergen.deepatlas.segment import (
        largest_bladder_component,
        load_segmentation_model,
        predict_logits,
    )

    dataset = PreprocessedSet.open(args.test)
    cases = []
    for case in dataset.labeled_cases:
        image = np.ascontiguousarray(dataset.load_image(case), np.float32)
        cases.append((image, dataset.load_label(case)))
    results = {}
    for arm in args.arm:
        name, pattern = arm.split("=", 1)
        counts = dict.fromkeys(FIELDS, 0)
        dice = {offset: [] for offset in args.offsets}
        for seed in args.seeds:
            net, _ = load_segmentation_model(Path(pattern.format(seed=seed)), "cpu")
            for image, truth in cases:
                with torch.no_grad():
                    logits = predict_logits(net, torch.from_numpy(image)[None, None])[0].numpy()
                predicted = largest_bladder_component(logits.argmax(axis=0))
                for key, value in wall_errors(predicted, truth, image).items():
                    counts[key] += value
                for offset in args.offsets:
                    shifted = logits.copy()
                    shifted[1] += offset
                    predicted = largest_bladder_component(shifted.argmax(axis=0))
                    wall, found = truth == 1, predicted == 1
                    dice[offset].append(2 * (wall & found).sum() / (wall.sum() + found.sum()))
        results[name] = {
            **summary(counts),
            "counts": counts,
            "wall_dice_by_offset": {str(o): float(np.mean(d)) for o, d in dice.items()},
        }
    args.out.write_text(json.dumps(results, indent=1))
    offsets = " | ".join(f"Dice, offset {o:+.1f}" for o in args.offsets)
    print(
        "| arm | precision | recall | predicted / true volume | missed anterior | posterior "
        f"| fat outside | isodense outside | {offsets} |"
    )
    print("|---" * (8 + len(args.offsets)) + "|")
    for name, r in results.items():
        dices = " | ".join(f"{v:.3f}" for v in r["wall_dice_by_offset"].values())
        print(
            f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['volume_ratio']:.2f} "
            f"| {r['missed_anterior']:.3f} | {r['missed_posterior']:.3f} "
            f"| {r['missed_fat_outside']:.3f} | {r['missed_isodense_outside']:.3f} | {dices} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
