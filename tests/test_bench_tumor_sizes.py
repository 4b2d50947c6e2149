"""bench/tumor_sizes.py: the Dice a one-voxel error costs, on a cube counted by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "tumor_sizes.py"


def test_one_voxel_errors_of_a_two_voxel_cube():
    spec = importlib.util.spec_from_file_location("tumor_sizes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tumor = np.zeros((8, 8, 8), bool)
    tumor[3:5, 3:5, 3:5] = True  # 8 voxels
    errors = module.one_voxel_errors(tumor)
    assert errors["voxels"] == 8
    # shifted along X: 4 of the 8 voxels still overlap, 2*4 / (8 + 8)
    assert errors["shifted"] == pytest.approx(0.5)
    # 6-connected erosion empties a 2-voxel-wide cube
    assert errors["eroded"] == pytest.approx(0.0)
    # dilation adds a 2x2 face on each of the 6 sides: 32 voxels, 2*8 / (8 + 32)
    assert errors["dilated"] == pytest.approx(0.4)
