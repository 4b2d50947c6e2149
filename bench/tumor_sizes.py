"""How much Dice a one-voxel error costs each tumor of a test set: the scale tumor Dice is read on.

For every tumor case of a preprocessed set (``bench_gain.py`` writes its test set to
``OUT/data/test``), the tumor's voxel count and the Dice of the true tumor against itself moved by
one voxel along X, eroded by one voxel and dilated by one voxel (scipy's 6-connected structure).
A tumor of 8-16 voxels scores about 0.4-0.5 for a prediction that is right but one voxel off::

    python bench/tumor_sizes.py --test /tmp/gain3/data/test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else float("nan")


def one_voxel_errors(tumor: np.ndarray) -> dict[str, float]:
    """Dice of a boolean tumor mask against itself shifted, eroded and dilated by one voxel."""
    return {
        "voxels": int(tumor.sum()),
        "shifted": dice(tumor, np.roll(tumor, 1, axis=0)),
        "eroded": dice(tumor, ndimage.binary_erosion(tumor)),
        "dilated": dice(tumor, ndimage.binary_dilation(tumor)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, required=True, help="a preprocessed set")
    args = parser.parse_args(argv)
    from bladdergen.data.dataset import PreprocessedSet

    dataset = PreprocessedSet.open(args.test)
    rows = []
    for case in dataset.labeled_cases:
        tumor = dataset.load_label(case) == 2
        if tumor.any():
            rows.append({"case_id": case.case_id, **one_voxel_errors(tumor)})
    print("| case | tumor voxels | Dice, shifted 1 voxel | eroded 1 voxel | dilated 1 voxel |")
    print("|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: r["voxels"]):
        print(
            f"| {row['case_id']} | {row['voxels']} | {row['shifted']:.2f} | {row['eroded']:.2f} "
            f"| {row['dilated']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
