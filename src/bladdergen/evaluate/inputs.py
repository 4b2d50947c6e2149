"""Reading what ``evaluate`` compares: label folders, HU volume folders, preprocessed sets.

A *case id* is a file name without ``.nii`` / ``.nii.gz``. Label folders may use the dataset
convention (0 background, 255 wall, 128 tumor) or class indices (0, 1 wall, 2 tumor); the
convention is detected per folder and reported. Volume folders hold HU NIfTI (``sample`` output or
raw scans) or are a preprocessed set, whose [-1, 1] images are mapped back to HU with its window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from bladdergen.data.dataset import (
    CLASS_NAMES as ALL_CLASS_NAMES,
)
from bladdergen.data.dataset import (
    DATASET_LABEL_MAP,
    CaseRecord,
    PreprocessedSet,
    is_preprocessed_set,
)
from bladdergen.data.intensity import unit_to_hu
from bladdergen.data.volumes import nifti_array, open_nifti
from bladdergen.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# The foreground classes scored, by index (background is not).
CLASS_NAMES = {index: name for index, name in enumerate(ALL_CLASS_NAMES) if index}
# Dataset label value -> class index (SPEC §1: 0 background, 128 tumor, 255 wall).
DATASET_TO_CLASS = DATASET_LABEL_MAP


def case_id_of(path: Path) -> str:
    """``case_007.nii.gz`` -> ``case_007``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_nifti(folder: Path) -> dict[str, Path]:
    """Case id -> NIfTI path for every ``*.nii``/``*.nii.gz`` directly in ``folder`` (sorted).

    Raises InputError when the folder is missing, empty, or two files share a case id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.endswith(NIFTI_SUFFIXES):
            continue
        if path.name.startswith("."):
            continue  # temporary files of atomic writes, left by a killed run
        case_id = case_id_of(path)
        if case_id in found:
            raise InputError(
                f"{folder}: case id {case_id!r} appears twice ({found[case_id].name}, {path.name})"
            )
        found[case_id] = path
    if not found:
        raise InputError(f"{folder}: no NIfTI files (*.nii, *.nii.gz) found")
    return found


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file (header checked, no voxels read); InputError naming a bad file."""
    return open_nifti(path)


