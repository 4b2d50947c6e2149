"""Commands: train-vqgan, reconstruct."""

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


@app.command("train-vqgan")
@handle_errors
def train_vqgan_command(
    data_dir: Annotated[
        Path, typer.Argument(help="Preprocessed set (a `bladdergen preprocess` output folder).")
    ],
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder for config, checkpoints, metrics and previews.")
    ],
    config: ConfigOption = None,
    profile: ProfileOption = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Optimiser steps to train in total.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Volumes per micro-batch (per process).")
    ] = None,
    seed: RunSeedOption = None,
    resume: ResumeOption = False,
    device: DeviceOption = None,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Train the 3D VQ-GAN (stage 1) that compresses CT volumes into a codebook latent.

    Writes RUN_DIR/config.yaml, model.safetensors (weights + metadata), training_state.pt (for
    --resume), metrics.jsonl and images/step_*.png. Works under torchrun (DDP).
    """
    from bladdergen.config import load_config
    from bladdergen.runtime import stop_runtime
    from bladdergen.vqgan.train import train_vqgan

    resolved = load_config(
        profile,
        config,
        {
            "vqgan.max_steps": max_steps,
            "vqgan.batch_size": batch_size,
            "vqgan.device": device,
            "seed": seed,
        },
    )
    reporter = RichReporter(quiet)
    try:
        result = train_vqgan(
            resolved.vqgan,
            data_dir,
            run_dir,
            seed=resolved.seed,
            resume=resume,
            reporter=reporter,
        )
    finally:
        reporter.stop()
        stop_runtime()
    emit_result(result, json_output, quiet, "train-vqgan finished")


@app.command("reconstruct")
@handle_errors
def reconstruct_command(
    vqgan: Annotated[
        Path,
        typer.Argument(help="Trained VQ-GAN: a `train-vqgan` run folder or .safetensors file."),
    ],
    data_dir: Annotated[
        Path, typer.Argument(help="Preprocessed set to encode and decode (e.g. held-out cases).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for reconstructions (images/<case>.nii.gz) and reconstruct.json.",
        ),
    ] = None,
    seg_model: Annotated[
        Path | None,
        typer.Option(
            "--seg-model",
            help="train-deepatlas run folder or checkpoint trained on real cases: its wall Dice "
            "on the inputs, on the reconstructions and against the decoded labels.",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Encode and decode a preprocessed set: PSNR, SSIM and codebook usage of the VQ-GAN.

    Also reports a baseline: down- and up-sampling of each volume by the VQ-GAN's own factors
    (trilinear both ways, and box average down + trilinear up). Per-case values with --json.
    """
    from bladdergen.data.config import PreprocessConfig
    from bladdergen.evaluate.anatomy import load_segmenter
    from bladdergen.vqgan.reconstruct import reconstruct_set

    segmenter = None
    if seg_model is not None:  # its checkpoint records its window; checked against the set's
        segmenter = load_segmenter(seg_model, device, PreprocessConfig().window)
    reporter = RichReporter(quiet)
    try:
        result = reconstruct_set(
            vqgan, data_dir, device=device, out_dir=out, reporter=reporter, segmenter=segmenter
        )
    finally:
        reporter.stop()
    if not json_output:
        result = {k: v for k, v in result.items() if k != "cases"}
    emit_result(result, json_output, quiet, "reconstruct finished")
