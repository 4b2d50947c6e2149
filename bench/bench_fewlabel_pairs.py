"""Synthetic CT + label pairs from a generator that saw only the few labels: issue 12 end to end.

``bench_gain.py``'s ``supervised+pairs`` arm is usually given one pairs folder, drawn by a
generator trained on many labeled phantoms. A lab with 2 labeled scans has no such generator. This
script trains one generator per ``bench_gain.py`` split, on what that split's segmenter may see:

    the split's training-labeled cases (images + labels) and its unlabeled phantoms (images)
    -> train-vqgan (label decoder on the labeled cases only) -> train-ldm (every image's latents)
    -> sample -n N (CT + label maps, anatomy-checked against the labeled cases' ranges)

The split's validation cases (which choose the segmenter's checkpoint) and the test phantoms stay
out. Then the gain, with ``{labeled}`` and ``{seed}`` in ``--synthetic`` filled per run::

    OMP_NUM_THREADS=1 python bench/bench_fewlabel_pairs.py --gain-out /tmp/g24 --out /tmp/flp \\
        --labeled 2 --seeds 0 1 2 --samples 100 --jobs 2
    OMP_NUM_THREADS=1 python bench/bench_gain.py --out /tmp/flp/gain --baselines /tmp/g24 \\
        --labeled 2 --seeds 0 1 2 --test-cases 24 --unlabeled 12 --arms supervised+pairs \\
        --synthetic '/tmp/flp/n{labeled}_s{seed}/samples' --jobs 2 --set deepatlas.seg_augment=true

``--gain-out`` is a ``bench_gain.py`` OUT (its ``data/pool`` and ``sets/``; run that first, or give
the same ``--unlabeled``/``--val-cases`` it used). A stage whose output exists is reused, so a
killed run continues. Writes ``OUT/fewlabel_pairs.json``: per split, the training-set sizes, the
stage seconds and ``sample``'s plausible count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gain import job_threads, parse_sets, subset  # noqa: E402  (the sibling script)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gain-out", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labeled", type=int, nargs="+", default=[2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-cases", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=1, help="generators trained at once")
    return parser.parse_args(argv)


def generator_set(gain_out: Path, out: Path, n: int, seed: int, val_cases: int) -> dict:
    """A preprocessed set for one split's generator: labels only on the cases its segmenter trains
    on, its validation cases left out, every unlabeled phantom as an image."""
    from bladdergen.data.dataset import PreprocessedSet
    from bladdergen.deepatlas.pools import split_labeled

    pool = gain_out / "data" / "pool"
    split_set = subset(pool, gain_out / "sets" / f"n{n}_s{seed}", n, val_cases, seed)
    training, validation = split_labeled(PreprocessedSet.open(split_set), val_cases, seed)
    manifest = json.loads((split_set / "manifest.json").read_text())
    cases = []
    for case in manifest["cases"]:
        if case["case_id"] in validation:
            continue
        entry = dict(case)
        for key in ("image", "label"):
            if entry.get(key):
                target = out / entry[key]
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.is_symlink():
                    target.symlink_to((split_set / entry[key]).resolve())
        if case["case_id"] not in training:
            entry["label"] = None
        cases.append(entry)
    (out / "manifest.json").write_text(json.dumps({**manifest, "cases": cases}, indent=1))
    if (split_set / "config.yaml").is_file():
        (out / "config.yaml").write_text((split_set / "config.yaml").read_text())
    labeled = sum(1 for c in cases if c.get("label"))
    return {"labeled": labeled, "images": len(cases), "labeled_cases": training}


def train_generator(job: dict) -> dict:
    """One split: its set, VQ-GAN, LDM and samples (each stage skipped when already done)."""
    import torch

    from bladdergen.config import load_config
    from bladdergen.diffusion.sample import sample_volumes
    from bladdergen.diffusion.train import train_ldm
    from bladdergen.vqgan.train import train_vqgan

    torch.set_num_threads(job["threads"])
    home: Path = job["home"]
    config = load_config(job["profile"], overrides={**job["overrides"], "seed": job["seed"]})
    sizes = generator_set(job["gain_out"], home / "train", job["n"], job["seed"], job["val_cases"])
    seconds = {}
    stages = (
        (
            "vqgan",
            lambda: train_vqgan(config.vqgan, home / "train", home / "vqgan", seed=job["seed"]),
        ),
        (
            "ldm",
            lambda: train_ldm(
                config.ldm, home / "train", home / "ldm", home / "vqgan", seed=job["seed"]
            ),
        ),
    )
    for name, stage in stages:
        if not (home / name / "model.safetensors").is_file():
            started = time.perf_counter()
            stage()
            seconds[name] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    sampled = sample_volumes(config, home / "ldm", home / "samples", job["samples"])
    seconds["sample"] = round(time.perf_counter() - started, 1)
    return {
        "key": f"{job['n']}/{job['seed']}",
        **sizes,
        "seconds": seconds,
        "samples": sampled["complete"],
        "plausible": sampled["plausible"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = parse_sets(args.set)
    threads = job_threads(args.jobs)
    jobs = [
        {
            "n": n,
            "seed": seed,
            "home": args.out / f"n{n}_s{seed}",
            "gain_out": args.gain_out,
            "val_cases": args.val_cases,
            "samples": args.samples,
            "profile": args.profile,
            "overrides": overrides,
            "threads": threads,
        }
        for n in args.labeled
        for seed in args.seeds
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for done in pool.map(train_generator, jobs):
            results[done["key"]] = done
            print(json.dumps(done), flush=True)
    (args.out / "fewlabel_pairs.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
