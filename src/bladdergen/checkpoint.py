"""Checkpoints: model weights in safetensors with JSON metadata, training state for exact resume.

Layout of a run folder written by a ``train-*`` command::

    RUN_DIR/config.yaml          resolved configuration of the run
    RUN_DIR/model.safetensors    latest weights (+ metadata: kind, step, config, stage facts)
    RUN_DIR/best.safetensors     best weights by validation, where the stage validates
    RUN_DIR/training_state.pt    optimisers, step, RNG states: what ``--resume`` needs
    RUN_DIR/metrics.jsonl        one JSON record per logged step

All writes are atomic. Weights never go through pickle; the training state is loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from bladdergen.errors import CheckpointError
from bladdergen.fileio import atomic_path

WEIGHTS_NAME = "model.safetensors"
BEST_WEIGHTS_NAME = "best.safetensors"
STATE_NAME = "training_state.pt"
METADATA_KEY = "bladdergen"


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write ``tensors`` (contiguous CPU copies) and JSON ``metadata`` to a safetensors file.

    ``metadata`` must contain ``kind`` (e.g. ``"vqgan"``) so a checkpoint of the wrong stage is
    refused on load with a clear message.
    """
    if "kind" not in metadata:
        raise ValueError("checkpoint metadata needs a 'kind'")
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    with atomic_path(Path(path)) as tmp:
        save_file(cpu, str(tmp), metadata=header)


def read_metadata(path: Path) -> dict[str, Any]:
    """Only the JSON metadata of a safetensors checkpoint (cheap: reads the header)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file has no bladdergen metadata")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: bladdergen metadata is not valid JSON ({error.msg} at character "
            f"{error.pos}), expected the JSON object written by training"
        ) from None
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{path}: bladdergen metadata is a JSON {type(metadata).__name__}, expected an object"
        )
    return metadata


def require_metadata(
    metadata: dict[str, Any], path: Path, fields: dict[str, type | tuple[type, ...]]
) -> None:
    """Refuse checkpoint ``metadata`` that lacks one of ``fields`` or holds it with another type.

    ``fields``: dotted key (``"config.deepatlas"``) -> expected type(s). Raises CheckpointError
    naming the file, the key, what was found and what was expected.
    """
    names = {dict: "object", list: "list", str: "string", int: "integer", float: "number"}
    for dotted, expected in fields.items():
        value: Any = metadata
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise CheckpointError(
                    f"{path}: checkpoint metadata has no {dotted!r}, expected it to be written "
                    "by training (a damaged or foreign checkpoint?)"
                )
            value = value[part]
        kinds = expected if isinstance(expected, tuple) else (expected,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(names.get(k, k.__name__) for k in kinds)
            raise CheckpointError(
                f"{path}: checkpoint metadata {dotted!r} is {value!r:.60}, expected a {wanted}"
            )


def load_weights(
    path: Path, expected_kind: str | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and metadata; ``expected_kind`` guards against a checkpoint of another stage."""
    metadata = read_metadata(path)
    if expected_kind is not None and metadata.get("kind") != expected_kind:
        raise CheckpointError(
            f"{path}: checkpoint is a {metadata.get('kind')!r} model, expected {expected_kind!r}"
        )
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    return tensors, metadata


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path):
    """``module.load_state_dict`` with a one-line CheckpointError when shapes or names differ."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"{path}: checkpoint does not match the configured model ({detail[:300]})"
        ) from None


def resolve_weights(path: Path, prefer_best: bool = False) -> Path:
    """A run folder or a checkpoint file -> the safetensors file to load.

    In a folder, ``best.safetensors`` is used when ``prefer_best`` and it exists, else
    ``model.safetensors``.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        best, latest = path / BEST_WEIGHTS_NAME, path / WEIGHTS_NAME
        if prefer_best and best.is_file():
            return best
        if latest.is_file():
            return latest
        if best.is_file():
            return best
        raise CheckpointError(f"{path}: run folder holds no {WEIGHTS_NAME} (has training run?)")
    raise CheckpointError(f"{path}: no such run folder or checkpoint file")


# ----------------------------------------------------------------------------------------------
# Training state for exact resume


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training loop touches."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(_python_state_to_list(random.getstate())),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> tuple:
    version, internal, gauss = state
    return version, list(internal), gauss


def _numpy_state_to_plain(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically save a training-state dict (tensors, numbers, strings, lists, dicts only)."""
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path) -> dict[str, Any]:
    """Load a training state saved by :func:`save_training_state` without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path}: unreadable training state ({type(error).__name__})"
        ) from None
