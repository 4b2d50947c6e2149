"""The images DeepAtlas trains on: labeled training cases, a held-out validation split, and the
unlabeled pool (real unlabeled scans and synthetic volumes from ``sample``).

A pool folder is either a preprocessed set (``manifest.json`` from ``bladdergen preprocess``: its
images are used as they are) or a folder of raw volumes in HU (NIfTI, .mha/.nrrd, DICOM series
folders, e.g. what ``sample`` writes). Raw volumes go through :func:`prepare_image` with the
training data's preprocess settings, once, into ``RUN_DIR/prepared/<pool>/``; a resumed run reuses
those files.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import numpy as np

from bladdergen.data.config import PreprocessConfig
from bladdergen.data.dataset import PreprocessedSet, is_preprocessed_set, read_nifti_array
from bladdergen.errors import InputError
from bladdergen.progress import SILENT, Reporter


@dataclasses.dataclass(frozen=True)
class PoolImage:
    """One training image: ``image_path`` float32 [-1, 1] (X, Y, Z) NIfTI; ``label_path`` classes."""

    case_id: str
    source: str  # "labeled", "validation", "unlabeled" or "synthetic"
    image_path: Path
    label_path: Path | None = None


class VolumeCache:
    """Load NIfTI arrays on demand, keeping at most ``capacity`` of them in memory (oldest evicted)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._arrays: OrderedDict[Path, np.ndarray] = OrderedDict()

    def get(self, path: Path, dtype: type = np.float32) -> np.ndarray:
        if path in self._arrays:
            self._arrays.move_to_end(path)
            return self._arrays[path]
        array = read_nifti_array(path).astype(dtype, copy=False)
        self._arrays[path] = array
        if len(self._arrays) > self.capacity:
            self._arrays.popitem(last=False)
        return array


def split_labeled(
    dataset: PreprocessedSet, val_cases: int, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded split of the labeled case ids into (training, validation).

    Raises InputError when fewer than ``val_cases + 1`` labeled cases exist.
    """
    labeled = sorted(c.case_id for c in dataset.labeled_cases)
    if len(labeled) < val_cases + 1:
        raise InputError(
            f"{dataset.root}: {len(labeled)} labeled cases, expected at least {val_cases + 1} "
            f"({val_cases} held out for validation, deepatlas.val_cases, and 1 for training)"
        )
    order = np.random.default_rng(seed).permutation(len(labeled))
    validation = sorted(labeled[i] for i in order[:val_cases])
    training = [c for c in labeled if c not in validation]
    return training, validation


def list_raw_volumes(folder: Path) -> list[Path]:
    """Volume files (NIfTI, .mha, .nrrd, ...) and DICOM series sub-folders directly in ``folder``."""
    from bladdergen.data.volumes import is_dicom_folder, volume_suffix

    found = []
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith("."):
            continue  # temporary files of atomic writes
        if path.is_file() and volume_suffix(path) is not None:
            found.append(path)
        elif path.is_dir() and is_dicom_folder(path):
            found.append(path)
    return found


def pool_from_folder(
    folder: Path,
    source: str,
    prepared_dir: Path,
    preprocess: PreprocessConfig,
    reporter: Reporter = SILENT,
    with_labels: bool = False,
) -> list[PoolImage]:
    """All images of a pool folder, prepared if they are raw volumes.

    With ``with_labels`` an image keeps its label map where it has one (a preprocessed set's
    label, or ``labels/<name>`` beside a ``sample`` output's image, prepared with the image's own
    geometric steps) and only if ``sample`` found that label plausible (``checks/<name>.json``;
    no checks file counts as plausible): these are labeled synthetic pairs. Labels are ignored
    otherwise. Raises InputError when the folder does not exist or holds no volumes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {source} folder not found")
    if is_preprocessed_set(folder):  # a sample folder's manifest.json is not one
        dataset = PreprocessedSet.open(folder)
        return [
            PoolImage(
                f"{source}:{c.case_id}", source, c.image_path, c.label_path if with_labels else None
            )
            for c in dataset.cases
        ]
    from bladdergen.diffusion.layout import sample_images_folder  # a `sample` output: images/

    raw = list_raw_volumes(sample_images_folder(folder))
    if not raw:
        raise InputError(
            f"{folder}: no volumes found, expected a preprocessed set or NIfTI/DICOM volumes"
        )
    images = []
    with reporter.task(f"preparing {source} volumes", total=len(raw)) as task:
        for path in raw:
            images.append(_prepared(path, source, Path(prepared_dir), preprocess, with_labels))
            task.advance(1)
    return images


def _prepared(
    path: Path, source: str, prepared_dir: Path, preprocess: PreprocessConfig, with_labels: bool
) -> PoolImage:
    """One raw pool volume (and its plausible label map) through the training preprocessing,
    once: the prepared image is written last, so its presence marks a finished pair."""
    from bladdergen.data.preprocess import prepare_image, prepare_label
    from bladdergen.data.volumes import read_volume, strip_volume_suffix, write_nifti

    name = strip_volume_suffix(path)
    out = prepared_dir / source / f"{name}.nii.gz"
    label_out = prepared_dir / source / "labels" / f"{name}.nii.gz"
    label_path = plausible_sample_label(path) if with_labels else None
    paired = label_path is not None
    if not out.is_file():
        prepared = prepare_image(read_volume(path), preprocess)
        if paired:
            label = prepare_label(read_volume(label_path), prepared.record, preprocess.label_map)
            write_nifti(label_out, label, prepared.affine, np.uint8)
        write_nifti(out, prepared.image, prepared.affine, np.float32)
    return PoolImage(f"{source}:{name}", source, out, label_out if paired else None)


def plausible_sample_label(image_path: Path) -> Path | None:
    """The label map beside a ``sample`` output's image, if there is one and ``sample`` found it
    plausible (``checks/<name>.json``; no checks file counts as plausible); else None."""
    import json

    from bladdergen.diffusion.layout import sample_label_and_checks

    label_path, checks_path = sample_label_and_checks(image_path)
    if not label_path.is_file():
        return None
    if checks_path.is_file():
        checks = json.loads(checks_path.read_text(encoding="utf-8"))["checks"]
        return label_path if checks["plausible"] else None
    return label_path


def synthetic_pair_count(folder: Path) -> int:
    """How many images of a ``sample`` output folder come with a plausible label map."""
    from bladdergen.diffusion.layout import sample_images_folder

    raw = list_raw_volumes(sample_images_folder(Path(folder)))
    return sum(plausible_sample_label(path) is not None for path in raw)
