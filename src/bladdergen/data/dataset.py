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
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from bladdergen.data.volumes import nifti_array, open_nifti
from bladdergen.errors import InputError

if TYPE_CHECKING:
    from bladdergen.data.config import PreprocessConfig

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "bladdergen-preprocessed"
# The classes every stage predicts, by index; and the dataset's label values (SPEC §1) per class.
CLASS_NAMES = ("background", "wall", "tumor")
DATASET_LABEL_MAP = {0: 0, 255: 1, 128: 2}  # dataset label value -> class index

# A case id becomes a file name in every output folder: one path component, no hidden names.
_SAFE_CASE_ID = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]*$")


def check_case_id(case_id: Any, where: Path | str) -> str:
    """``case_id`` if it is a safe file name (one path component, not hidden, no ``..``).

    Case ids name output files (``<out>/<case_id>.nii.gz``), so one read from a manifest must
    never lead outside the output folder. Raises InputError naming ``where``.
    """
    if not isinstance(case_id, str) or not _SAFE_CASE_ID.match(case_id) or len(case_id) > 200:
        raise InputError(
            f"{where}: case_id {case_id!r:.80} is not a plain file name, expected one path "
            "component without '/', '\\', control characters or a leading '.'"
        )
    return case_id


def contained_path(root: Path, relative: Any, where: Path | str, key: str) -> Path:
    """``root / relative`` for a relative path that stays inside ``root`` (no ``..``, not absolute).

    Raises InputError naming ``where``, the key and the value.
    """
    if not isinstance(relative, str) or not relative:
        raise InputError(f"{where}: {key} is {relative!r:.80}, expected a relative file path")
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", relative):
        raise InputError(
            f"{where}: {key} {relative!r:.80} leaves the folder, expected a path inside {root}"
        )
    return Path(root, *pure.parts)


