"""Which anatomy checks do generated label maps fail? (issue 12)

Tallies the failed checks of ``sample``'s plausibility test (``measure_anatomy`` + ``plausibility``
with the training labels' ranges, as ``sample`` applies them) for three kinds of label map:

- ``--truth SET``: the true label maps of a preprocessed set (does the check accept real anatomy?);
- ``--vqgan RUN --truth SET``: the VQ-GAN label decoder's maps of that set's *real* latents, the
  ceiling for sampled maps (an LDM that reproduced real latents exactly would do no better);
- ``--samples DIR``: the label maps ``sample`` wrote, as written and with only the largest
  bladder component kept (what ``segment`` does to predictions).

    python bench/label_checks.py --train /tmp/bp/train --truth /tmp/bp/test --vqgan /tmp/bp/vqgan \\
        --samples /tmp/bp/samples
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np


def tally(maps, ranges) -> dict:
    """{"maps": n, "plausible": k, "failed": {check: count}, "wall_thickness_mm": [min, median,
    max], "lumen_share": median of lumen / bladder volume} over (classes, spacing) pairs."""
    from bladdergen.evaluate.anatomy import measure_anatomy, plausibility

    failed: Counter = Counter()
    n = passed = 0
    thickness, lumen_share = [], []
    for classes, spacing in maps:
        measurement = measure_anatomy(classes, spacing)
        checks = plausibility(measurement, ranges)
        n += 1
        passed += bool(checks.pop("plausible"))
        failed.update(name for name, ok in checks.items() if ok is False)
        if measurement["wall_thickness_mm"] is not None:
            thickness.append(measurement["wall_thickness_mm"])
        if measurement["bladder_ml"] > 0:
            lumen_share.append(measurement["lumen_ml"] / measurement["bladder_ml"])
    return {
        "maps": n,
        "plausible": passed,
        "failed": dict(sorted(failed.items())),
        "wall_thickness_mm": _spread(thickness),
        "lumen_share": float(np.median(lumen_share)) if lumen_share else None,
    }


def _spread(values: list[float]) -> list[float] | None:
    return (
        [float(np.min(values)), float(np.median(values)), float(np.max(values))] if values else None
    )


def true_maps(dataset):
    for case in dataset.labeled_cases:
        yield dataset.load_label(case), dataset.spacing(case)


def decoded_maps(dataset, vqgan: Path):
    import torch

    from bladdergen.vqgan.load import load_vqgan
    from bladdergen.vqgan.reconstruct import decoded_label_map

    model, _ = load_vqgan(vqgan, device=torch.device("cpu"))
    for case in dataset.labeled_cases:
        x = torch.from_numpy(np.ascontiguousarray(dataset.load_image(case)))[None, None]
        with torch.no_grad():
            _, indices = model.quantize(model.encode(x))
        yield decoded_label_map(model, indices), dataset.spacing(case)


def sampled_maps(samples: Path, largest_only: bool):
    from bladdergen.data.dataset import DATASET_LABEL_MAP
    from bladdergen.data.preprocess import label_values_to_classes
    from bladdergen.deepatlas.segment import largest_bladder_component

    for path in sorted((samples / "labels").glob("*.nii.gz")):
        image = nib.load(path)
        # sample writes the dataset's values (0 / 255 wall / 128 tumor)
        classes = label_values_to_classes(np.asarray(image.dataobj), DATASET_LABEL_MAP, path)
        if largest_only:
            classes = largest_bladder_component(classes)
        yield classes, tuple(float(v) for v in image.header.get_zooms()[:3])


def main() -> None:
    from bladdergen.data.dataset import PreprocessedSet
    from bladdergen.diffusion.train import training_anatomy_ranges

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="set whose labels give ranges")
    parser.add_argument("--truth", type=Path, help="a preprocessed set with labels")
    parser.add_argument("--vqgan", type=Path, help="a train-vqgan run with a label decoder")
    parser.add_argument("--samples", type=Path, help="a sample output folder with labels/")
    args = parser.parse_args()
    ranges = training_anatomy_ranges(PreprocessedSet.open(args.train))
    result: dict = {"ranges": ranges}
    if args.truth:
        truth = PreprocessedSet.open(args.truth)
        result["true_maps"] = tally(true_maps(truth), ranges)
        if args.vqgan:
            result["decoded_real_latents"] = tally(decoded_maps(truth, args.vqgan), ranges)
    if args.samples:
        result["samples"] = tally(sampled_maps(args.samples, False), ranges)
        result["samples_largest_component"] = tally(sampled_maps(args.samples, True), ranges)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
