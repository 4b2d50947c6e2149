"""Commands: evaluate seg | gen | reader-study export | reader-study score."""

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
    RichReporter,
    emit_result,
    handle_errors,
)

evaluate_app = typer.Typer(
    help=(
        "Score segmentations (Dice, HD95, ASD in mm), judge generated volumes on the paper's three "
        "reading axes (appearance, slice consistency, anatomy) plus diversity, and run a blinded "
        "reader study."
    ),
    no_args_is_help=True,
)
reader_app = typer.Typer(
    help="Blinded reader study: export a shuffled real/synthetic mix, then score filled sheets.",
    no_args_is_help=True,
)
evaluate_app.add_typer(reader_app, name="reader-study")
app.add_typer(evaluate_app, name="evaluate")

SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed", help="Seed for the bootstrap / pair sampling / shuffling (default: config)."
    ),
]


@evaluate_app.command("seg")
@handle_errors
def seg(
    pred: Annotated[
        list[Path],
        typer.Option(
            "--pred",
            help="Folder of predicted label maps (NIfTI, file name = case id). Repeat to compare "
            "several sets; the first is the reference for paired differences.",
        ),
    ],
    truth: Annotated[
        Path,
        typer.Option(
            "--truth",
            help="Folder of reference label maps (0/128/255 or 0/1/2), or a preprocessed set.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the CSV, JSON and report.")],
    seed: SeedOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Score label maps: Dice, HD95 and surface distance (mm), volume difference.

    Per case and class (wall, tumor), with both empty / one empty handled explicitly; several
    --pred sets get paired differences against the first with a seeded bootstrap CI. Label values
    0/128/255 and 0/1/2 are both accepted and reported. Writes OUT/seg_cases.csv, OUT/seg_summary.json and OUT/seg_report.md.
    """
    from bladdergen.config import load_config, write_config
    from bladdergen.evaluate.seg import evaluate_segmentation

    settings = load_config(profile, config, overrides={"seed": seed})
    reporter = RichReporter(quiet)
    try:
        result = evaluate_segmentation(
            pred, truth, out, settings.evaluate, seed=settings.seed, reporter=reporter
        )
    finally:
        reporter.stop()
    write_config(settings, out)
    emit_result(result, as_json, quiet, "segmentation evaluated")


@evaluate_app.command("gen")
@handle_errors
def gen(
    synthetic: Annotated[
        Path, typer.Option("--synthetic", help="Folder of generated HU NIfTI volumes (`sample`).")
    ],
    real: Annotated[
        Path,
        typer.Option("--real", help="Folder of real HU NIfTI volumes, or a preprocessed set."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report and figures.")],
    seg_model: Annotated[
        Path | None,
        typer.Option(
            "--seg-model",
            help="train-deepatlas run folder or checkpoint: enables the anatomy check and the "
            "network-feature distance.",
        ),
    ] = None,
    seed: SeedOption = None,
    device: DeviceOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Judge generated volumes against real ones on the paper's three reading axes.

    Appearance: HU histogram and texture distribution distances (MMD, Fréchet); slice
    consistency: adjacent-slice SSIM/NCC; anatomy: bladder plausibility (needs --seg-model);
    diversity: MS-SSIM within each set and each synthetic volume's nearest real (near-copies).
    Writes OUT/gen_report.md with PNG montages and plots, OUT/gen_summary.json, OUT/gen_volumes.csv.
    """
    from bladdergen.config import load_config, write_config
    from bladdergen.evaluate.anatomy import load_segmenter
    from bladdergen.evaluate.gen import evaluate_generation

    settings = load_config(profile, config, overrides={"seed": seed, "deepatlas.device": device})
    segmenter = None
    if seg_model is not None:
        segmenter = load_segmenter(seg_model, settings.deepatlas.device, settings.preprocess.window)
    reporter = RichReporter(quiet)
    try:
        result = evaluate_generation(
            synthetic,
            real,
            out,
            settings.evaluate,
            segmenter=segmenter,
            seed=settings.seed,
            reporter=reporter,
        )
    finally:
        reporter.stop()
    write_config(settings, out)
    emit_result(result, as_json, quiet, "generated volumes evaluated")


@reader_app.command("export")
@handle_errors
def reader_export(
    synthetic: Annotated[
        Path, typer.Option("--synthetic", help="Folder of generated HU NIfTI volumes.")
    ],
    real: Annotated[
        Path, typer.Option("--real", help="Folder of real HU NIfTI volumes, or a preprocessed set.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder to hand to the readers.")],
    n: Annotated[
        int | None,
        typer.Option("-n", help="Volumes per group (default: as many as the smaller group)."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Where to write the key (default: OUT-key.csv beside OUT)."),
    ] = None,
    seed: SeedOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Write a blinded, shuffled real/synthetic mix for expert readers, and its key.

    OUT gets cases/<id>.nii.gz (int16 HU, one grid and affine for all) and cases/<id>.png, a
    scoring sheet (sheet.csv) with the paper's three axes scored 1-4 and a real/synthetic guess,
    and README.md; the key goes to a separate file outside OUT."""
    from bladdergen.config import load_config
    from bladdergen.evaluate.reader_study import export_reader_study

    settings = load_config(profile, config, overrides={"seed": seed})
    reporter = RichReporter(quiet)
    try:
        result = export_reader_study(
            synthetic,
            real,
            out,
            settings.evaluate,
            n_per_group=n,
            key_path=key,
            seed=settings.seed,
            reporter=reporter,
        )
    finally:
        reporter.stop()
    emit_result(result, as_json, quiet, "reader study exported")


@reader_app.command("score")
@handle_errors
def reader_score(
    sheets: Annotated[
        list[Path], typer.Argument(help="Filled sheet CSV files (one or more readers).")
    ],
    key: Annotated[Path, typer.Option("--key", help="The key file written by export.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for the summary JSON and report.")
    ] = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Score filled reader sheets against the key.

    Mean score per axis for real vs synthetic volumes (Mann-Whitney p), and each reader's
    accuracy at telling them apart."""
    from bladdergen.evaluate.reader_study import score_reader_study

    summary = score_reader_study(sheets, key, out)
    result = {
        "readers": summary["readers"],
        "ratings": summary["ratings"],
        "mean_scores": {
            axis: {s: entry[s]["mean"] for s in ("real", "synthetic")}
            for axis, entry in summary["axes"].items()
        },
        "accuracy": summary["accuracy"]["overall"]["accuracy"],
    }
    if out is not None:
        result["out_dir"] = str(out)
    emit_result(result, as_json, quiet, "reader study scored")
