"""Finding the cases in a lab's input folder: which image goes with which label.

An input is one of:

a single volume file, or one DICOM series folder
    one unlabeled case named after the file (or folder);
a folder of volume files / DICOM series folders (no ``images/``)
    one unlabeled case per entry;

``images/`` + ``labels/``
    ``images/<case>.nii.gz`` (or .nii, .mha, .mhd, .nrrd, or a folder holding one DICOM series),
    ``labels/<case>.nii.gz`` matched by case id. A case without a label is unlabeled.
nnU-Net raw layout
    ``imagesTr/<case>_0000.nii.gz`` with ``labelsTr/<case>.nii.gz``, and ``imagesTs/`` (unlabeled
    unless ``labelsTs/`` holds its label). When every image name ends in a 4-digit channel suffix,
    ``_0000`` is dropped from the case id and other channels (``_0001``...) are refused (the
    toolkit takes one CT channel); otherwise (Decathlon style) the names are the case ids.
    A ``dataset.json`` beside them names the label values (:func:`nnunet_label_map`).

Problems that concern one case (a duplicate id, a label without an image, a second channel) are
returned as :class:`CaseProblem` so ``--skip-bad`` can set them aside; problems with the folder
itself (missing, empty, unknown layout) raise InputError at once.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from bladdergen.data.volumes import is_dicom_folder, strip_volume_suffix, volume_suffix
from bladdergen.errors import InputError

DATASET_JSON = "dataset.json"

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclasses.dataclass(frozen=True)
class InputCase:
    """One case found in the input folder; ``label`` is None for an unlabeled case."""

    case_id: str
    image: Path
    label: Path | None
    split: str  # the folder it came from: images, imagesTr or imagesTs


@dataclasses.dataclass(frozen=True)
class CaseProblem:
    """A case that cannot be used, with the one-line reason (names the file)."""

    case_id: str
    source: Path
    error: str


def _entries(folder: Path) -> list[Path]:
    """Volume files and sub-folders (DICOM series) of ``folder``, hidden entries skipped."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or volume_suffix(path) is not None:
            found.append(path)
    return found


def _case_id(path: Path, channel_suffix: bool) -> tuple[str, str | None]:
    """(case id, problem or None) for an image path; ``channel_suffix``: names end in _NNNN."""
    name = path.name if path.is_dir() else strip_volume_suffix(path)
    if not channel_suffix:
        return name, None
    match = _CHANNEL.match(name)
    if match["channel"] != "0000":
        return match["case"], (
            f"{path}: channel {match['channel']} found, expected a single CT channel (_0000)"
        )
    return match["case"], None


def _has_channel_suffixes(entries: list[Path]) -> bool:
    """nnU-Net names every image <case>_0000; Decathlon-style folders use plain case names."""
    names = [p.name if p.is_dir() else strip_volume_suffix(p) for p in entries]
    return bool(names) and all(_CHANNEL.match(name) for name in names)


def discover_cases(in_dir: Path) -> tuple[list[InputCase], list[CaseProblem]]:
    """The cases of ``in_dir`` sorted by case id, and the cases that cannot be used.

    Raises InputError when ``in_dir`` is missing, has neither layout, or holds no image at all.
    """
    in_dir = Path(in_dir)
    if not in_dir.exists():
        raise InputError(f"{in_dir}: no such file or folder, expected a folder of scans or a scan")
    if in_dir.is_file():
        if volume_suffix(in_dir) is None:
            raise InputError(
                f"{in_dir}: is a file but not a volume, expected .nii, .nii.gz, .mha, .mhd, "
                ".nrrd or a folder"
            )
        return [_single_case(in_dir)], []
    nnunet = (in_dir / "imagesTr").is_dir() or (in_dir / "imagesTs").is_dir()
    if nnunet:
        pairs = [("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")]
    elif (in_dir / "images").is_dir():
        pairs = [("images", "labels")]
    elif is_dicom_folder(in_dir):
        return [_single_case(in_dir)], []
    else:
        return _loose_cases(in_dir)

    images: dict[str, list[tuple[Path, str]]] = {}
    labels: dict[str, list[Path]] = {}
    problems: list[CaseProblem] = []
    for image_folder, label_folder in pairs:
        entries = _entries(in_dir / image_folder)
        channel_suffix = nnunet and _has_channel_suffixes(entries)
        for path in entries:
            case_id, problem = _case_id(path, channel_suffix)
            if problem:
                problems.append(CaseProblem(case_id, path, problem))
                continue
            images.setdefault(case_id, []).append((path, image_folder))
        for path in _entries(in_dir / label_folder):
            if path.is_dir():
                continue  # labels are single files; a stray folder is not a label
            labels.setdefault(strip_volume_suffix(path), []).append(path)

    if not images and not problems:
        folders = " or ".join(f"{in_dir / a}/" for a, _ in pairs)
        raise InputError(
            f"{folders}: no images found, expected NIfTI/MHA/NRRD files or DICOM series folders"
        )

    cases: list[InputCase] = []
    multi_channel = {p.case_id for p in problems}  # a case with a second channel is refused whole
    for case_id in sorted(set(images) - multi_channel):
        found = images[case_id]
        if len(found) > 1:
            names = ", ".join(str(p) for p, _ in found)
            problems.append(
                CaseProblem(case_id, found[0][0], f"duplicate case id {case_id!r}: {names}")
            )
            continue
        label_paths = labels.get(case_id, [])
        if len(label_paths) > 1:
            names = ", ".join(str(p) for p in label_paths)
            problems.append(
                CaseProblem(
                    case_id, label_paths[0], f"duplicate label for case {case_id!r}: {names}"
                )
            )
            continue
        image, split = found[0]
        cases.append(InputCase(case_id, image, label_paths[0] if label_paths else None, split))

    bad_ids = {p.case_id for p in problems}
    for case_id in sorted(set(labels) - set(images) - bad_ids):
        path = labels[case_id][0]
        problems.append(
            CaseProblem(case_id, path, f"{path}: label has no matching image (case {case_id!r})")
        )
    return cases, sorted(problems, key=lambda p: (p.case_id, str(p.source)))


