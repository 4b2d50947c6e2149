"""Commands: train-deepatlas, segment."""

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
    parse_range,
)


@app.command("train-deepatlas")
@handle_errors
def train_deepatlas_command(
    data_dir: Annotated[
        Path, typer.Argument(help="Preprocessed set (from `bladdergen preprocess`) with labels.")
    ],
    run_dir: Annotated[Path, typer.Argument(help="Run folder to write (checkpoints, logs).")],
    unlabeled: Annotated[
        list[Path] | None,
        typer.Option(
            "--unlabeled",
            "-u",
            help="Unlabeled real scans: a preprocessed set or a folder of NIfTI/DICOM volumes "
            "(repeatable). DATA_DIR's own unlabeled cases are always used.",
        ),
    ] = None,
    synthetic: Annotated[
        Path | None,
        typer.Option(
            "--synthetic",
            "-s",
            help="Synthetic volumes from `bladdergen sample` (HU NIfTI), preprocessed like DATA_DIR.",
        ),
    ] = None,
    synthetic_pairs: Annotated[
        bool | None,
        typer.Option(
            "--synthetic-pairs/--no-synthetic-pairs",
            help="Take --synthetic samples whose generated label map passed `sample`'s checks as "
            "labeled cases (deepatlas.synthetic_pairs; off by default: every synthetic volume is "
            "an unlabeled image).",
        ),
    ] = None,
    supervised_only: Annotated[
        bool,
        typer.Option(
            "--supervised-only",
            help="Baseline: the segmentation net alone on the labeled cases, for as many updates "
            "as it gets in the DeepAtlas schedule; no registration, no unlabeled data.",
        ),
    ] = False,
    from_baseline: Annotated[
        Path | None,
        typer.Option(
            "--from-baseline",
            help="Run folder of the `--supervised-only` baseline of the same data, seed and "
            "settings: DeepAtlas takes its state after deepatlas.seg_pretrain_steps updates "
            "instead of repeating them (the same result, minus the supervised pre-training).",
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps", help="Total optimiser steps of both networks (schedule length)."
        ),
    ] = None,
    seed: RunSeedOption = None,
    resume: ResumeOption = False,
    device: DeviceOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Train DeepAtlas: joint registration and segmentation of bladder wall and tumor with few
    labels, unlabeled scans and synthetic volumes (or the supervised-only baseline)."""
    from bladdergen.config import load_config
    from bladdergen.deepatlas.train import train_deepatlas
    from bladdergen.runtime import stop_runtime

    overrides = {
        "seed": seed,
        "deepatlas.max_steps": max_steps,
        "deepatlas.device": device,
        "deepatlas.synthetic_pairs": synthetic_pairs,
    }
    resolved = load_config(profile, config, overrides)
    reporter = RichReporter(quiet)
    try:
        result = train_deepatlas(
            resolved.deepatlas,
            data_dir,
            run_dir,
            seed=resolved.seed,
            unlabeled_dirs=list(unlabeled or []),
            synthetic_dir=synthetic,
            supervised_only=supervised_only,
            from_baseline=from_baseline,
            resume=resume,
            reporter=reporter,
        )
    finally:
        reporter.stop()
        stop_runtime()
    emit_result(result, json_output, quiet, "train-deepatlas finished")


@app.command("segment")
@handle_errors
def segment_command(
    model_run: Annotated[
        Path,
        typer.Argument(help="A train-deepatlas run folder (best checkpoint used) or .safetensors."),
    ],
    in_path: Annotated[
        Path,
        typer.Argument(help="A NIfTI/.mha/.nrrd file, a DICOM series folder, or a folder of them."),
    ],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the label maps (<name>.nii.gz).")],
    classes: Annotated[
        bool,
        typer.Option(
            "--classes",
            help="Write class indices 0/1/2 instead of the dataset's label values (0/255/128).",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing label maps in OUT_DIR.")
    ] = False,
    z_range: Annotated[
        str | None,
        typer.Option(
            "--z-range",
            help="Segment only the slab LOW:HIGH of each scan (world z in mm, or slices with "
            "--z-unit slices); background elsewhere. Write negative values as --z-range=-120:-20.",
        ),
    ] = None,
    z_unit: Annotated[
        str | None, typer.Option("--z-unit", help="Unit of --z-range: mm (default) or slices.")
    ] = None,
    all_components: Annotated[
        bool,
        typer.Option(
            "--all-components",
            help="Keep every predicted island (default: only the largest connected bladder).",
        ),
    ] = False,
    device: DeviceOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Segment bladder wall and tumor in CT scans; label maps keep each input's geometry and
    slice count. Only the largest connected bladder component is kept unless --all-components.

    Preprocessing and network come from the checkpoint; --config/--profile only set
    `deepatlas.device` and `deepatlas.sw_overlap` (sliding-window overlap).
    """
    from bladdergen.deepatlas.segment import segment_paths

    overlap = None
    if config is not None or profile is not None:
        from bladdergen.config import load_config

        resolved = load_config(profile, config, {"deepatlas.device": device})
        device, overlap = resolved.deepatlas.device, resolved.deepatlas.sw_overlap
    reporter = RichReporter(quiet)
    try:
        result = segment_paths(
            model_run,
            in_path,
            out_dir,
            device=device or "auto",
            label_values=not classes,
            overwrite=overwrite,
            overlap=overlap,
            z_range=parse_range("--z-range", z_range),
            z_range_unit=z_unit,
            all_components=all_components,
            reporter=reporter,
        )
    finally:
        reporter.stop()
    emit_result(result, json_output, quiet, "segment finished")
