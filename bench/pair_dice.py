"""How well do generated images follow their generated label maps? (issue 12)

The quick form of the paired-label score of ``evaluate gen --seg-model``: a segmenter trained on
real cases only segments each generated image, and its wall Dice against the sample's own label
map is averaged over all samples and over the plausible ones (``sample``'s anatomy checks). Beside
it, how many samples fail each check and the median bladder volume. Only the scoring, without
``evaluate gen``'s appearance and diversity measures, so a sampling run is judged in a minute.

    OMP_NUM_THREADS=1 python bench/pair_dice.py /tmp/lx/s_cos0 /tmp/bpf2/segmenter --limit 100
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np


def judge(samples: Path, seg_model: Path, limit: int | None) -> dict:
    from bladdergen.data.intensity import hu_to_unit
    from bladdergen.diffusion.layout import sample_label_and_checks
    from bladdergen.evaluate.anatomy import load_segmenter
    from bladdergen.evaluate.gen import paired_label_scores
    from bladdergen.evaluate.inputs import load_nifti, read_array

    segmenter = load_segmenter(seg_model, "cpu", (-200.0, 300.0))
    images = sorted((samples / "images").glob("*.nii.gz"))[:limit]
    if not images:
        raise SystemExit(f"{samples}/images: no generated volumes (*.nii.gz) found")
    dice, plausible, failed, volume = [], [], Counter(), []
    for path in images:
        hu = read_array(load_nifti(path), path).astype(np.float32)
        predicted = segmenter.classes(hu_to_unit(hu, segmenter.window))
        scores = paired_label_scores(path, hu.shape, predicted)
        if scores is None:
            raise SystemExit(f"{path}: no generated label map beside it (labels/)")
        checks = json.loads(sample_label_and_checks(path)[1].read_text(encoding="utf-8"))
        failed.update(k for k, ok in checks["checks"].items() if ok is False and k != "plausible")
        volume.append(checks["measurement"]["bladder_ml"] or 0.0)
        dice.append(np.nan if scores["dice_wall"] is None else scores["dice_wall"])
        plausible.append(bool(checks["checks"]["plausible"]))
    dice, plausible = np.array(dice), np.array(plausible)
    return {
        "samples": len(images),
        "plausible": int(plausible.sum()),
        "failed": dict(failed.most_common()),
        "median_bladder_ml": float(np.median(volume)),
        "pair_wall_dice_all": float(np.nanmean(dice)),
        "pair_wall_dice_plausible": float(np.nanmean(dice[plausible])) if plausible.any() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, help="a `sample` output folder (images/, labels/)")
    parser.add_argument("seg_model", type=Path, help="a segmenter trained on real cases only")
    parser.add_argument("--limit", type=int, default=None, help="score the first N samples")
    args = parser.parse_args()
    print(json.dumps(judge(args.samples, args.seg_model, args.limit), indent=1))


if __name__ == "__main__":
    main()
