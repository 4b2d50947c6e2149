"""Benchmark train-deepatlas: seconds per alternating cycle and peak memory.

Each measurement runs the real training loop (``train_deepatlas``) in a fresh subprocess on a small
generated preprocessed set, so its peak resident memory (``ru_maxrss``) is its own. Three kinds:

- ``cycle``: one profile at one volume size, ``--cycles`` alternating cycles (no pre-training,
  no validation); prints seconds per cycle and peak RSS.
- ``paper-memory``: the paper profile's networks, one registration step + one segmentation step at
  reduced in-plane sizes (CPU RSS), extrapolated linearly in the voxel count to 512x512x24 — a
  CPU proxy for GPU memory, not a GPU measurement; plus an exact count of the activations saved
  for backward at 512x512x24, taken on PyTorch's "meta" device (shapes only, nothing allocated).

Examples::

    python bench/bench_deepatlas.py cycle --profile tiny --size 64 64 24 --cycles 2
    python bench/bench_deepatlas.py paper-memory --sizes 128 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np


def make_set(root: Path, shape: tuple[int, int, int], n_cases: int = 6, n_labeled: int = 4):
    """A preprocessed set of blob volumes (bright shell around a darker core) with labels."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    cases = []
    for index in range(n_cases):
        centre = rng.uniform(-0.2, 0.2, 3)
        radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        label = np.zeros(shape, np.uint8)
        label[(radius < 0.5) & (radius > 0.4)] = 1
        label[(radius < 0.42) & (grid[0] > centre[0] + 0.3)] = 2
        image = (label * 0.3 - 0.5 + rng.normal(0, 0.05, shape)).astype(np.float32)
        case_id = f"case_{index:03d}"
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "images" / f"{case_id}.nii.gz")
        entry = {"case_id": case_id, "image": f"images/{case_id}.nii.gz", "label": None}
        if index < n_labeled:
            nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labels" / f"{case_id}.nii.gz")
            entry["label"] = f"labels/{case_id}.nii.gz"
        cases.append(entry)
    manifest = {
        "format": "bladdergen-preprocessed",
        "window": [-200.0, 300.0],
        "label_map": {"0": 0, "255": 1, "128": 2},
        "cases": cases,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def worker(profile: str, shape: tuple[int, int, int], reg_steps: int, seg_steps: int, cycles: int):
    """Train ``cycles`` alternating cycles; print JSON with seconds and peak RSS (child process)."""
    import torch

    from bladdergen.config import load_config
    from bladdergen.deepatlas.train import train_deepatlas

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_set(data, shape)
        overrides = {
            "deepatlas.reg_pretrain_steps": 0,
            "deepatlas.seg_pretrain_steps": 0,
            "deepatlas.reg_steps_per_cycle": reg_steps,
            "deepatlas.seg_steps_per_cycle": seg_steps,
            "deepatlas.max_steps": cycles * (reg_steps + seg_steps),
            "deepatlas.val_cases": 0,
            "deepatlas.device": "cpu",
        }
        config = load_config(profile, overrides=overrides)
        started = time.perf_counter()
        train_deepatlas(config.deepatlas, data, Path(tmp) / "run")
        seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_kib / 2**20}))


