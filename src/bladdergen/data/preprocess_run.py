"""``bladdergen preprocess``: a lab's folder of CT scans -> a preprocessed set (manifest + NIfTI).

The run is all-or-nothing. Every case is processed (in parallel with ``workers`` processes) into
a hidden staging folder next to ``out_dir``; only when all cases succeeded (or, with ``skip_bad``,
were set aside) is the staging folder renamed onto ``out_dir``, ``manifest.json`` written last
inside it. A bad case without ``skip_bad`` removes the staging folder and raises InputError, so
nothing half-written is left. Inputs are only read.

A re-run with the same inputs (by SHA-256) and settings finds the same fingerprint in the
existing manifest and does nothing, unless ``overwrite``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bladdergen.data.config import PreprocessConfig
from bladdergen.data.dataset import CLASS_NAMES, MANIFEST_FORMAT, MANIFEST_NAME, PreprocessedSet
from bladdergen.data.inputs import (
    CaseProblem,
    InputCase,
    check_output_outside_input,
    discover_cases,
    nnunet_label_map,
)
from bladdergen.data.preprocess import prepare_image, prepare_label
from bladdergen.data.volumes import geometry_difference, read_volume, write_nifti
from bladdergen.errors import InputError
from bladdergen.fileio import atomic_write_json, atomic_write_text, sha256_file
from bladdergen.progress import SILENT, Reporter

MANIFEST_VERSION = 1
# An image and its label must agree on world positions to this fraction of a voxel.
GEOMETRY_TOLERANCE_VOXELS = 0.01


def preprocess_folder(
    in_dir: Path,
    out_dir: Path,
    config: PreprocessConfig,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    config_yaml: str | None = None,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Preprocess every case of ``in_dir`` into ``out_dir`` (layout: :mod:`bladdergen.data.dataset`).

    ``workers``: processes (default ``config.workers``). ``skip_bad``: set bad cases aside and
    list them under ``rejected`` in the manifest instead of failing. ``overwrite``: replace an
    existing output. ``config_yaml``: the resolved configuration, written as ``config.yaml``.
    Returns a summary: counts, rejected cases, seconds, and ``skipped`` True for a no-op re-run.
    Raises InputError for bad input (one line naming the file), leaving ``out_dir`` untouched.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    workers = config.workers if workers is None else workers
    if workers < 1:
        raise InputError(f"--workers: got {workers}, expected >= 1")
    check_output_outside_input(in_dir, out_dir)
    declared = nnunet_label_map(in_dir)
    if declared is not None and declared != config.label_map:
        # the dataset's own description of its label values wins over the generic default
        config = dataclasses.replace(config, label_map=declared)
        reporter.notice(f"{in_dir / 'dataset.json'}: label values -> classes {declared}")
    cases, problems = discover_cases(in_dir)
    if problems and not skip_bad:
        raise InputError(problems[0].error)
    if not cases:
        raise InputError(f"{in_dir}: every case was rejected, nothing to preprocess")

    settings = _settings(config)
    inputs = _hash_inputs(cases, reporter)
    fingerprint = _fingerprint(inputs, settings, [_problem_dict(p) for p in problems])
    existing = _existing_manifest(out_dir)
    if existing is not None and existing.get("fingerprint") == fingerprint and not overwrite:
        if existing.get("rejected") and not skip_bad:
            # the same inputs hold the same bad cases: fail as a fresh run would
            raise InputError(existing["rejected"][0]["error"])
        return _summary(existing, out_dir, skipped=True)
    if out_dir.exists() and not overwrite:
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()):
            what = "a preprocessed set from other inputs or settings" if existing else "files"
            raise InputError(
                f"{out_dir}: output folder already holds {what}, expected an empty or new folder "
                "(pass --overwrite to replace it)"
            )

    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    try:
        records, rejected = _run_cases(cases, inputs, config, staging, workers, skip_bad, reporter)
        rejected = [_problem_dict(p) for p in problems] + rejected
        if not records:
            raise InputError(f"{in_dir}: every case was rejected, nothing to preprocess")
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "window": [float(config.window[0]), float(config.window[1])],
            "label_map": {str(k): int(v) for k, v in sorted(config.label_map.items())},
            "classes": list(CLASS_NAMES),
            "target_shape": list(records[0]["steps"]["output"]["shape"]),
            "image_dtype": config.image_dtype,
            "settings": settings,
            "source_dir": str(in_dir.resolve()),
            "fingerprint": fingerprint,
            "cases": records,
            "rejected": sorted(rejected, key=lambda r: r["case_id"]),
        }
        if config_yaml is not None:
            atomic_write_text(staging / "config.yaml", config_yaml)
        atomic_write_json(staging / MANIFEST_NAME, manifest)
        _commit(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remove_stale_staging(out_dir)
    return _summary(manifest, out_dir, skipped=False)


# ----------------------------------------------------------------------------------------------
# One case (runs in a worker process)


def process_case(
    case: InputCase, hashes: dict[str, str | None], config: PreprocessConfig, staging: Path
) -> dict[str, Any]:
    """Read, check, prepare and write one case into ``staging``; returns its manifest record.

    Raises InputError naming the file for every bad-input condition.
    """
    image_volume = read_volume(case.image)
    prepared = prepare_image(image_volume, config)
    image_name = f"images/{case.case_id}.nii.gz"
    record: dict[str, Any] = {
        "case_id": case.case_id,
        "image": image_name,
        "label": None,
        "labeled": case.label is not None,
        "split": case.split,
        "source_image": str(case.image),
        "source_label": str(case.label) if case.label else None,
        "sha256_image": hashes["image"],
        "sha256_label": hashes["label"],
        "original_shape": prepared.record["original"]["shape"],
        "original_spacing": prepared.record["original"]["spacing"],
        "original_orientation": prepared.record["original"]["orientation"],
        "slices_removed": prepared.record["depth"]["removed_slices"],
        "slices_padded": prepared.record["depth"]["padded_slices"],
        "window": prepared.record["window"],
        "label_voxels": None,
        "steps": prepared.record,
    }
    classes = None
    if case.label is not None:
        label_volume = read_volume(case.label)
        _check_same_grid(image_volume.array.shape, image_volume.affine, label_volume, case.image)
        classes = prepare_label(label_volume, prepared.record, config.label_map)
        counts = np.bincount(classes.ravel(), minlength=len(CLASS_NAMES))
        record["label_voxels"] = {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}
        record["label"] = f"labels/{case.case_id}.nii.gz"

    if config.image_dtype == "float16":
        # NIfTI has no float16: 16-bit integers with a scale factor (steps of 1/32767).
        write_nifti(staging / image_name, prepared.image, prepared.affine, np.int16, 1.0 / 32767)
    else:
        write_nifti(staging / image_name, prepared.image, prepared.affine, np.float32)
    if classes is not None:
        write_nifti(staging / record["label"], classes, prepared.affine, np.uint8)
    return record


def _check_same_grid(shape: tuple[int, ...], affine: np.ndarray, label: Any, image: Path) -> None:
    if tuple(label.array.shape) != tuple(shape):
        raise InputError(
            f"{label.source}: label shape {tuple(label.array.shape)} differs from image "
            f"{image.name} shape {tuple(shape)}, expected the same voxel grid"
        )
    # Compare the world positions (mm) of the grid's origin and far corner voxels.
    corner = np.array([*(n - 1 for n in shape), 1.0])
    origin = np.array([0.0, 0.0, 0.0, 1.0])
    gap = max(float(np.abs(affine @ p - label.affine @ p).max()) for p in (origin, corner))
    spacing = float(np.linalg.norm(affine[:3, :3], axis=0).min())
    if gap > GEOMETRY_TOLERANCE_VOXELS * spacing:
        what = geometry_difference(label.affine, affine, GEOMETRY_TOLERANCE_VOXELS * spacing)
        what = what or f"voxel-to-world affine differs by {gap:.3g} mm"
        raise InputError(f"{label.source}: label {what} like its image {image.name}")


def _process_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: workers start in milliseconds and need no ``if __name__ == "__main__"``
    guard in a user's script (they only run numpy/nibabel code, never torch); spawn elsewhere."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Spawned workers inherit this environment: one BLAS/OpenMP thread each, since each worker
    already owns a whole case (more threads would only oversubscribe the cores)."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_cases(
    cases: list[InputCase],
    inputs: dict[str, dict[str, str | None]],
    config: PreprocessConfig,
    staging: Path,
    workers: int,
    skip_bad: bool,
    reporter: Reporter,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []

    def handle(case: InputCase, error: InputError) -> None:
        if not skip_bad:
            raise error
        rejected.append({"case_id": case.case_id, "source": str(case.image), "error": str(error)})
        for name in (f"images/{case.case_id}.nii.gz", f"labels/{case.case_id}.nii.gz"):
            (staging / name).unlink(missing_ok=True)

    with reporter.task("preprocess", total=len(cases)) as task:
        if workers == 1 or len(cases) == 1:
            for case in cases:
                try:
                    records.append(process_case(case, inputs[case.case_id], config, staging))
                except InputError as error:
                    handle(case, error)
                task.advance(1, case=case.case_id)
        else:
            with (
                _single_threaded_children(),
                concurrent.futures.ProcessPoolExecutor(
                    max_workers=min(workers, len(cases)),
                    mp_context=_process_context(),
                ) as pool,
            ):
                futures = {
                    pool.submit(process_case, case, inputs[case.case_id], config, staging): case
                    for case in cases
                }
                try:
                    for future in concurrent.futures.as_completed(futures):
                        case = futures[future]
                        try:
                            records.append(future.result())
                        except InputError as error:
                            handle(case, error)
                        task.advance(1, case=case.case_id)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    records.sort(key=lambda r: r["case_id"])
    return records, rejected


# ----------------------------------------------------------------------------------------------
# Fingerprint, existing output, commit


def _problem_dict(problem: CaseProblem) -> dict[str, Any]:
    return {"case_id": problem.case_id, "source": str(problem.source), "error": problem.error}


def _settings(config: PreprocessConfig) -> dict[str, Any]:
    """The settings that change the output (not ``workers``), JSON-able."""
    from bladdergen.settings import to_mapping

    settings = to_mapping(config)
    settings.pop("workers", None)
    settings["label_map"] = {str(k): v for k, v in sorted(config.label_map.items())}
    return settings


def _hash_inputs(cases: list[InputCase], reporter: Reporter) -> dict[str, dict[str, str | None]]:
    hashes = {}
    with reporter.task("hash inputs", total=len(cases)) as task:
        for case in cases:
            hashes[case.case_id] = {
                "image": sha256_file(case.image) if case.image.exists() else None,
                "label": sha256_file(case.label) if case.label else None,
            }
            task.advance(1)
    return hashes


def _fingerprint(
    inputs: dict[str, dict[str, str | None]],
    settings: dict[str, Any],
    problems: list[dict[str, Any]],
) -> str:
    text = json.dumps(
        {"inputs": inputs, "settings": settings, "problems": problems, "v": MANIFEST_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _existing_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        dataset = PreprocessedSet.open(out_dir, check_voxels=False)
    except InputError:
        return None  # not a complete, intact set: it does not count as done
    return dataset.manifest


def _commit(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder onto ``out_dir`` (replacing an old one last)."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out_dir)


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the ``.<out>.staging-<pid>`` / ``.old-<pid>`` folders that killed runs left beside
    ``out_dir`` (those whose process no longer runs); returns what was removed."""
    removed = []
    parent = Path(out_dir).parent
    if not parent.is_dir():
        return removed
    for kind in ("staging", "old"):
        for path in parent.glob(f".{Path(out_dir).name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process: leave its folder alone
    return True


def _summary(manifest: dict[str, Any], out_dir: Path, skipped: bool) -> dict[str, Any]:
    cases = manifest["cases"]
    return {
        "out_dir": str(out_dir),
        "skipped": skipped,
        "cases": len(cases),
        "labeled": sum(1 for c in cases if c.get("labeled")),
        "unlabeled": sum(1 for c in cases if not c.get("labeled")),
        "rejected": [r["case_id"] for r in manifest.get("rejected", [])],
        "target_shape": manifest["target_shape"],
        "window": manifest["window"],
    }
