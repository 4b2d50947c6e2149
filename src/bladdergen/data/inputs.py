"""Finding the cases in a lab's input folder: which image goes with which label.

Two layouts are recognised:

``images/`` + ``labels/``
    ``images/<case>.nii.gz`` (or .nii, .mha, .mhd, .nrrd, or a folder holding one DICOM series),
    ``labels/<case>.nii.gz`` matched by case id. A case without a label is unlabeled.
nnU-Net raw layout
    ``imagesTr/<case>_0000.nii.gz`` with ``labelsTr/<case>.nii.gz``, and ``imagesTs/`` (unlabeled
    unless ``labelsTs/`` holds its label). When every image name ends in a 4-digit channel suffix,
    ``_0000`` is dropped from the case id and other channels (``_0001``...) are refused (the
    toolkit takes one CT channel); otherwise (Decathlon style) the names are the case ids.

Problems that concern one case (a duplicate id, a label without an image, a second channel) are
returned as :class:`CaseProblem` so ``--skip-bad`` can set them aside; problems with the folder
itself (missing, empty, unknown layout) raise InputError at once.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from bladdergen.data.volumes import strip_volume_suffix, volume_suffix
from bladdergen.errors import InputError

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
    if not in_dir.is_dir():
        raise InputError(f"{in_dir}: input folder not found")
    nnunet = (in_dir / "imagesTr").is_dir() or (in_dir / "imagesTs").is_dir()
    if nnunet:
        pairs = [("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")]
    elif (in_dir / "images").is_dir():
        pairs = [("images", "labels")]
    else:
        raise InputError(
            f"{in_dir}: no images/ folder, expected images/ (+ labels/) or the nnU-Net layout "
            "imagesTr/ (+ labelsTr/, imagesTs/)"
        )

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
