"""Reading a preprocessed set: the folder ``bladdergen preprocess`` writes and every trainer reads.

Layout::

    DATA_DIR/manifest.json         format, window, label map, target shape, cases, rejected inputs
    DATA_DIR/config.yaml           resolved configuration that produced it
    DATA_DIR/images/<case>.nii.gz  float32 (or float16) in [-1, 1], shape (X, Y, Z), canonical axes
    DATA_DIR/labels/<case>.nii.gz  uint8 classes 0 background, 1 wall, 2 tumor (labeled cases only)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from bladdergen.errors import InputError

if TYPE_CHECKING:
    from bladdergen.data.config import PreprocessConfig

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "bladdergen-preprocessed"
CLASS_NAMES = ("background", "wall", "tumor")


@dataclasses.dataclass(frozen=True)
class CaseRecord:
    """One preprocessed case: its id and files (``label_path`` is None when unlabeled)."""

    case_id: str
    image_path: Path
    label_path: Path | None

    @property
    def labeled(self) -> bool:
        return self.label_path is not None


@dataclasses.dataclass
class PreprocessedSet:
    """A preprocessed folder: its cases, HU window and label convention."""

    root: Path
    window: tuple[float, float]
    label_map: dict[int, int]
    cases: list[CaseRecord]
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: Path) -> PreprocessedSet:
        """Read ``root/manifest.json``; a folder that is not a preprocess output is an InputError."""
        root = Path(root)
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise InputError(
                f"{root}: not a preprocessed set (no {MANIFEST_NAME}); run `bladdergen preprocess`"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"{manifest_path}: unreadable manifest ({error})") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise InputError(
                f"{manifest_path}: format is {manifest.get('format')!r}, "
                f"expected {MANIFEST_FORMAT!r}"
            )
        cases = []
        for entry in manifest.get("cases", []):
            label = entry.get("label")
            cases.append(
                CaseRecord(
                    case_id=entry["case_id"],
                    image_path=root / entry["image"],
                    label_path=(root / label) if label else None,
                )
            )
        if not cases:
            raise InputError(f"{manifest_path}: the preprocessed set holds no cases")
        return cls(
            root=root,
            window=tuple(manifest["window"]),
            label_map={int(k): int(v) for k, v in manifest["label_map"].items()},
            cases=cases,
            manifest=manifest,
        )

    @property
    def labeled_cases(self) -> list[CaseRecord]:
        return [c for c in self.cases if c.labeled]

    @property
    def unlabeled_cases(self) -> list[CaseRecord]:
        return [c for c in self.cases if not c.labeled]

    def preprocess_config(self) -> PreprocessConfig:
        """The preprocess settings recorded in the manifest: what any later volume (an unlabeled
        pool, a scan to segment) must go through to match this set. InputError if absent."""
        from bladdergen.data.config import PreprocessConfig
        from bladdergen.settings import from_mapping

        settings = self.manifest.get("settings")
        where = f"{self.root / MANIFEST_NAME}: settings"
        if not isinstance(settings, dict):
            raise InputError(
                f"{self.root / MANIFEST_NAME}: no preprocess settings recorded (key 'settings'); "
                "expected a set written by `bladdergen preprocess`"
            )
        settings = dict(settings)
        if isinstance(settings.get("label_map"), dict):  # JSON keys are strings
            try:
                settings["label_map"] = {int(k): v for k, v in settings["label_map"].items()}
            except ValueError:
                raise InputError(f"{where}.label_map: keys must be label values") from None
        return from_mapping(PreprocessConfig, settings, where)

    def case(self, case_id: str) -> CaseRecord:
        for record in self.cases:
            if record.case_id == case_id:
                return record
        raise InputError(f"{self.root}: no case {case_id!r} in the preprocessed set")

    def load_image(self, case: CaseRecord) -> np.ndarray:
        """The image as float32 in [-1, 1], shape (X, Y, Z)."""
        return _read_array(case.image_path).astype(np.float32, copy=False)

    def load_label(self, case: CaseRecord) -> np.ndarray:
        """The label as uint8 classes {0, 1, 2}, shape (X, Y, Z); InputError if unlabeled."""
        if case.label_path is None:
            raise InputError(f"{self.root}: case {case.case_id!r} has no label")
        return _read_array(case.label_path).astype(np.uint8, copy=False)

    def affine(self, case: CaseRecord) -> np.ndarray:
        """The 4x4 voxel-to-world (RAS, mm) affine of a case's image."""
        return np.asarray(_load_nifti(case.image_path).affine, dtype=np.float64)

    def spacing(self, case: CaseRecord) -> tuple[float, float, float]:
        """Voxel size in mm along (X, Y, Z)."""
        zooms = _load_nifti(case.image_path).header.get_zooms()[:3]
        return tuple(float(z) for z in zooms)


def is_preprocessed_set(folder: Path) -> bool:
    """True when ``folder`` holds a ``bladdergen preprocess`` manifest (not, e.g., a sample set's)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(str(path))
    except (OSError, nib.filebasedimages.ImageFileError) as error:
        raise InputError(f"{path}: unreadable NIfTI ({error})") from None


def _read_array(path: Path) -> np.ndarray:
    image = _load_nifti(path)
    try:
        return np.asanyarray(image.dataobj)
    except (OSError, EOFError, ValueError) as error:
        raise InputError(f"{path}: truncated or corrupt NIfTI ({error})") from None
