"""Timing of `bladdergen evaluate`'s per-case work on CPU; prints a Markdown table.

    python bench/bench_evaluate.py [--threads 1] [--repeats 3]

Measures: segmentation scoring of one structure (Dice + HD95 + ASD) at the tiny (64x64x24) and
paper (512x512x24) grids; `evaluate gen`'s read-once analysis of one volume (histogram, texture,
adjacent-slice SSIM) on each profile's comparison grid; one 3D MS-SSIM pair on those grids.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bladdergen.evaluate.config import EvaluateConfig
from bladdergen.evaluate.gen import analyse_volume
from bladdergen.evaluate.inputs import HUVolume
from bladdergen.evaluate.seg import score_structure
from bladdergen.evaluate.similarity import ms_ssim, to_unit_range


def ellipsoid(shape: tuple[int, int, int], shift: int) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy, cz = shape[0] / 2 + shift, shape[1] / 2, shape[2] / 2
    return ((x - cx) / (shape[0] / 5)) ** 2 + ((y - cy) / (shape[1] / 5)) ** 2 + (
        (z - cz) / (shape[2] / 3)
    ) ** 2 <= 1


def phantom_hu(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.where(ellipsoid(shape, 0), 40.0, -60.0) + rng.normal(0, 15, shape)
    return hu.astype(np.float32)


def timed(repeats: int, fn, *args) -> float:
    fn(*args)  # warm-up (imports, kernels)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, shape in (("tiny", (64, 64, 24)), ("paper", (512, 512, 24))):
        truth, pred = ellipsoid(shape, 0), ellipsoid(shape, 2)
        spacing = (0.7 * 512 / shape[0],) * 2 + (4.0,)
        seconds = timed(args.repeats, score_structure, pred, truth, spacing)
        rows.append((f"seg: Dice+HD95+ASD, one structure, {name} {shape}", seconds))
    for name, compare in (("tiny", (64, 64)), ("paper", (128, 128))):
        shape = (64, 64, 24) if name == "tiny" else (512, 512, 24)
        config = EvaluateConfig(compare_size=compare)
        volume = HUVolume("v", Path("v"), phantom_hu(shape, 0), np.eye(4), (0.7, 0.7, 4.0))
        compare_shape = (*compare, shape[2])
        seconds = timed(
            args.repeats, analyse_volume, volume, "real", shape, compare_shape, config, None, False
        )
        rows.append((f"gen: analyse one volume {shape} -> {compare_shape}", seconds))
        a = to_unit_range(phantom_hu(compare_shape, 1), config.hu_range)
        b = to_unit_range(phantom_hu(compare_shape, 2), config.hu_range)[None]
        seconds = timed(args.repeats, ms_ssim, a, b)
        rows.append((f"gen: 3D MS-SSIM, one pair {compare_shape}", seconds))
    print(f"| measurement ({args.threads} thread(s), mean of {args.repeats}) | seconds |")
    print("|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
