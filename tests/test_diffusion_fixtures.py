"""Shared builders for the LDM tests (no tests here): a micro configuration, and a real VQ-GAN
whose codebook is initialised from the tiny test set (one training-mode pass), saved as a
``train-vqgan`` checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bladdergen.config import PipelineConfig, load_config
from bladdergen.data.dataset import PreprocessedSet

MICRO = {
    "vqgan.n_hiddens": 8,
    "vqgan.n_codes": 32,
    "vqgan.downsample": [4, 4, 2],
    "ldm.base_channels": 8,
    "ldm.channel_mults": [1, 2],
    "ldm.attention_heads": 2,
    "ldm.attention_head_channels": 4,
    "ldm.norm_groups": 4,
    "ldm.timesteps": 20,
    "ldm.max_steps": 4,
    # a cosine rate depends on max_steps, which the resume tests extend (tested on its own)
    "ldm.lr_schedule": "constant",
    "ldm.batch_size": 1,
    "ldm.grad_accumulation": 2,
    "ldm.ema_start": 2,
    "ldm.ema_every": 1,
    "ldm.log_every": 1,
    "ldm.checkpoint_every": 2,
    "ldm.device": "cpu",
    "sample.steps": 4,
    "sample.batch_size": 2,
    "sample.device": "cpu",
}


def micro_config(**overrides: Any) -> PipelineConfig:
    """The tiny profile shrunk to seconds (32x32x8 volumes -> 8x8x8x4 latents)."""
    return load_config("tiny", overrides={**MICRO, **overrides})


def make_vqgan(run_dir: Path, data_dir: Path, seed: int = 0) -> Path:
    """Save a VQ-GAN whose codebook was initialised on ``data_dir``; returns ``run_dir``."""
    from bladdergen.vqgan.load import save_vqgan
    from bladdergen.vqgan.model import VQGAN

    torch.manual_seed(seed)
    config = micro_config().vqgan
    model = VQGAN(config).train()
    dataset = PreprocessedSet.open(data_dir)
    volumes = torch.stack([torch.from_numpy(dataset.load_image(c)) for c in dataset.cases])
    with torch.no_grad():
        model(volumes[:, None])  # data-dependent codebook initialisation
    model.eval()
    save_vqgan(
        Path(run_dir) / "model.safetensors",
        model,
        step=1,
        window=dataset.window,
        volume_shape=tuple(volumes.shape[1:]),
        code_usage=1.0,
    )
    return Path(run_dir)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These micro models are far too small to gain from threads; one thread avoids OpenMP
    spin-waiting when the CI cores are shared. Restores the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