def read_manifest(root: Path) -> dict[str, Any]:
    """The JSON object in ``root/manifest.json`` of a preprocessed set (format checked only).

    Raises InputError for a missing, unreadable or foreign manifest.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise InputError(
            f"{root}: not a preprocessed set (no {MANIFEST_NAME}); run `bladdergen preprocess`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{manifest_path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict):
        raise InputError(
            f"{manifest_path}: manifest is a JSON {type(manifest).__name__}, expected an object"
        )
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(
            f"{manifest_path}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        )
    return manifest


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
    def open(cls, root: Path, check_voxels: bool = True) -> PreprocessedSet:
        """Read and check ``root/manifest.json`` and the files it lists.

        Checked: the manifest's keys and types, case ids that are plain file names, file paths
        inside ``root``, every listed file present, every image (and label) of the same shape
        (from the headers), and with ``check_voxels`` every image finite (each read once).
        Raises InputError naming the file, the value and what was expected.
        """
        root = Path(root)
        manifest = read_manifest(root)
        where = root / MANIFEST_NAME
        window = _window(manifest.get("window"), where)
        label_map = _label_map(manifest.get("label_map"), where)
        entries = manifest.get("cases")
        if not isinstance(entries, list):
            raise InputError(f"{where}: cases is {_kind(entries)}, expected a list of cases")
        if not entries:
            raise InputError(f"{where}: the preprocessed set holds no cases")
        cases: list[CaseRecord] = []
        seen: set[str] = set()
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise InputError(f"{where}: cases[{index}] is {_kind(entry)}, expected an object")
            for key in ("case_id", "image"):
                if key not in entry:
                    raise InputError(f"{where}: cases[{index}] has no {key!r}, expected one")
            case_id = check_case_id(entry["case_id"], where)
            if case_id in seen:
                raise InputError(f"{where}: case_id {case_id!r} appears twice, expected unique ids")
            seen.add(case_id)
            image = contained_path(root, entry["image"], where, f"cases[{index}].image")
            label = entry.get("label")
            label_path = (
                contained_path(root, label, where, f"cases[{index}].label") if label else None
            )
            for path in (image, label_path):
                if path is not None and not path.is_file():
                    raise InputError(
                        f"{path}: listed in {where} (case {case_id!r}) but missing, "
                        "expected the file preprocess wrote"
                    )
            cases.append(CaseRecord(case_id=case_id, image_path=image, label_path=label_path))
        dataset = cls(root=root, window=window, label_map=label_map, cases=cases, manifest=manifest)
        dataset._check_files(check_voxels)
        return dataset

    def _check_files(self, check_voxels: bool) -> None:
        """Every image and label of one shape; every image finite (``check_voxels``)."""
        target = self.manifest.get("target_shape")
        expected: tuple[int, ...] | None = None
        if isinstance(target, list) and all(isinstance(n, int) for n in target):
            expected = tuple(target)
        for case in self.cases:
            image = open_nifti(case.image_path)
            shape = tuple(int(n) for n in image.shape[:3])
            expected = expected or shape
            if shape != expected:
                raise InputError(
                    f"{case.image_path}: shape {_shape_text(shape)}, expected "
                    f"{_shape_text(expected)} like the rest of the preprocessed set"
                )
            if case.label_path is not None:
                label_shape = tuple(int(n) for n in open_nifti(case.label_path).shape[:3])
                if label_shape != shape:
                    raise InputError(
                        f"{case.label_path}: shape {_shape_text(label_shape)}, expected "
                        f"{_shape_text(shape)} like its image"
                    )
            if check_voxels:
                array = nifti_array(image, case.image_path, np.float32)
                finite = np.isfinite(array)
                if not finite.all():
                    bad = int(finite.size - np.count_nonzero(finite))
                    raise InputError(
                        f"{case.image_path}: {bad} voxels are NaN or infinite, expected finite "
                        "values in [-1, 1]"
                    )

    @property
    def labeled_cases(self) -> list[CaseRecord]:
        return [c for c in self.cases if c.labeled]

    @property
    def unlabeled_cases(self) -> list[CaseRecord]:
        return [c for c in self.cases if not c.labeled]

    def case(self, case_id: str) -> CaseRecord:
        for record in self.cases:
            if record.case_id == case_id:
                return record
        raise InputError(f"{self.root}: no case {case_id!r} in the preprocessed set")

    def load_image(self, case: CaseRecord) -> np.ndarray:
        """The image as float32 in [-1, 1], shape (X, Y, Z)."""
        return read_nifti_array(case.image_path).astype(np.float32, copy=False)

    def load_label(self, case: CaseRecord) -> np.ndarray:
        """The label as uint8 classes {0, 1, 2}, shape (X, Y, Z); InputError if unlabeled."""
        if case.label_path is None:
            raise InputError(f"{self.root}: case {case.case_id!r} has no label")
        return read_nifti_array(case.label_path).astype(np.uint8, copy=False)

    def affine(self, case: CaseRecord) -> np.ndarray:
        """The 4x4 voxel-to-world (RAS, mm) affine of a case's image."""
        return np.asarray(open_nifti(case.image_path).affine, dtype=np.float64)

    def spacing(self, case: CaseRecord) -> tuple[float, float, float]:
        """Voxel size in mm along (X, Y, Z)."""
        zooms = open_nifti(case.image_path).header.get_zooms()[:3]
        return tuple(float(z) for z in zooms)

    def preprocess_config(self) -> PreprocessConfig:
        """The preprocess settings that produced this set, from its manifest's ``settings``.

        What ``segment`` and ``train-deepatlas`` apply to new scans so they match the training
        data. Raises InputError when the manifest records none (a set not written by
        ``bladdergen preprocess``) or they do not validate.
        """
        where = self.root / MANIFEST_NAME
        return preprocess_config_from_mapping(self.manifest.get("settings"), f"{where}: settings")


