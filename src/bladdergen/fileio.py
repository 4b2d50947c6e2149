"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

A kill at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from bladdergen.errors import InputError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the final suffixes (``.nii.gz`` etc.) so writers that choose a format
    by extension behave the same. On an exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(value.item())
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (or of every file in a folder, in sorted order, for DICOM series)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON record as a line (metrics logs); flushed so a kill loses at most one line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def truncate_jsonl_after_step(path: Path, step: int) -> None:
    """Keep only the records with ``"step" <= step`` (and drop a line cut by a kill).

    A resumed run calls this so the log does not repeat the steps it redoes after its checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def check_output_folder(folder: Path, owned: Iterable[str], what: str) -> None:
    """Refuse an output folder that is a file, or holds files this command does not write.

    ``owned``: glob patterns of the top-level names the command writes (``"*.nii.gz"``,
    ``"images"``); hidden names (temporary files of a killed run) are always allowed. A missing
    or empty folder passes. ``what`` names the command in the message. Raises InputError naming
    the folder and the first unrelated entry.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InputError(
            f"{folder}: exists and is a file, expected a folder for the {what} outputs"
        )
    patterns = list(owned)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns):
            raise InputError(
                f"{folder}: output folder holds {entry.name!r}, which {what} does not write; "
                "expected an empty folder or one of its own outputs"
            )


def check_inside(folder: Path, path: Path) -> Path:
    """``path`` if it lies inside ``folder`` (after resolving ``..`` and links), else InputError.

    The last guard before writing a file whose name came from data (a case id).
    """
    root = Path(folder).resolve()
    target = Path(path).resolve()
    if target != root and root not in target.parents:
        raise InputError(f"{path}: lies outside the output folder {folder}, expected a file in it")
    return Path(path)
