"""bench/label_checks.py: failed anatomy checks are counted per check, passes are not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "label_checks.py"


def _ring(shape=(24, 24, 4)) -> np.ndarray:
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.sqrt((x - 11.5) ** 2 + (y - 11.5) ** 2)
    classes = np.zeros(shape, np.uint8)
    classes[(r < 8) & (r >= 5)] = 1
    return classes


def test_a_closed_ring_passes_and_a_half_ring_fails_only_the_lumen_check():
    spec = importlib.util.spec_from_file_location("label_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    half = _ring()
    half[:12] = 0  # open: one connected piece, but it encloses nothing
    spacing = (2.0, 2.0, 5.0)
    result = module.tally([(_ring(), spacing), (half, spacing)], ranges={})
    assert result["maps"] == 2 and result["plausible"] == 1
    assert result["failed"] == {"encloses_lumen": 1}