def run_worker(profile, shape, reg_steps, seg_steps, cycles) -> dict:
    command = [sys.executable, __file__, "_worker", profile, *map(str, shape)]
    command += [str(reg_steps), str(seg_steps), str(cycles)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def saved_activation_gib(shape: tuple[int, int, int]) -> tuple[float, float, float, float]:
    """Activations saved for backward by one seg step and one reg step of the paper profile at
    ``shape``, counted on the meta device (float32 bytes), and the two nets' parameter counts (M)."""
    import torch

    from bladdergen.config import load_config
    from bladdergen.deepatlas.fields import Warper
    from bladdergen.deepatlas.losses import DeepAtlasLosses
    from bladdergen.deepatlas.networks import RegistrationNet, SegmentationNet

    warnings.filterwarnings("ignore")
    config = load_config("paper").deepatlas
    meta = torch.device("meta")
    seg = SegmentationNet.from_config(config).to(meta)
    reg = RegistrationNet.from_config(config).to(meta)
    losses, warper = DeepAtlasLosses().to(meta), Warper().to(meta)
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    image = torch.zeros(1, 1, *shape, device=meta)
    probs = torch.zeros(1, 3, *shape, device=meta)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = seg(torch.cat([image, image]))  # moving and target in one forward
        losses.anatomy(warper(probs, torch.zeros(1, 3, *shape, device=meta)), logits[:1])
    seg_gib = sum(saved) / 2**30
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        field = reg(image, image)
        losses.similarity(warper(image, field), image) + losses.regularity(field)
        losses.anatomy(warper(probs, field), probs)
    reg_gib = sum(saved) / 2**30
    n_seg = sum(p.numel() for p in seg.parameters()) / 1e6
    n_reg = sum(p.numel() for p in reg.parameters()) / 1e6
    return seg_gib, reg_gib, n_seg, n_reg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    cycle = sub.add_parser("cycle", help="seconds per alternating cycle and peak RSS")
    cycle.add_argument("--profile", default="tiny", choices=["tiny", "paper"])
    cycle.add_argument("--size", type=int, nargs=3, default=[64, 64, 24], metavar=("X", "Y", "Z"))
    cycle.add_argument("--cycles", type=int, default=2)
    paper = sub.add_parser("paper-memory", help="paper-profile memory: CPU proxy + meta count")
    paper.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="in-plane sizes")
    paper.add_argument("--depth", type=int, default=24)
    work = sub.add_parser("_worker")
    work.add_argument("args", nargs=7)
    args = parser.parse_args()

    if args.kind == "_worker":
        profile, x, y, z, reg_steps, seg_steps, cycles = args.args
        worker(profile, (int(x), int(y), int(z)), int(reg_steps), int(seg_steps), int(cycles))
        return

    threads = os.environ.get("OMP_NUM_THREADS", "2")
    if args.kind == "cycle":
        from bladdergen.config import load_config

        config = load_config(args.profile).deepatlas
        reg_steps, seg_steps = config.reg_steps_per_cycle, config.seg_steps_per_cycle
        result = run_worker(args.profile, args.size, reg_steps, seg_steps, args.cycles)
        print(f"CPU, {threads} threads, batch {config.batch_size}\n")
        print("| profile | volume | cycle (reg + seg steps) | s/cycle | s/step | peak RSS (GiB) |")
        print("|---|---|---|---|---|---|")
        per_cycle = result["seconds"] / args.cycles
        print(
            f"| {args.profile} | {'x'.join(map(str, args.size))} | {reg_steps} + {seg_steps} | "
            f"{per_cycle:.1f} | {per_cycle / (reg_steps + seg_steps):.2f} | "
            f"{result['peak_rss_gib']:.2f} |"
        )
        return

    print(f"CPU, {threads} threads; paper profile, batch 1; one reg step + one seg step\n")
    print("| volume | s (2 steps) | peak RSS (GiB) |")
    print("|---|---|---|")
    points = []
    for size in args.sizes:
        shape = (size, size, args.depth)
        result = run_worker("paper", shape, 1, 1, 1)
        points.append((size * size * args.depth, result["peak_rss_gib"]))
        print(
            f"| {size}x{size}x{args.depth} | {result['seconds']:.1f} | {result['peak_rss_gib']:.2f} |"
        )
    if len(points) >= 2:
        (v0, m0), (v1, m1) = points[0], points[-1]
        slope = (m1 - m0) / (v1 - v0)
        target = 512 * 512 * args.depth
        print(
            f"| 512x512x{args.depth} (linear extrapolation, CPU proxy) | - | "
            f"{m1 + slope * (target - v1):.1f} |"
        )
    seg_gib, reg_gib, n_seg, n_reg = saved_activation_gib((512, 512, args.depth))
    print(
        f"\nSaved for backward at 512x512x{args.depth} (meta device, float32, activation "
        f"checkpointing on): segmentation step {seg_gib:.2f} GiB, registration step "
        f"{reg_gib:.2f} GiB; parameters {n_seg:.1f} M (seg) + {n_reg:.2f} M (reg), "
        f"x4 with gradients and Adam = {(n_seg + n_reg) * 16 / 1024:.2f} GiB."
    )


if __name__ == "__main__":
    main()
