"""Settings of ``bladdergen evaluate`` (defaults: the ``paper`` profile)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EvaluateConfig:
    """Metric settings shared by ``evaluate seg`` and ``evaluate gen``."""

    bootstrap_samples: int = 2000
    confidence: float = 0.95


TINY: dict = {}
