"""``sample``: the generation pipeline — noise -> denoiser + sampler -> undo the latent scaling ->
nearest codes -> VQ-GAN decoder -> Hounsfield units -> NIfTI (int16) with the training geometry.

Sample ``i`` draws all its randomness from its own generator seeded by (``seed``, ``i``), so the
files do not depend on the batch size, on interruptions, or on how indices are split across
``torchrun`` ranks. Existing outputs are skipped (resume); every file is written atomically.

Output folder::

    OUT/images/sample_00000.nii.gz   int16 HU volumes (X, Y, Z)
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
from bladdergen.diffusion.layout import (
    LAYOUTS,
    SampleLayout,
    sample_name,
    write_nnunet_dataset_json,
)
from bladdergen.diffusion.noise import NoiseModel, add_noise
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
NOISE_STREAM = 1  # third seed word of a sample's added-noise generator
MANIFEST_FORMAT = "bladdergen-samples"
PREVIEW_DIR = "previews"
# What sample writes into --out besides its layout's files (anything else there is refused).
COMMON_OUTPUTS = (PREVIEW_DIR, "checks", MANIFEST_NAME, "config.yaml")
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


def saved_ldm_config(metadata: dict[str, Any], weights_path: Path) -> LDMConfig:
    """The denoiser settings an LDM checkpoint was trained with; CheckpointError if unreadable."""
    try:
        # runs trained before coordinate channels existed have none
        saved = {"coordinate_channels": False, **metadata["config"]["ldm"]}
        return from_mapping(LDMConfig, saved, f"{weights_path}: ldm")
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(
            f"{weights_path}: LDM checkpoint has no valid config ({error})"
        ) from None


def load_ldm(path: Path, device: torch.device) -> tuple[PseudoUNet3D, dict[str, Any], Path]:
    """An LDM run folder or checkpoint -> (EMA denoiser in eval mode, metadata, weights file)."""
    weights_path = resolve_weights(Path(path))
    tensors, metadata = load_weights(weights_path, expected_kind=KIND, device="cpu")
    require_metadata(metadata, weights_path, LDM_METADATA)
    ldm_config = saved_ldm_config(metadata, weights_path)
    model = build_denoiser(int(metadata["latent_shape"][0]), ldm_config)
    load_state_dict_strict(model, tensors, weights_path)
    metadata = dict(metadata)
    metadata["resolved_ldm_config"] = ldm_config
    return model.to(device).eval(), metadata, weights_path


def _sample_entries(
    out_dir: Path, layout: SampleLayout, candidates: int, settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, rejected) manifest entries among candidates ``0..candidates-1``: a kept sample has
    its image file; a rejected one only its checks (``--keep plausible``)."""
    kept, rejected = [], []
    for i in range(candidates):
        image, checks = layout.image(out_dir, i), layout.checks(out_dir, i)
        anatomy = json.loads(checks.read_text(encoding="utf-8")) if checks.is_file() else None
        entry: dict[str, Any] = {"index": i, "seed": sample_seed(settings["seed"], i)}
        if not image.is_file():
            if anatomy is not None and not anatomy["checks"]["plausible"]:
                rejected.append({**entry, "anatomy": anatomy})
            continue
        entry |= {
            "file": str(image.relative_to(out_dir)),
            "sampler": settings["sampler"],
            "steps": settings["steps"],
            "checkpoint_sha256": settings["checkpoint_sha256"],
        }
        label = layout.label(out_dir, i)
        if label.is_file():
            entry["label"] = str(label.relative_to(out_dir))
        if anatomy is not None:
            entry["anatomy"] = anatomy
            entry["plausible"] = bool(anatomy["checks"]["plausible"])
        preview = out_dir / PREVIEW_DIR / f"{sample_name(i)}.png"
        if preview.is_file():
            entry["preview"] = f"{PREVIEW_DIR}/{preview.name}"
        kept.append(entry)
    return kept, rejected


def label_checks(
    classes: np.ndarray, affine: np.ndarray, ranges: dict[str, list[float]]
) -> dict[str, Any]:
    """Anatomy measurements of a generated label map (X, Y, Z) and their plausibility checks: the
    record ``sample`` writes to ``checks/<name>.json``."""
    from bladdergen.evaluate.anatomy import measure_anatomy, plausibility

    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    measurement = measure_anatomy(classes, spacing)
    return {"measurement": measurement, "checks": plausibility(measurement, ranges)}


