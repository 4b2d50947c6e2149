"""``sample``: the generation pipeline — noise -> denoiser + sampler -> undo the latent scaling ->
nearest codes -> VQ-GAN decoder -> Hounsfield units -> NIfTI (int16) with the training geometry.

Sample ``i`` draws all its randomness from its own generator seeded by (``seed``, ``i``), so the
files do not depend on the batch size, on interruptions, or on how indices are split across
``torchrun`` ranks. Existing outputs are skipped (resume); every file is written atomically.

Output folder::

    OUT/sample_00000.nii.gz ...      int16 HU volumes (X, Y, Z)
    OUT/labels/sample_00000.nii.gz   uint8 label map in the dataset's values (0/255/128), same
                                     geometry, when the VQ-GAN's label decoder was trained
    OUT/checks/sample_00000.json     that label map's anatomy measurements and plausibility checks
    OUT/previews/sample_00000.png    montage of the axial slices (with previews on)
    OUT/manifest.json                settings, checkpoint hashes, one entry per sample
    OUT/config.yaml                  resolved configuration of the sampling run
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bladdergen.checkpoint import (
    load_state_dict_strict,
    load_weights,
    require_metadata,
    resolve_weights,
)
from bladdergen.data.intensity import unit_to_hu
from bladdergen.data.volumes import write_nifti
from bladdergen.diffusion.config import LDMConfig
from bladdergen.diffusion.latents import LatentScaler
from bladdergen.diffusion.preview import write_preview
from bladdergen.diffusion.samplers import make_sampler, per_sample_noise
from bladdergen.diffusion.schedule import NoiseSchedule
from bladdergen.diffusion.train import KIND
from bladdergen.diffusion.unet import PseudoUNet3D, build_denoiser
from bladdergen.errors import CheckpointError, ConfigError, InputError
from bladdergen.fileio import atomic_write_json, check_output_folder, sha256_file
from bladdergen.progress import SILENT, Reporter
from bladdergen.runtime import Runtime, all_reduce_sum_, autocast, barrier, start_runtime
from bladdergen.settings import from_mapping, to_mapping, write_yaml

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "bladdergen-samples"
PREVIEW_DIR = "previews"
LABELS_DIR = "labels"
CHECKS_DIR = "checks"
# What sample writes into --out (anything else there is refused as unrelated).
OWNED_OUTPUTS = (
    "sample_*.nii.gz",
    PREVIEW_DIR,
    LABELS_DIR,
    CHECKS_DIR,
    MANIFEST_NAME,
    "config.yaml",
)
# What sampling reads from a ``train-ldm`` checkpoint's metadata.
LDM_METADATA = {
    "config.ldm": dict,
    "latent_shape": list,
    "scaler": dict,
    "window": list,
    "affine": list,
    "vqgan_path": str,
    "vqgan_hash": str,
}

if TYPE_CHECKING:
    from bladdergen.config import PipelineConfig


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` in a run with ``--seed seed`` (63-bit, independent streams)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & (2**63 - 1)


def sample_name(index: int) -> str:
    return f"sample_{index:05d}"


def load_ldm(path: Path, device: torch.device) -> tuple[PseudoUNet3D, dict[str, Any], Path]:
    """An LDM run folder or checkpoint -> (EMA denoiser in eval mode, metadata, weights file)."""
    weights_path = resolve_weights(Path(path))
    tensors, metadata = load_weights(weights_path, expected_kind=KIND, device="cpu")
    require_metadata(metadata, weights_path, LDM_METADATA)
    try:
        ldm_config = from_mapping(LDMConfig, metadata["config"]["ldm"], f"{weights_path}: ldm")
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(
            f"{weights_path}: LDM checkpoint has no valid config ({error})"
        ) from None
    model = build_denoiser(int(metadata["latent_shape"][0]), ldm_config)
    load_state_dict_strict(model, tensors, weights_path)
    metadata = dict(metadata)
    metadata["resolved_ldm_config"] = ldm_config
    return model.to(device).eval(), metadata, weights_path


def _nifti_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{sample_name(index)}.nii.gz"


def _complete_samples(out_dir: Path, n: int, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Manifest entries of the samples among ``0..n-1`` whose volume file exists."""
    samples = []
    for i in range(n):
        if not _nifti_path(out_dir, i).is_file():
            continue
        entry: dict[str, Any] = {
            "index": i,
            "file": _nifti_path(out_dir, i).name,
            "seed": sample_seed(settings["seed"], i),
            "sampler": settings["sampler"],
            "steps": settings["steps"],
            "checkpoint_sha256": settings["checkpoint_sha256"],
        }
        label = out_dir / LABELS_DIR / f"{sample_name(i)}.nii.gz"
        if label.is_file():
            entry["label"] = f"{LABELS_DIR}/{label.name}"
        checks = out_dir / CHECKS_DIR / f"{sample_name(i)}.json"
        if checks.is_file():
            entry["anatomy"] = json.loads(checks.read_text(encoding="utf-8"))
            entry["plausible"] = bool(entry["anatomy"]["checks"]["plausible"])
        preview = out_dir / PREVIEW_DIR / f"{sample_name(i)}.png"
        if preview.is_file():
            entry["preview"] = f"{PREVIEW_DIR}/{preview.name}"
        samples.append(entry)
    return samples


