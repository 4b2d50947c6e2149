"""Benchmark ``bladdergen preprocess`` against the floor of merely reading and writing the files.

Generates N phantom cases (512x512x~24 by default), then times, in this process:

* ``phantom``: generating and writing the cases (1 and W worker processes);
* ``floor``: for every case, read the input image and label (nibabel) and write arrays of the
  output's shape and dtype (float32 image, uint8 label) with the same NIfTI writer, one process;
* ``preprocess`` with 1 and with W workers (paper profile: 512x512x24, no in-plane resampling),
  and with the tiny profile (64x64x24, in-plane resampling), each into a fresh folder.

Prints a Markdown table: wall-clock seconds (total, per case, ratio to the floor) and CPU
seconds (this process + worker processes) per case and their ratio to the floor's. CPU seconds
are the robust number on a machine shared with other jobs.

    python bench/bench_preprocess.py --cases 24 --size 512 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bladdergen.config import load_config
from bladdergen.data.phantom import generate_phantoms
from bladdergen.data.preprocess_run import preprocess_folder
from bladdergen.data.volumes import write_nifti


def read_write_floor(in_dir: Path, out_dir: Path, depth: int) -> float:
    """Seconds to read every image/label and write same-shaped float32/uint8 NIfTI files."""
    start = time.perf_counter()
    for image_path in sorted((in_dir / "images").glob("*.nii.gz")):
        image = nib.load(str(image_path))
        array = np.asarray(image.get_fdata(dtype=np.float32))
        label_path = in_dir / "labels" / image_path.name
        label = np.asarray(nib.load(str(label_path)).dataobj) if label_path.exists() else None
        # same shape and dtype as the preprocessed output (depth fixed, values kept)
        out = np.resize(array, array.shape[:2] + (depth,)) / 1000.0
        write_nifti(out_dir / "images" / image_path.name, out, image.affine, np.float32)
        if label is not None:
            label_out = np.resize(label, label.shape[:2] + (depth,))
            write_nifti(out_dir / "labels" / image_path.name, label_out, image.affine, np.uint8)
    return time.perf_counter() - start


class Timer:
    """Wall-clock and CPU seconds (this process + finished child processes) of a block.

    CPU seconds are robust to other jobs competing for the cores; wall seconds are not.
    """

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = _cpu_seconds() - self._cpu


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24, help="phantom cases to generate")
    parser.add_argument("--size", type=int, default=512, help="in-plane phantom size")
    parser.add_argument("--workers", type=int, default=2, help="worker processes to compare")
    parser.add_argument(
        "--keep", type=Path, default=None, help="work folder to keep (default: temp)"
    )
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    phantoms = work / "phantoms"
    rows: list[tuple[str, Timer]] = []
    try:
        shutil.rmtree(phantoms, ignore_errors=True)
        with Timer() as timer:
            generate_phantoms(phantoms, n=args.cases, seed=0, size=args.size)
        rows.append(("phantom (generate + write), 1 worker", timer))
        if args.workers > 1:
            with Timer() as timer:
                generate_phantoms(
                    work / "phantoms_par", n=args.cases, size=args.size, workers=args.workers
                )
            rows.append((f"phantom, {args.workers} workers", timer))
            shutil.rmtree(work / "phantoms_par")

        paper = load_config("paper").preprocess
        paper.target_size = (args.size, args.size)  # the phantoms' own grid: no resampling
        with Timer() as floor:
            read_write_floor(phantoms, work / "floor", paper.target_depth)
        rows.append(("floor: read + write only", floor))

        for workers in sorted({1, args.workers}):
            out = work / f"paper_w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            with Timer() as timer:
                preprocess_folder(phantoms, out, paper, workers=workers)
            rows.append((f"preprocess paper, {workers} worker(s)", timer))
        with Timer() as timer:
            preprocess_folder(
                phantoms, work / f"paper_w{args.workers}", paper, workers=args.workers
            )
        rows.append(("re-run, same inputs (no-op)", timer))

        tiny = load_config("tiny").preprocess
        shutil.rmtree(work / "tiny", ignore_errors=True)
        with Timer() as timer:
            preprocess_folder(phantoms, work / "tiny", tiny, workers=args.workers)
        rows.append((f"preprocess tiny (64x64x24), {args.workers} worker(s)", timer))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{args.cases} phantom cases, {args.size}x{args.size}x~24 in, int16 HU NIfTI (.nii.gz)\n")
    print(
        "| step | wall s | wall s / case | wall ratio to floor | CPU s / case | CPU ratio to floor |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in rows:
        print(
            f"| {name} | {t.wall:.2f} | {t.wall / args.cases:.3f} | {t.wall / floor.wall:.2f} "
            f"| {t.cpu / args.cases:.3f} | {t.cpu / floor.cpu:.2f} |"
        )


if __name__ == "__main__":
    main()
