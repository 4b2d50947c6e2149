"""Settings of ``bladdergen train-deepatlas`` and ``bladdergen segment`` (defaults: ``paper``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DeepAtlasConfig:
    """Segmentation and registration networks, losses and the alternating schedule."""

    max_steps: int = 20_000
    device: str = "auto"


TINY = {"max_steps": 300}
