"""Settings of ``bladdergen train-vqgan`` (defaults: the ``paper`` profile)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class VQGANConfig:
    """3D VQ-GAN architecture and training settings."""

    max_steps: int = 100_000
    batch_size: int = 2
    device: str = "auto"


TINY = {"max_steps": 300, "batch_size": 2}
