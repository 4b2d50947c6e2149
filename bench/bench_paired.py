"""Paired generation on phantoms (tiny profile, CPU): does `sample` make usable training pairs?

One run of the generation half of the pipeline, the way a lab would run it:

    phantoms (16 training: 6 labeled + 10 unlabeled; 8 held-out test) -> preprocess (tiny)
    -> train-vqgan (label decoder on) -> a supervised segmenter trained on the real training
       cases only (with ``seg_augment``) -> reconstruct the held-out cases (per-structure HU
       errors against trilinear down/up-sampling; the segmenter's wall Dice on the inputs, the
       reconstructions and against the decoded labels) -> train-ldm -> sample -n N (images +
       label maps + checks) -> evaluate gen (HU W1, adjacent-slice SSIM, MS-SSIM near-copies;
       generated labels' plausibility; the segmenter's Dice on the generated images against the
       generated labels)

and the issue's goals beside the measured numbers. Writes ``bench_paired.json`` and
``bench_paired.md`` into ``--out``; a stage whose output is already there is reused, so a killed
run continues.

    OMP_NUM_THREADS=1 python bench/bench_paired.py --out /tmp/bench_paired --samples 200

``--set KEY=VALUE`` overrides a tiny-profile setting, e.g. ``--set sample.noise=none``; to compare
sampling settings on the same models, copy ``train``, ``test``, ``vqgan``, ``segmenter`` and
``ldm`` of one run into a new ``--out`` (their stages are then reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

from bladdergen.checkpoint import read_metadata
from bladdergen.config import load_config
from bladdergen.fileio import atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gain import parse_sets  # noqa: E402  (the sibling script)


def _timed(name: str, seconds: dict, fn):
    started = time.perf_counter()
    result = fn()
    seconds[name] = round(time.perf_counter() - started, 1)
    return result


def run(out: Path, samples: int, seed: int, sets: list[str] | None = None) -> dict:
    from bladdergen.data.phantom import generate_phantoms
    from bladdergen.data.preprocess_run import preprocess_folder
    from bladdergen.deepatlas.train import train_deepatlas
    from bladdergen.diffusion.sample import sample_volumes
    from bladdergen.diffusion.train import train_ldm
    from bladdergen.evaluate.anatomy import load_segmenter
    from bladdergen.evaluate.gen import evaluate_generation
    from bladdergen.vqgan.reconstruct import reconstruct_set
    from bladdergen.vqgan.train import train_vqgan

    config = load_config("tiny", overrides={"seed": seed, **parse_sets(sets or [])})
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    if not (out / "raw_test/images").is_dir():
        _timed(
            "phantoms",
            seconds,
            lambda: (
                generate_phantoms(out / "raw_train", n=16, seed=seed, size=128, unlabeled=10),
                generate_phantoms(out / "raw_test", n=8, seed=seed + 10_000, size=128),
            ),
        )
    for name in ("train", "test"):
        if not (out / name / "manifest.json").is_file():
            _timed(
                f"preprocess_{name}",
                seconds,
                lambda name=name: preprocess_folder(
                    out / f"raw_{name}", out / name, config.preprocess, overwrite=True
                ),
            )
    if not (out / "vqgan/model.safetensors").is_file():
        _timed(
            "train_vqgan",
            seconds,
            lambda: train_vqgan(config.vqgan, out / "train", out / "vqgan", seed=seed),
        )
    if not (out / "segmenter/model.safetensors").is_file():
        # augmented, so that the score reads whether the image shows its label, not whether a
        # segmenter that has seen 13 cases at one intensity survives a 10 HU shift
        judge = dataclasses.replace(config.deepatlas, seg_augment=True)
        _timed(
            "train_segmenter",
            seconds,
            lambda: train_deepatlas(
                judge, out / "train", out / "segmenter", seed=seed, supervised_only=True
            ),
        )
    segmenter = load_segmenter(out / "segmenter", "cpu", config.preprocess.window)
    recon = _timed(
        "reconstruct",
        seconds,
        lambda: reconstruct_set(out / "vqgan", out / "test", device="cpu", segmenter=segmenter),
    )
    if not (out / "ldm/model.safetensors").is_file():
        _timed(
            "train_ldm",
            seconds,
            lambda: train_ldm(config.ldm, out / "train", out / "ldm", out / "vqgan", seed=seed),
        )
    sampled = _timed(
        "sample", seconds, lambda: sample_volumes(config, out / "ldm", out / "samples", samples)
    )
    gen = _timed(
        "evaluate_gen",
        seconds,
        lambda: evaluate_generation(
            out / "samples",
            out / "train",
            out / "evaluate_gen",
            config.evaluate,
            segmenter=segmenter,
            seed=seed,
        ),
    )
    summary = json.loads((out / "evaluate_gen/gen_summary.json").read_text())
    w1_real = summary["appearance"]["histogram"].get("real_leave_one_out_wasserstein_hu")
    return {
        "command": f"OMP_NUM_THREADS=1 python bench/bench_paired.py --out {out} --samples {samples}"
        + "".join(f" --set {item}" for item in sets or []),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "samples": samples,
        "seconds": seconds,
        "reconstruction_heldout": recon["structures"],
        "reconstruction_psnr": {"vqgan": recon["psnr"], "trilinear": recon["trilinear_psnr"]},
        "sampling": {
            k: sampled[k] for k in ("complete", "labels", "plausible", "seconds_per_volume")
        },
        "sample_noise": config.sample.noise,
        "noise_model": read_metadata(out / "ldm/model.safetensors").get("noise_model"),
        "paired_labels": gen["paired_labels"],
        "hu_wasserstein": gen["hu_wasserstein"],
        "hu_wasserstein_real_to_real": w1_real,
        "slice_ssim": gen["slice_ssim"],
        "near_copies": gen["near_copies"],
        "ms_ssim": gen["ms_ssim"],
    }


def markdown(result: dict) -> str:
    def f(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    paired = result["paired_labels"] or {}
    plausible = paired.get("plausible_fraction")
    slice_ssim = result["slice_ssim"]
    ratio = slice_ssim["synthetic"] / slice_ssim["real"] - 1 if slice_ssim.get("real") else None
    structures = result["reconstruction_heldout"]
    rows = [
        "| measure | measured | goal |",
        "|---|---|---|",
        f"| samples passing the anatomy check (of {result['samples']}) | {f(plausible, 3)} | ≥ 0.80 |",
        f"| segmenter (real cases only) wall Dice vs generated labels | {f(paired.get('segmenter_dice_wall'))} | ≥ 0.6 |",
        f"| segmenter tumor Dice vs generated labels | {f(paired.get('segmenter_dice_tumor'))} | — |",
        f"| HU W1 inside the body, synthetic vs real (HU) | {f(result['hu_wasserstein'], 1)} | ≤ 1.5x real leave-one-out ({f(result['hu_wasserstein_real_to_real'], 1)}) |",
        f"| adjacent-slice SSIM synthetic / real | {f(slice_ssim['synthetic'])} / {f(slice_ssim['real'])} ({f(ratio and 100 * ratio, 1)} %) | within 5 % |",
        f"| near-copies of training cases | {result['near_copies']} | 0 |",
        f"| held-out wall mean abs HU error, VQ-GAN / trilinear | {f(structures.get('wall_hu_error'), 1)} / {f(structures.get('trilinear_wall_hu_error'), 1)} | VQ-GAN lower |",
        f"| held-out tumor mean abs HU error, VQ-GAN / trilinear | {f(structures.get('tumor_hu_error'), 1)} / {f(structures.get('trilinear_tumor_hu_error'), 1)} | VQ-GAN lower |",
        f"| held-out tumor-to-urine contrast kept, VQ-GAN / trilinear | {f(structures.get('tumor_urine_contrast_kept'), 2)} / {f(structures.get('trilinear_tumor_urine_contrast_kept'), 2)} | near 1 |",
        f"| label decoder Dice on held-out cases, wall / tumor | {f(structures.get('label_dice_wall'))} / {f(structures.get('label_dice_tumor'))} | — |",
        f"| label decoder maps of held-out *real* latents passing the anatomy check (true maps) | {f(structures.get('label_plausible'), 2)} ({f(structures.get('label_plausible_truth'), 2)}) | the ceiling for samples |",
        f"| segmenter wall Dice on held-out inputs / their reconstructions / against the decoded labels | {f(structures.get('segmenter_dice_wall_input'))} / {f(structures.get('segmenter_dice_wall'))} / {f(structures.get('segmenter_dice_wall_decoded'))} | the last: the ceiling for the paired-label score |",
    ]
    return "\n".join(
        [
            f"Command: `{result['command']}` ({result['machine']}); stage seconds: {result['seconds']}",
            "",
            f"Sample noise: {result['sample_noise']}; the LDM's noise model: {result['noise_model']}",
            "",
            *rows,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    result = run(args.out, args.samples, args.seed, args.set)
    atomic_write_json(args.out / "bench_paired.json", result)
    atomic_write_text(args.out / "bench_paired.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
