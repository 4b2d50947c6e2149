"""Saving and loading a trained VQ-GAN (safetensors weights + JSON metadata).

Metadata of a ``kind: vqgan`` checkpoint: ``config`` (the resolved ``vqgan`` section), ``step``,
``code_usage`` (fraction of the codebook the training volumes map to), ``codebook_min`` / ``codebook_max`` (global range of the
codebook entries, for the LDM's latent scaling), ``window`` (HU window of the training data),
``volume_shape`` (X, Y, Z voxels it was trained on), ``latent_shape`` and ``weights_sha256`` (an
identity of the tensors, so a later stage can check it uses the VQ-GAN it was trained with).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from bladdergen.checkpoint import (
    load_state_dict_strict,
    load_weights,
    require_metadata,
    resolve_weights,
    save_weights,
)
from bladdergen.errors import CheckpointError, ConfigError
from bladdergen.settings import from_mapping, to_mapping
from bladdergen.vqgan.config import VQGANConfig
from bladdergen.vqgan.model import VQGAN

KIND = "vqgan"
FORMAT_VERSION = 1
# What later stages read from a VQ-GAN checkpoint's metadata.
REQUIRED_METADATA = {
    "config": dict,
    "window": list,
    "volume_shape": list,
    "latent_shape": list,
    "codebook_min": (int, float),
    "codebook_max": (int, float),
}


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_vqgan(
    path: Path,
    model: VQGAN,
    step: int,
    window: tuple[float, float],
    volume_shape: tuple[int, int, int],
    code_usage: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model``'s weights and facts to ``path`` atomically; returns the metadata.

    ``code_usage``: fraction of the codebook the training volumes map to. ``labels_trained``
    (in the metadata) says whether the label decoder learned from labeled cases: only then does
    ``sample`` write label maps.
    """
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    low, high = model.codebook_range()
    metadata: dict[str, Any] = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "config": to_mapping(model.config),
        "step": int(step),
        "code_usage": float(code_usage),
        "codebook_min": low,
        "codebook_max": high,
        "window": [float(window[0]), float(window[1])],
        "volume_shape": [int(n) for n in volume_shape],
        "latent_shape": list(model.latent_shape(tuple(volume_shape))),
        "weights_sha256": weights_sha256(tensors),
        "labels_trained": False,
        **(extra or {}),
    }
    save_weights(Path(path), tensors, metadata)
    return metadata


def load_vqgan(path_or_run_dir: Path | str, device: str | torch.device = "cpu"):
    """A run folder or ``.safetensors`` file -> ``(VQGAN in eval mode, metadata dict)``.

    ``metadata`` is plain JSON (see the module docstring) plus ``path``, the file loaded; the
    resolved :class:`VQGANConfig` is ``model.config``.

    The model is built from the checkpoint's own config; its tensors must match it exactly and
    hash to the recorded ``weights_sha256``. Raises CheckpointError otherwise (a wrong stage, a
    corrupt file, a mismatch).
    """
    path = resolve_weights(Path(path_or_run_dir))
    tensors, metadata = load_weights(path, expected_kind=KIND, device="cpu")
    require_metadata(metadata, path, REQUIRED_METADATA)
    stored = dict(metadata["config"])
    stored.setdefault("label_head", False)  # checkpoints from before the label decoder
    stored.setdefault("label_lumen", False)  # ... and from before its lumen class
    stored.setdefault("image_from_labels", False)  # ... and from before the image read it
    try:
        config = from_mapping(VQGANConfig, stored, where=f"{path}: config")
    except ConfigError as error:
        raise CheckpointError(f"{path}: stored VQ-GAN config is invalid ({error})") from None
    recorded = metadata.get("weights_sha256")
    actual = weights_sha256(tensors)
    if recorded is not None and recorded != actual:
        raise CheckpointError(f"{path}: weights do not match their recorded weights_sha256")
    model = VQGAN(config)
    load_state_dict_strict(model, tensors, path)
    if not bool(model.codebook.initialized):
        raise CheckpointError(f"{path}: the VQ-GAN codebook was never initialised (no training?)")
    model.to(device).eval()
    metadata = dict(metadata)
    metadata["path"] = str(path)
    metadata["weights_sha256"] = actual  # older files without it get their identity here
    return model, metadata