def read_array(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The voxel array of an opened image (3D, squeezed of trailing singleton axes)."""
    data = nifti_array(image, path)
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
    return data


def spacing_of(image: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel size in mm along (X, Y, Z) from the header."""
    return tuple(float(z) for z in image.header.get_zooms()[:3])


# What `evaluate seg` and `evaluate gen` write into --out (they may share one folder).
OWNED_OUTPUTS = ("seg_*", "gen_*", "*.png", "config.yaml")


def check_evaluate_out(out_dir: Path) -> None:
    """Refuse an --out that is a file or holds files evaluate does not write (InputError)."""
    from bladdergen.fileio import check_output_folder

    check_output_folder(Path(out_dir), OWNED_OUTPUTS, "evaluate")


# ----------------------------------------------------------------------------------------------
# Label folders


@dataclasses.dataclass
class LabelVolume:
    """One label map as class indices (uint8, 0 bg / 1 wall / 2 tumor), with its geometry."""

    case_id: str
    path: Path
    classes: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def detect_convention(values: set[int], path: Path) -> str:
    """``"classes"`` for values within {0, 1, 2}, ``"dataset"`` for {0, 128, 255}, ``"empty"``
    for background only; anything else is an InputError naming the file and the values."""
    if values <= {0}:
        return "empty"
    if values <= {0, 1, 2}:
        return "classes"
    if values <= {0, 128, 255}:
        return "dataset"
    raise InputError(
        f"{path}: found label values {sorted(values)}, expected a subset of {{0, 1, 2}} "
        "(classes) or {0, 128, 255} (dataset convention)"
    )


def label_folder(folder: Path) -> Path:
    """A preprocessed set's ``labels/`` subfolder, else the folder itself."""
    folder = Path(folder)
    if is_preprocessed_set(folder) and (folder / "labels").is_dir():
        return folder / "labels"
    return folder


def read_label_folder(folder: Path) -> tuple[dict[str, LabelVolume], str]:
    """Read every label map in ``folder`` as class indices.

    Returns (case id -> LabelVolume, convention) where convention is ``"classes"`` (0/1/2),
    ``"dataset"`` (0/128/255) or ``"empty"`` (background only everywhere). Mixing the two
    conventions within one folder is an InputError.
    """
    folder = label_folder(folder)
    volumes: dict[str, LabelVolume] = {}
    seen: dict[str, str] = {}
    for case_id, path in list_nifti(folder).items():
        image = load_nifti(path)
        raw = read_array(image, path)
        if np.issubdtype(raw.dtype, np.floating) and not np.all(raw == np.round(raw)):
            raise InputError(f"{path}: label map holds non-integer values, expected integer labels")
        raw = raw.astype(np.int64)
        values = {int(v) for v in np.unique(raw)}
        convention = detect_convention(values, path)
        seen.setdefault(convention, path.name)
        if convention == "dataset":
            classes = np.zeros(raw.shape, np.uint8)
            for value, class_index in DATASET_TO_CLASS.items():
                classes[raw == value] = class_index
        else:
            classes = raw.astype(np.uint8)
        volumes[case_id] = LabelVolume(
            case_id, path, classes, np.asarray(image.affine, float), spacing_of(image)
        )
    if "classes" in seen and "dataset" in seen:
        raise InputError(
            f"{folder}: mixes label conventions ({seen['classes']} uses 0/1/2, "
            f"{seen['dataset']} uses 0/128/255); use one convention per folder"
        )
    convention = "classes" if "classes" in seen else "dataset" if "dataset" in seen else "empty"
    return volumes, convention


CONVENTION_TEXT = {
    "classes": "class indices 0/1/2 (1 wall, 2 tumor)",
    "dataset": "dataset values 0/128/255 (255 wall, 128 tumor)",
    "empty": "background only (no labels found)",
}


# ----------------------------------------------------------------------------------------------
# HU volume folders


@dataclasses.dataclass
class HUVolume:
    """One CT volume in Hounsfield units (float32, shape (X, Y, Z)) with its geometry."""

    case_id: str
    path: Path
    hu: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def open_hu_folder(folder: Path) -> tuple[list[tuple[str, Callable[[], HUVolume]]], str]:
    """Lazy loaders of every volume of ``folder`` in HU, and the kind of folder
    (``"preprocessed"`` or ``"nifti"``); volumes are read one at a time when a loader is called.

    A preprocessed set (``manifest.json``) is converted back to HU with its window; any other
    folder is read as HU NIfTI files as they are.
    """
    folder = Path(folder)
    if is_preprocessed_set(folder):
        dataset = PreprocessedSet.open(folder)

        def preprocessed_loader(case: CaseRecord) -> Callable[[], HUVolume]:
            def load() -> HUVolume:
                hu = unit_to_hu(dataset.load_image(case), dataset.window)
                return HUVolume(
                    case.case_id, case.image_path, hu, dataset.affine(case), dataset.spacing(case)
                )

            return load

        return [(c.case_id, preprocessed_loader(c)) for c in dataset.cases], "preprocessed"

    def nifti_loader(case_id: str, path: Path) -> Callable[[], HUVolume]:
        def load() -> HUVolume:
            image = load_nifti(path)
            hu = read_array(image, path).astype(np.float32)
            finite = np.isfinite(hu)
            if not finite.all():
                bad = int(finite.size - np.count_nonzero(finite))
                raise InputError(f"{path}: {bad} voxels are NaN or infinite, expected finite HU")
            return HUVolume(case_id, path, hu, np.asarray(image.affine, float), spacing_of(image))

        return load

    from bladdergen.diffusion.layout import sample_images_folder  # a `sample` output: images/

    volumes = list_nifti(sample_images_folder(folder))
    return [(c, nifti_loader(c, p)) for c, p in volumes.items()], "nifti"


def read_hu_folder(folder: Path) -> tuple[list[HUVolume], str]:
    """All volumes of ``folder`` in HU (see :func:`open_hu_folder`), and the kind of folder."""
    loaders, kind = open_hu_folder(folder)
    return [load() for _, load in loaders], kind