def _write_label(
    out_dir: Path,
    index: int,
    classes: np.ndarray,
    affine: np.ndarray,
    label_map: dict[int, int] | None,
    ranges: dict[str, list[float]],
) -> None:
    """The sample's label map (the dataset's values, uint8) and its anatomy checks (JSON)."""
    from bladdergen.data.preprocess import classes_to_label_values
    from bladdergen.evaluate.anatomy import measure_anatomy, plausibility

    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    measurement = measure_anatomy(classes, spacing)
    checks = plausibility(measurement, ranges)
    name = sample_name(index)
    atomic_write_json(
        out_dir / CHECKS_DIR / f"{name}.json", {"measurement": measurement, "checks": checks}
    )
    values = classes_to_label_values(classes, label_map)
    write_nifti(out_dir / LABELS_DIR / f"{name}.nii.gz", values, affine, np.uint8)


def _check_inputs(n: int, seed: int, out_dir: Path) -> None:
    """Everything about the request that can be refused before a file is written."""
    if n < 1:
        raise InputError(f"-n: got {n}, expected at least 1 sample")
    if seed < 0:
        raise InputError(f"--seed: got {seed}, expected a whole number >= 0")
    check_output_folder(out_dir, OWNED_OUTPUTS, "sample")


def _settings(config: PipelineConfig, seed: int, checkpoint_hash: str, vqgan_hash: str) -> dict:
    cfg = config.sample
    return {
        "seed": seed,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "eta": cfg.eta if cfg.sampler == "ddim" else None,
        "clip_x0": cfg.clip_x0,
        "checkpoint_sha256": checkpoint_hash,
        "vqgan_sha256": vqgan_hash,
    }


