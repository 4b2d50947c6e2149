"""Commands: phantom, preprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bladdergen.cli.app import app
from bladdergen.cli.common import (
    ConfigOption,
    JsonOption,
    ProfileOption,
    QuietOption,
    RichReporter,
    emit_result,
    handle_errors,
    parse_range,
)


@app.command("phantom")
@handle_errors
def phantom(
    out_dir: Annotated[
        Path, typer.Argument(help="New folder for images/, labels/ and phantoms.json.")
    ],
    n: Annotated[
        int | None, typer.Option("-n", "--cases", help="Number of cases (phantom.cases: 24).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed: the same seed gives identical files.")
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            help="In-plane voxels (phantom.size: 512 like the paper, 128 in the tiny profile). "
            "The field of view stays ~300-460 mm, so spacing grows as size shrinks.",
        ),
    ] = None,
    unlabeled: Annotated[
        int | None,
        typer.Option("--unlabeled", help="Leave the last K cases without a label file."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace phantoms already in OUT_DIR.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", help="Parallel processes (same files for any count)."),
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Generate procedural pelvic CT phantoms (HU, int16 NIfTI) with bladder wall/tumor labels.

    Labels: 0 background, 255 bladder wall, 128 tumor.

    18-32 slices, 0.6-0.9 mm in-plane (at 512) and 3-5 mm between slices, as in clinical CT.

    The output is what `bladdergen preprocess` reads.
    """
    from bladdergen.config import load_config, write_config
    from bladdergen.data.phantom import generate_phantoms

    overrides = {
        "seed": seed,
        "phantom.cases": n,
        "phantom.size": size,
        "phantom.unlabeled": unlabeled,
        "phantom.workers": workers,
    }
    settings = load_config(profile, config, overrides=overrides)
    reporter = RichReporter(quiet)
    try:
        result = generate_phantoms(
            out_dir,
            n=settings.phantom.cases,
            seed=settings.seed,
            size=settings.phantom.size,
            unlabeled=settings.phantom.unlabeled,
            overwrite=overwrite,
            workers=settings.phantom.workers,
            reporter=reporter,
        )
    finally:
        reporter.stop()
    write_config(settings, out_dir)
    emit_result(result, as_json, quiet, "phantoms written")


@app.command("preprocess")
@handle_errors
def preprocess(
    in_dir: Annotated[
        Path,
        typer.Argument(
            help="Input: a folder with images/ (+ labels/) or nnU-Net imagesTr/ labelsTr/ "
            "imagesTs/ (dataset.json labels honoured); a folder of volumes; one volume file; "
            "or one DICOM series folder. Images are NIfTI, MHA/NRRD or DICOM series."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="Output folder (outside IN_DIR) for the preprocessed set.")
    ],
    profile: ProfileOption = None,
    config: ConfigOption = None,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", help="Parallel processes over cases.")
    ] = None,
    depth_policy: Annotated[
        str | None,
        typer.Option(
            "--depth-policy",
            help="Slice-count normalisation: paper (pad with last / remove evenly spaced), "
            "resample or crop.",
        ),
    ] = None,
    target_depth: Annotated[
        int | None, typer.Option("--target-depth", help="Axial slices after the depth policy.")
    ] = None,
    z_range: Annotated[
        str | None,
        typer.Option(
            "--z-range",
            help="Keep only the slab LOW:HIGH before the depth policy (e.g. the bladder of a long "
            "scan): world z in mm (RAS, inferior to superior), or slice indices with "
            "--z-unit slices. Write negative values as --z-range=-120:-20.",
        ),
    ] = None,
    z_unit: Annotated[
        str | None, typer.Option("--z-unit", help="Unit of --z-range: mm (default) or slices.")
    ] = None,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad", help="Set bad cases aside (listed under 'rejected' in the manifest)."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder.")
    ] = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Turn a folder of CT scans into a normalised training set (manifest.json + NIfTI).

    Per case: read, reorient (RAS), resample in-plane, depth policy, HU window -> [-1, 1].

    Labels 0/255/128 become classes 0/1/2 (background/wall/tumor).

    A bad case stops the run (exit 2) with nothing written, unless --skip-bad.

    Re-running with the same inputs and settings does nothing unless --overwrite.
    """
    from bladdergen.config import config_to_yaml, load_config
    from bladdergen.data.preprocess_run import preprocess_folder

    resolved = load_config(
        profile,
        config,
        overrides={
            "preprocess.workers": workers,
            "preprocess.depth_policy": depth_policy,
            "preprocess.target_depth": target_depth,
            "preprocess.z_range": parse_range("--z-range", z_range),
            "preprocess.z_range_unit": z_unit,
        },
    )
    reporter = RichReporter(quiet)
    try:
        result = preprocess_folder(
            in_dir,
            out_dir,
            resolved.preprocess,
            skip_bad=skip_bad,
            overwrite=overwrite,
            config_yaml=config_to_yaml(resolved),
            reporter=reporter,
        )
    finally:
        reporter.stop()
    title = "already up to date (nothing done)" if result["skipped"] else "preprocessed"
    emit_result(result, as_json, quiet, title)