def _single_case(path: Path) -> InputCase:
    """One unlabeled case from a volume file or a DICOM series folder."""
    name = path.name if path.is_dir() else strip_volume_suffix(path)
    match = _CHANNEL.match(name)
    if match and match["channel"] == "0000":
        name = match["case"]
    return InputCase(name, path, None, "single")


def _loose_cases(folder: Path) -> tuple[list[InputCase], list[CaseProblem]]:
    """Unlabeled cases from the volume files and DICOM series folders directly in ``folder``."""
    entries = [p for p in _entries(folder) if p.is_file() or is_dicom_folder(p)]
    if not entries:
        raise InputError(
            f"{folder}: no images/ folder and no volumes, expected images/ (+ labels/), the "
            "nnU-Net layout imagesTr/ (+ labelsTr/, imagesTs/), volume files or DICOM series"
        )
    names = output_names(entries)
    cases = [InputCase(names[p], p, None, "folder") for p in entries]
    return sorted(cases, key=lambda c: c.case_id), []


def nnunet_label_map(in_dir: Path) -> dict[int, int] | None:
    """The label map (value -> class) that ``in_dir/dataset.json`` declares, or None without one.

    nnU-Net v2 writes ``"labels": {"background": 0, "wall": 1, "tumor": 2}`` (v1: value -> name).
    Names are matched to classes: ``background`` -> 0, a name containing ``wall`` -> 1, one
    containing ``tumo`` (tumor, tumour) -> 2. Raises InputError naming the file for a label it
    cannot place, or for a file that is not such JSON.
    """
    import json

    path = Path(in_dir) / DATASET_JSON
    if not Path(in_dir).is_dir() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable dataset.json ({error})") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise InputError(
            f"{path}: has no 'labels' object, expected e.g. {{\"background\": 0, ...}}"
        )
    pairs: list[tuple[str, object]] = []
    for key, value in labels.items():
        if isinstance(value, str) and str(key).lstrip("-").isdigit():
            pairs.append((value, int(key)))  # v1: "1": "wall"
        else:
            pairs.append((str(key), value))
    label_map: dict[int, int] = {}
    for name, value in pairs:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(
                f"{path}: label {name!r} has value {value!r}, expected one integer "
                "(region-based labels are not supported)"
            )
        lowered = name.lower()
        if lowered == "background":
            label_map[value] = 0
        elif "wall" in lowered:
            label_map[value] = 1
        elif "tumo" in lowered:
            label_map[value] = 2
        else:
            raise InputError(
                f"{path}: label {name!r} = {value}, expected background, a bladder wall or a "
                "tumor label"
            )
    if sorted(set(label_map.values())) != [0, 1, 2]:
        raise InputError(
            f"{path}: labels {dict(pairs)} do not name background, wall and tumor, expected all "
            "three"
        )
    return label_map


def output_names(paths: list[Path]) -> dict[Path, str]:
    """Input volume -> the case name its outputs get (``segment`` writes ``<name>.nii.gz``).

    The volume suffix is dropped, and nnU-Net's channel suffix too when every name ends in
    ``_0000`` (``imagesTs/case_7_0000.nii.gz`` -> ``case_7``), so outputs pair with
    ``labelsTs/case_7.nii.gz``. Raises InputError when two inputs would get the same name.
    """
    names = {p: p.name if p.is_dir() else strip_volume_suffix(p) for p in paths}
    matches = {p: _CHANNEL.match(n) for p, n in names.items()}
    if names and all(m is not None and m["channel"] == "0000" for m in matches.values()):
        names = {p: m["case"] for p, m in matches.items()}
    seen: dict[str, Path] = {}
    for path, name in names.items():
        if name in seen:
            raise InputError(
                f"{path}: gives the same output name {name!r} as {seen[name]}, expected "
                "one input per case name"
            )
        seen[name] = path
    return names


def check_output_outside_input(in_dir: Path, out_dir: Path) -> None:
    """Refuse an output folder equal to, inside, or around the input folder (inputs stay intact)."""
    inside = Path(in_dir).resolve()
    target = Path(out_dir).resolve()
    if target == inside or inside in target.parents:
        raise InputError(
            f"{out_dir}: output folder is inside the input folder {in_dir}, "
            "expected a folder outside it (inputs are never modified)"
        )
    if target in inside.parents:
        # --overwrite replaces the output folder as a whole: it must never hold the inputs.
        raise InputError(
            f"{out_dir}: output folder contains the input folder {in_dir}, "
            "expected a separate folder (inputs are never modified)"
        )