def _check_existing_manifest(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix samples made with other settings into one folder."""
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(
            f"{path}: unreadable manifest; remove it or choose another --out"
        ) from None
    if not isinstance(existing, dict) or existing.get("format") != MANIFEST_FORMAT:
        found = existing.get("format") if isinstance(existing, dict) else type(existing).__name__
        raise InputError(
            f"{path}: manifest of format {found!r}, expected {MANIFEST_FORMAT!r}; "
            "choose another --out"
        )
    old = existing.get("settings")
    if not isinstance(old, dict):
        raise InputError(f"{path}: manifest has no settings object; choose another --out")
    for key, value in settings.items():
        if old.get(key) != value:
            raise InputError(
                f"{path.parent}: holds samples made with {key}={old.get(key)!r}, "
                f"now {value!r}; choose another --out to sample with new settings"
            )


def sample_volumes(
    config: PipelineConfig,
    ldm_path: Path,
    out_dir: Path,
    n: int,
    vqgan_path: Path | None = None,
    reporter: Reporter = SILENT,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Generate ``n`` volumes into ``out_dir`` with ``config.sample`` settings and ``config.seed``.

    ``ldm_path``: a ``train-ldm`` run folder or checkpoint; ``vqgan_path`` overrides the VQ-GAN
    location recorded in it (its weights must hash to the recorded value). Returns a summary
    (counts, seconds per volume, paths). Raises InputError / CheckpointError on bad input.
    """
    from bladdergen.vqgan.load import load_vqgan

    cfg = config.sample
    out_dir = Path(out_dir)
    _check_inputs(n, config.seed, out_dir)
    runtime = runtime or start_runtime(cfg.device)
    device = runtime.device

    model, metadata, weights_path = load_ldm(ldm_path, device)
    vqgan_source = Path(vqgan_path) if vqgan_path is not None else Path(metadata["vqgan_path"])
    if vqgan_path is None and not vqgan_source.exists():
        raise CheckpointError(
            f"{weights_path}: its VQ-GAN {vqgan_source} no longer exists; pass --vqgan with the "
            "VQ-GAN it was trained with"
        )
    vqgan, vq_meta = load_vqgan(vqgan_source, device)
    if vq_meta.get("weights_sha256") != metadata["vqgan_hash"]:
        raise CheckpointError(
            f"{vq_meta['path']}: is not the VQ-GAN this LDM was trained with (weights hash "
            f"{str(vq_meta.get('weights_sha256'))[:12]}, expected {metadata['vqgan_hash'][:12]})"
        )
    scaler = LatentScaler.from_dict(metadata["scaler"])
    window = tuple(float(w) for w in metadata["window"])
    affine = np.asarray(metadata["affine"], dtype=np.float64)
    latent_shape = tuple(int(s) for s in metadata["latent_shape"])
    ldm_config = metadata["resolved_ldm_config"]
    schedule = NoiseSchedule.create(ldm_config.schedule, ldm_config.timesteps)
    sampler = make_sampler(cfg.sampler, schedule, cfg.steps, cfg.clip_x0, cfg.eta)

    # a VQ-GAN whose label decoder learned from labeled cases decodes each sample's labels too
    paired = bool(vq_meta.get("labels_trained")) and vqgan.label_decoder is not None
    label_map = {int(k): int(v) for k, v in metadata.get("label_map", {}).items()} or None
    ranges = metadata.get("anatomy_ranges", {})
    checkpoint_hash = sha256_file(weights_path)
    settings = _settings(config, config.seed, checkpoint_hash, metadata["vqgan_hash"])
    manifest_path = out_dir / MANIFEST_NAME
    _check_existing_manifest(manifest_path, settings)

    def write_manifest(samples: list[dict[str, Any]]) -> None:
        atomic_write_json(
            manifest_path,
            {
                "format": MANIFEST_FORMAT,
                "settings": settings,
                "checkpoint": str(weights_path.resolve()),
                "vqgan": str(Path(vq_meta["path"]).resolve()),
                "window": list(window),
                "samples": samples,
            },
        )

    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(to_mapping(config), out_dir / "config.yaml")
        # written first too, so an interrupted folder still records its settings
        write_manifest(_complete_samples(out_dir, n, settings))
    barrier()

    def nifti_path(i: int) -> Path:
        return _nifti_path(out_dir, i)

    todo = [i for i in range(n) if not nifti_path(i).is_file()]
    mine = todo[runtime.rank :: runtime.world_size]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return model(x, t)

    started = time.perf_counter()
    progress = reporter if runtime.is_main else SILENT
    with torch.no_grad(), progress.task("sampling volumes", total=len(mine)) as task:
        for first in range(0, len(mine), cfg.batch_size):
            indices = mine[first : first + cfg.batch_size]
            generators = [
                torch.Generator().manual_seed(sample_seed(config.seed, i)) for i in indices
            ]
            x_T = per_sample_noise(latent_shape, generators, device)
            z = scaler.from_unit(sampler.sample(denoise, x_T, generators))
            z_q, _ = vqgan.quantize(z)  # exact code vectors: batch-size noise is snapped away
            for row, index in enumerate(indices):
                # decoded one at a time: batched convolutions may round differently, and a
                # sample's file must not depend on its batch
                volume = vqgan.decode(z_q[row : row + 1]).float()[0, 0].cpu().numpy()
                hu = unit_to_hu(volume, window)  # (X, Y, Z)
                if paired:
                    logits = vqgan.decode_labels(z_q[row : row + 1]).float()
                    classes = logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
                    _write_label(out_dir, index, classes, affine, label_map, ranges)
                if cfg.previews:
                    write_preview(out_dir / PREVIEW_DIR / f"{sample_name(index)}.png", hu, window)
                # the volume is written last: its presence marks a complete sample
                write_nifti(nifti_path(index), hu, affine, np.int16)
            task.advance(len(indices))
    seconds = time.perf_counter() - started
    generated = int(all_reduce_sum_(torch.tensor([len(mine)]))[0])  # over all ranks
    barrier()

    samples = _complete_samples(out_dir, n, settings)
    if runtime.is_main:
        write_manifest(samples)
    return {
        "out_dir": str(out_dir),
        "requested": n,
        "generated": generated,
        "skipped": n - len(todo),
        "complete": len(samples),
        "sampler": cfg.sampler,
        "steps": len(sampler.timesteps),
        "seconds": round(seconds, 2),
        # wall time per volume of this process's share
        "seconds_per_volume": round(seconds / len(mine), 3) if mine else None,
        "labels": paired,
        "plausible": sum(bool(s.get("plausible")) for s in samples) if paired else None,
        "manifest": str(manifest_path),
    }
