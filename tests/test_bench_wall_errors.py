"""bench/wall_errors.py: wall found and missed, and where, on a ring counted by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "wall_errors.py"


def _module():
    spec = importlib.util.spec_from_file_location("wall_errors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _square_ring():
    """Slice 1 of a (12, 12, 3) map: a wall ring around rows/columns 3..8 with a 4x4 lumen."""
    truth = np.zeros((12, 12, 3), np.int64)
    truth[3:9, 3:9, 1] = 1
    truth[4:8, 4:8, 1] = 0
    return truth


def test_a_prediction_missing_the_anterior_half_is_counted_there():
    module = _module()
    truth = _square_ring()  # 20 wall voxels; the filled bladder's centre is at y = 5.5
    predicted = truth.copy()
    predicted[:, 6:, :] = 0  # y 6..8 (anterior of 5.5) lost: 2 + 2 + 6 = 10 voxels
    predicted[0, 0, 1] = 1  # one false positive far away
    image = np.where(truth == 1, 0.0, -0.6).astype(np.float32)  # fat all around
    counts = module.wall_errors(predicted, truth, image)
    assert (counts["tp"], counts["fp"], counts["fn"]) == (10, 1, 10)
    assert (counts["anterior"], counts["anterior_missed"]) == (10, 10)
    assert (counts["posterior"], counts["posterior_missed"]) == (10, 0)
    rates = module.summary(counts)
    assert rates["precision"] == pytest.approx(10 / 11)
    assert rates["recall"] == pytest.approx(0.5)
    assert rates["volume_ratio"] == pytest.approx(11 / 20)
    assert rates["missed_anterior"] == 1.0 and rates["missed_posterior"] == 0.0


def test_the_wall_s_outside_is_fat_or_isodense_by_the_image_around_it():
    module = _module()
    truth = _square_ring()
    fat = np.where(truth == 1, 0.0, -0.6).astype(np.float32)
    dense = np.zeros_like(fat)  # the lumen too: only what lies outside the filled bladder counts
    for image, group in ((fat, "fat_outside"), (dense, "isodense_outside")):
        counts = module.wall_errors(np.zeros_like(truth), truth, image)
        # every wall voxel of the ring borders the outside within 2 voxels, and all are missed
        assert counts[group] == counts[f"{group}_missed"] == 20
        other = "isodense_outside" if group == "fat_outside" else "fat_outside"
        assert counts[other] == 0