def _check_inputs(n: int, seed: int, out_dir: Path, layout: SampleLayout) -> None:
    """Everything about the request that can be refused before a file is written."""
    if n < 1:
        raise InputError(f"-n: got {n}, expected at least 1 sample")
    if seed < 0:
        raise InputError(f"--seed: got {seed}, expected a whole number >= 0")
    check_output_folder(out_dir, COMMON_OUTPUTS + layout.owned(), "sample")


def _settings(
    config: PipelineConfig,
    seed: int,
    checkpoint_hash: str,
    vqgan_hash: str,
    noise: NoiseModel | None,
) -> dict:
    cfg = config.sample
    return {
        "seed": seed,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "eta": cfg.eta if cfg.sampler == "ddim" else None,
        "clip_x0": cfg.clip_x0,
        "layout": cfg.layout,
        "keep": cfg.keep,
        "checkpoint_sha256": checkpoint_hash,
        "vqgan_sha256": vqgan_hash,
        # the noise model added; absent (None) in folders sampled before it existed
        "noise": noise.to_dict() if noise is not None else None,
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
    layout = LAYOUTS[cfg.layout]
    _check_inputs(n, config.seed, out_dir, layout)
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
    window = tuple(float(w) for w in metadata["window"])
    affine = np.asarray(metadata["affine"], dtype=np.float64)
    latent_shape = tuple(int(s) for s in metadata["latent_shape"])
    scaler = LatentScaler.from_dict(metadata["scaler"], latent_shape[0])
    ldm_config = metadata["resolved_ldm_config"]
    schedule = NoiseSchedule.create(ldm_config.schedule, ldm_config.timesteps)
    bounds = scaler.clip_bounds(torch.zeros((), device=device))
    sampler = make_sampler(cfg.sampler, schedule, cfg.steps, cfg.clip_x0, cfg.eta, bounds)

    # a VQ-GAN whose label decoder learned from labeled cases decodes each sample's labels too
    paired = bool(vq_meta.get("labels_trained")) and vqgan.label_decoder is not None
    label_map = {int(k): int(v) for k, v in metadata.get("label_map", {}).items()} or None
    ranges = metadata.get("anatomy_ranges", {})
    if not paired and (cfg.layout == "nnunet" or cfg.keep == "plausible"):
        what = "--layout nnunet" if cfg.layout == "nnunet" else "--keep plausible"
        raise InputError(
            f"{vq_meta['path']}: {what} needs label maps, but this VQ-GAN's label decoder was not "
            "trained (labels_trained is false: train-vqgan on a set with labeled cases)"
        )
    if cfg.keep == "plausible" and runtime.distributed:
        raise InputError("--keep plausible: runs in one process (it accepts samples in order)")
    # --keep plausible tries at most max_attempts * n candidates
    candidates = n * cfg.max_attempts if cfg.keep == "plausible" else n
    noise = None
    if cfg.noise == "residual":
        if metadata.get("noise_model"):
            try:
                noise = NoiseModel.from_dict(metadata["noise_model"])
            except (KeyError, TypeError, ValueError) as error:
                raise CheckpointError(f"{weights_path}: unreadable noise_model ({error})") from None
        elif runtime.is_main:
            reporter.notice(
                f"{weights_path}: has no noise model (trained before it); no noise added"
            )
    checkpoint_hash = sha256_file(weights_path)
    settings = _settings(config, config.seed, checkpoint_hash, metadata["vqgan_hash"], noise)
    manifest_path = out_dir / MANIFEST_NAME
    _check_existing_manifest(manifest_path, settings)

    def write_manifest(samples: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> None:
        atomic_write_json(
            manifest_path,
            {
                "format": MANIFEST_FORMAT,
                "settings": settings,
                "checkpoint": str(weights_path.resolve()),
                "vqgan": str(Path(vq_meta["path"]).resolve()),
                "window": list(window),
                "samples": samples,
                "rejected": rejected,
            },
        )
        if layout.nnunet:
            write_nnunet_dataset_json(out_dir, len(samples))

    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(to_mapping(config), out_dir / "config.yaml")
        # written first too, so an interrupted folder still records its settings
        write_manifest(*_sample_entries(out_dir, layout, candidates, settings))
    barrier()

    kept_before, rejected_before = _sample_entries(out_dir, layout, candidates, settings)
    decided = {e["index"] for e in kept_before + rejected_before}
    todo = [i for i in range(candidates) if i not in decided]
    mine = todo[runtime.rank :: runtime.world_size]
    wanted = n - len(kept_before)  # kept samples still to make

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return model(x, t)

    started, generated = time.perf_counter(), 0
    progress = reporter if runtime.is_main else SILENT
    with torch.no_grad(), progress.task("sampling volumes", total=max(wanted, 0)) as task:
        for first in range(0, len(mine), cfg.batch_size):
            if wanted <= 0:
                break
            indices = mine[first : first + cfg.batch_size]
            generators = [
                torch.Generator().manual_seed(sample_seed(config.seed, i)) for i in indices
            ]
            x_T = per_sample_noise(latent_shape, generators, device)
            z = scaler.from_unit(sampler.sample(denoise, x_T, generators))
            z_q, _ = vqgan.quantize(z)  # exact code vectors: batch-size noise is snapped away
            generated += len(indices)
            # decided in index order, so which samples are kept does not depend on the batch
            for row, index in enumerate(indices):
                if wanted <= 0:
                    break  # enough kept: later candidates of this batch are not written
                # decoded one at a time: batched convolutions may round differently, and a
                # sample's files must not depend on its batch
                latent = z_q[row : row + 1]
                classes = None
                if paired:
                    image, decoded = vqgan.decode_pair(latent)
                    classes = decoded[0].cpu().numpy()
                    anatomy = label_checks(classes, affine, ranges)
                    atomic_write_json(layout.checks(out_dir, index), anatomy)
                    if cfg.keep == "plausible" and not anatomy["checks"]["plausible"]:
                        continue  # rejected: its checks are recorded, its files not written
                    values = layout.label_values(classes, label_map)
                    write_nifti(layout.label(out_dir, index), values, affine, np.uint8)
                else:
                    image = vqgan.decode(latent)
                hu = unit_to_hu(image.float()[0, 0].cpu().numpy(), window)
                if noise is not None:
                    # its own stream per sample, so the noise does not depend on the batch
                    rng = np.random.default_rng([config.seed, index, NOISE_STREAM])
                    hu = add_noise(hu, noise, window, rng)
                if cfg.previews:
                    preview = out_dir / PREVIEW_DIR / f"{sample_name(index)}.png"
                    write_preview(preview, hu, window, classes)
                # the image is written last: its presence marks a complete sample
                write_nifti(layout.image(out_dir, index), hu, affine, np.int16)
                wanted -= 1
                task.advance(1)
    seconds = time.perf_counter() - started
    # over all ranks; on the run's device, as NCCL all-reduces CUDA tensors only
    generated = int(all_reduce_sum_(torch.tensor([generated], device=device))[0])
    barrier()

    samples, rejected = _sample_entries(out_dir, layout, candidates, settings)
    if runtime.is_main:
        write_manifest(samples, rejected)
    if len(samples) < n:
        run_reporter = reporter if runtime.is_main else SILENT
        run_reporter.notice(
            f"{out_dir}: {len(samples)} of {n} samples kept after {candidates} candidates "
            f"({len(rejected)} implausible); raise sample.max_attempts for more"
        )
    return {
        "out_dir": str(out_dir),
        "requested": n,
        "generated": generated,
        "skipped": len(kept_before),
        "complete": len(samples),
        "rejected": len(rejected),
        "layout": cfg.layout,
        "sampler": cfg.sampler,
        "steps": len(sampler.timesteps),
        "seconds": round(seconds, 2),
        # wall time per volume of this process's share
        "seconds_per_volume": round(seconds / generated, 3) if generated else None,
        "labels": paired,
        "plausible": sum(bool(s.get("plausible")) for s in samples) if paired else None,
        "manifest": str(manifest_path),
    }
