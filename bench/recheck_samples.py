"""A copy of a ``sample`` output whose ``checks/`` are written again with today's anatomy check.

``train-deepatlas --synthetic-pairs`` takes a sample as a CT + label pair when its
``checks/<name>.json`` says plausible. A folder sampled before a change of the check carries the
old flags; this copies it to OUT and re-judges every label map the way ``sample`` does now
(``diffusion.sample.label_checks`` against the ranges of the LDM's training labels, given as
the preprocessed set ``--train``), so both flag sets can be trained on and compared:

    python bench/recheck_samples.py /tmp/bpn0/samples /tmp/s9/bpn0pp --train /tmp/bpn0/train
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np


def main() -> None:
    from bladdergen.data.dataset import DATASET_LABEL_MAP, PreprocessedSet
    from bladdergen.data.preprocess import label_values_to_classes
    from bladdergen.diffusion.sample import label_checks
    from bladdergen.diffusion.train import training_anatomy_ranges

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, help="a sample output folder with labels/")
    parser.add_argument("out", type=Path, help="the copy to write (must not exist)")
    parser.add_argument("--train", type=Path, required=True, help="the LDM's training set")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new folder")
    shutil.copytree(args.samples, args.out)
    ranges = training_anatomy_ranges(PreprocessedSet.open(args.train))
    before = after = 0
    for label in sorted((args.out / "labels").glob("*.nii.gz")):
        image = nib.load(label)
        classes = label_values_to_classes(np.asarray(image.dataobj), DATASET_LABEL_MAP, label)
        checks_path = args.out / "checks" / f"{label.name.removesuffix('.nii.gz')}.json"
        if checks_path.is_file():
            before += bool(
                json.loads(checks_path.read_text(encoding="utf-8"))["checks"]["plausible"]
            )
        record = label_checks(classes, image.affine, ranges)  # what `sample` writes today
        after += bool(record["checks"]["plausible"])
        checks_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"plausible_before": before, "plausible_now": after, "ranges": ranges}))


if __name__ == "__main__":
    main()
