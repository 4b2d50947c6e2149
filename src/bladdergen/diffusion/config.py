"""Settings of ``bladdergen train-ldm`` and ``bladdergen sample`` (defaults: ``paper`` profile)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class LDMConfig:
    """Latent DDPM denoiser and training settings."""

    max_steps: int = 100_000
    batch_size: int = 2
    device: str = "auto"


@dataclasses.dataclass
class SampleConfig:
    """How ``sample`` draws volumes from a trained LDM."""

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = 50
    batch_size: int = 4
    device: str = "auto"


LDM_TINY = {"max_steps": 300}
SAMPLE_TINY = {"batch_size": 4}
