"""Commands: train-ldm, sample."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bladdergen.cli.app import app
from bladdergen.cli.common import (
    ConfigOption,
    DeviceOption,
    JsonOption,
    ProfileOption,
    QuietOption,
    ResumeOption,
    RichReporter,
    RunSeedOption,
    emit_result,
    handle_errors,
)


@app.command("train-ldm")
@handle_errors
def train_ldm_command(
    data_dir: Annotated[
        Path, typer.Argument(help="Preprocessed set (a `bladdergen preprocess` output folder).")
    ],
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder for config, checkpoints, logs and latent cache.")
    ],
    vqgan: Annotated[
        Path,
        typer.Option(
            "--vqgan", help="Trained VQ-GAN: a `train-vqgan` run folder or .safetensors file."
        ),
    ],
    config: ConfigOption = None,
    profile: ProfileOption = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Optimiser steps to train in total.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Latents per micro-batch (per process).")
    ] = None,
    seed: RunSeedOption = None,
    resume: ResumeOption = False,
    device: DeviceOption = None,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Train the latent diffusion model (pseudo-3D U-Net DDPM) on a frozen VQ-GAN's latents.

    The preprocessed set is encoded once (cached in RUN_DIR/latents), scaled to [-1, 1] with the
    codebook's range, and the denoiser learns to predict the noise. Works under torchrun (DDP).
    """
    from bladdergen.config import load_config
    from bladdergen.diffusion.train import train_ldm
    from bladdergen.runtime import stop_runtime

    resolved = load_config(
        profile,
        config,
        {
            "ldm.max_steps": max_steps,
            "ldm.batch_size": batch_size,
            "ldm.device": device,
            "seed": seed,
        },
    )
    reporter = RichReporter(quiet)
    try:
        result = train_ldm(
            resolved.ldm,
            data_dir,
            run_dir,
            vqgan,
            seed=resolved.seed,
            resume=resume,
            reporter=reporter,
        )
    finally:
        reporter.stop()
        stop_runtime()
    emit_result(result, json_output, quiet, "train-ldm finished")


@app.command("sample")
@handle_errors
def sample_command(
    n: Annotated[int, typer.Option("-n", "--num-samples", help="Number of volumes to generate.")],
    ldm: Annotated[
        Path, typer.Option("--ldm", help="Trained LDM: a `train-ldm` run folder or .safetensors.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if needed).")],
    sampler: Annotated[
        str | None,
        typer.Option(
            "--sampler",
            help="ddim (fast; with sample.eta 1, the default, it adds noise at each step, 0 is "
            "deterministic) or ddpm (ancestral, as in the paper).",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            help="Denoising steps (default 50; ddpm with the training T = 300 is the paper).",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Base seed; sample i's seed derives from it and i.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Volumes denoised together (per process).")
    ] = None,
    vqgan: Annotated[
        Path | None,
        typer.Option(
            "--vqgan", help="VQ-GAN to decode with, if it moved (must be the one trained with)."
        ),
    ] = None,
    previews: Annotated[
        bool | None,
        typer.Option("--previews/--no-previews", help="Write a PNG slice montage per volume."),
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option(
            "--layout",
            help="bladdergen (images + labels/) or nnunet (imagesTr/, labelsTr/, dataset.json: "
            "nnU-Net v2 trains on the synthetic pairs directly).",
        ),
    ] = None,
    keep: Annotated[
        str | None,
        typer.Option(
            "--keep",
            help="all, or plausible: only samples whose generated label map passes every anatomy "
            "check; -n then counts kept samples, rejected seeds are listed in the manifest.",
        ),
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    device: DeviceOption = None,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Generate new 3D CT volumes (NIfTI, int16 HU) from a trained latent diffusion model.

    Reproducible and resumable: sample i depends only on --seed and i, finished files are skipped,
    and OUT/manifest.json lists every sample with its seed, sampler, steps and checkpoint hash.
    With a VQ-GAN whose label decoder was trained, every CT comes with its label map and anatomy
    checks. Works under torchrun (indices split across processes, identical files).
    """
    from bladdergen.config import load_config
    from bladdergen.diffusion.sample import sample_volumes
    from bladdergen.runtime import stop_runtime

    resolved = load_config(
        profile,
        config,
        {
            "sample.sampler": sampler,
            "sample.steps": steps,
            "sample.batch_size": batch_size,
            "sample.previews": previews,
            "sample.layout": layout,
            "sample.keep": keep,
            "sample.device": device,
            "seed": seed,
        },
    )
    reporter = RichReporter(quiet)
    try:
        result = sample_volumes(resolved, ldm, out, n, vqgan_path=vqgan, reporter=reporter)
    finally:
        reporter.stop()
        stop_runtime()
    emit_result(result, json_output, quiet, "sample finished")