def preprocess_config_from_mapping(settings: Any, where: Path | str) -> PreprocessConfig:
    """Recorded preprocess settings (a manifest's ``settings``, a checkpoint's ``preprocess``)
    -> a validated :class:`PreprocessConfig`; JSON's string label-map keys become integers.

    Raises InputError naming ``where`` when they are missing or do not validate.
    """
    from bladdergen.data.config import PreprocessConfig
    from bladdergen.settings import from_mapping

    if not isinstance(settings, dict):
        raise InputError(
            f"{where}: is {_kind(settings)}, expected the preprocess settings object that "
            "`bladdergen preprocess` records"
        )
    settings = dict(settings)
    settings.pop("workers", None)
    if isinstance(settings.get("label_map"), dict):
        settings["label_map"] = _label_map(settings["label_map"], where)
    return from_mapping(PreprocessConfig, settings, str(where))


def first_differing_case(theirs: Path, ours: Path | str, ids: list[str]) -> str | None:
    """None when the two preprocessed folders hold the same HU window, label convention and
    voxels (images and labels, with their affines) for every case of ``ids``; else what differs."""
    if not (theirs / "manifest.json").is_file():
        return f"{theirs} is no longer a preprocessed set to compare with"
    sets = [PreprocessedSet.open(folder, check_voxels=False) for folder in (theirs, Path(ours))]
    if (sets[0].window, sets[0].label_map) != (sets[1].window, sets[1].label_map):
        return "their HU windows or label conventions differ"
    cases = [{case.case_id: case for case in folder.cases} for folder in sets]
    for case_id in ids:
        if case_id not in cases[0] or case_id not in cases[1]:
            return f"case {case_id} is not in both"
        pair = [cases[0][case_id], cases[1][case_id]]
        for kind in ("image_path", "label_path"):
            files = [getattr(case, kind) for case in pair]
            if None in files:
                if files != [None, None]:
                    return f"case {case_id} is labeled in only one"
                continue
            volumes = [open_nifti(file) for file in files]
            same = np.array_equal(volumes[0].affine, volumes[1].affine) and np.array_equal(
                nifti_array(volumes[0], files[0]), nifti_array(volumes[1], files[1])
            )
            if not same:
                return f"case {case_id}'s {kind.split('_')[0]} differs ({files[0]} vs {files[1]})"
    return None


def is_preprocessed_set(folder: Path) -> bool:
    """True when ``folder`` holds a ``bladdergen preprocess`` manifest (not, e.g., a sample set's)."""
    try:
        read_manifest(Path(folder))
    except InputError:
        return False
    return True


def read_nifti_array(path: Path) -> np.ndarray:
    """The voxels of a NIfTI file in their stored type (scale factors applied); InputError
    naming the file when it is missing, unreadable, truncated or claims an impossible size."""
    return nifti_array(open_nifti(path), Path(path))


def _kind(value: Any) -> str:
    return "missing" if value is None else f"a {type(value).__name__} ({value!r:.60})"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def _window(value: Any, where: Path) -> tuple[float, float]:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and all(np.isfinite(value))
        and value[0] < value[1]
    )
    if not ok:
        raise InputError(f"{where}: window is {_kind(value)}, expected [low HU, high HU]")
    return float(value[0]), float(value[1])


def _label_map(value: Any, where: Path) -> dict[int, int]:
    problem = not isinstance(value, dict)
    result: dict[int, int] = {}
    if not problem:
        for key, cls in value.items():
            try:
                number = int(key)
            except (TypeError, ValueError):
                problem = True
                break
            if not isinstance(cls, int) or isinstance(cls, bool) or cls not in (0, 1, 2):
                problem = True
                break
            result[number] = cls
    if problem or sorted(set(result.values())) != [0, 1, 2]:
        raise InputError(
            f"{where}: label_map is {_kind(value)}, expected an object of label value -> class "
            "with classes 0, 1 and 2"
        )
    return result
