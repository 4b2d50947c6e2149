"""Command: demo (the whole pipeline on the embedded phantoms)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bladdergen.cli.app import app
from bladdergen.cli.common import (
    ConfigOption,
    DeviceOption,
    JsonOption,
    QuietOption,
    RichReporter,
    emit_result,
    handle_errors,
)


@app.command("demo")
@handle_errors
def demo(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder for every artefact (created; reused to resume).")
    ] = Path("runs/demo"),
    profile: Annotated[
        str,
        typer.Option(
            "--profile", "-p", help="tiny (CPU, 15-23 min on 2 cores) or paper (24 GB GPU)."
        ),
    ] = "tiny",
    config: ConfigOption = None,
    from_stage: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Rerun from this stage: phantom, preprocess, train-vqgan, train-ldm, sample, "
            "train-baseline, train-deepatlas, segment, evaluate.",
        ),
    ] = None,
    train_cases: Annotated[int, typer.Option(help="Training phantoms.", min=3)] = 18,
    unlabeled_cases: Annotated[
        int, typer.Option(help="How many training phantoms have no label.", min=0)
    ] = 10,
    test_cases: Annotated[int, typer.Option(help="Held-out labeled test phantoms.", min=1)] = 16,
    size: Annotated[
        int, typer.Option(help="In-plane size of the phantoms (voxels).", min=32)
    ] = 128,
    synthetic: Annotated[int, typer.Option(help="Volumes to generate.", min=1)] = 16,
    seed: Annotated[int | None, typer.Option(help="Seed of the whole run.")] = None,
    device: DeviceOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Run the paper's pipeline on phantoms: phantom -> preprocess -> train-vqgan -> train-ldm ->
    sample -> the supervised baseline -> train-deepatlas (from the baseline's pre-training)
    -> segment -> evaluate.

    Ends with RUN_DIR/report.md (segmentation table, generation metrics, PNG montages). Finished
    stages are skipped on a rerun, so an interrupted demo resumes; --from reruns from a stage.
    """
    from bladdergen.config import load_config
    from bladdergen.errors import InputError
    from bladdergen.pipeline.demo import DEMO_DEFAULTS, DemoPlan, run_demo

    if unlabeled_cases > train_cases - 3:
        raise InputError(
            f"--unlabeled-cases: got {unlabeled_cases}, expected at most {train_cases - 3} "
            f"(at least 3 labeled training phantoms: training and validation)"
        )
    overrides = {"seed": seed}
    for section in ("vqgan", "ldm", "sample", "deepatlas"):
        overrides[f"{section}.device"] = device
    settings = load_config(profile, config, overrides=overrides, defaults=DEMO_DEFAULTS)
    plan = DemoPlan(
        train_cases=train_cases,
        unlabeled_cases=unlabeled_cases,
        test_cases=test_cases,
        phantom_size=size,
        synthetic_volumes=synthetic,
    )
    reporter = RichReporter(quiet)
    try:
        result = run_demo(run_dir, settings, plan, from_stage=from_stage, reporter=reporter)
    finally:
        reporter.stop()
    emit_result(result, as_json, quiet, f"demo finished: see {result['report']}")
