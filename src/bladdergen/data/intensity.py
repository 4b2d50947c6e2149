"""HU <-> network intensity: a fixed window mapped linearly onto [-1, 1].

The window is stored in every preprocessed set's manifest and every checkpoint that needs it, so
generated volumes go back to Hounsfield units with the exact mapping that trained the model.
"""

from __future__ import annotations

import numpy as np


def hu_to_unit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU -> [-1, 1] (float32): ``window[0]`` maps to -1, ``window[1]`` to +1, outside is clipped."""
    low, high = float(window[0]), float(window[1])
    scaled = (np.asarray(hu, dtype=np.float32) - low) / (high - low) * 2.0 - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32, copy=False)


def unit_to_hu(unit: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """[-1, 1] -> HU (float32), the inverse of :func:`hu_to_unit` inside the window."""
    low, high = float(window[0]), float(window[1])
    clipped = np.clip(np.asarray(unit, dtype=np.float32), -1.0, 1.0)
    return ((clipped + 1.0) * 0.5 * (high - low) + low).astype(np.float32, copy=False)
