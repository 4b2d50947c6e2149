"""The noise model: measured on (real, reconstruction) pairs, drawn into generated volumes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bladdergen.checkpoint import load_weights, read_metadata, save_weights
from bladdergen.diffusion.noise import (
    NoiseModel,
    add_noise,
    detrended_statistics,
    estimate_noise,
    noise_field,
)
from bladdergen.diffusion.sample import sample_volumes
from bladdergen.errors import CheckpointError, InputError
from test_diffusion_fixtures import micro_config, one_torch_thread  # noqa: F401
from test_sample import runs  # noqa: F401

WINDOW = (-200.0, 300.0)
NOISY = {"sample.noise": "residual"}


def _lag1(field: np.ndarray, axis: int) -> float:
    n = field.shape[axis]
    a = np.take(field, range(n - 1), axis=axis).ravel()
    b = np.take(field, range(1, n), axis=axis).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _smooth_anatomy() -> np.ndarray:
    """A blurred disc of soft tissue (40 HU) in air, with a slow ramp: a noise-free 'scan'."""
    x, y, _ = np.meshgrid(np.arange(64), np.arange(64), np.arange(24), indexing="ij")
    hu = np.where((x - 32) ** 2 + (y - 32) ** 2 < 25**2, 40.0, -200.0) + 20 * np.sin(x / 9.0)
    return ndimage.gaussian_filter(hu, 1.5)


def test_a_drawn_field_has_the_models_level_and_gaussian_correlation():
    rng = np.random.default_rng(0)
    white = noise_field((64, 64, 32), NoiseModel(10.0, (0.0, 0.0, 0.0)), rng)
    blurred = noise_field((64, 64, 32), NoiseModel(10.0, (1.0, 1.0, 1.0)), rng)
    assert white.std() == pytest.approx(10.0, rel=0.02)
    assert blurred.std() == pytest.approx(10.0, rel=0.05)
    assert abs(_lag1(white, 0)) < 0.01
    # a Gaussian blur of width s correlates neighbours by exp(-1 / (4 s^2)): 0.779 at s = 1
    for axis in range(3):
        assert _lag1(blurred, axis) == pytest.approx(np.exp(-0.25), abs=0.02)


def test_the_local_mean_taken_off_white_noise_changes_it_as_derived_by_hand():
    # y = x - mean of its 5x5x5 box: var 1 - 2/125 + 1/125; neighbours share 100 box voxels, so
    # cov = -2/125 + 100/125^2
    kept, correlations = detrended_statistics((0.0, 0.0, 0.0))
    assert kept == pytest.approx(1 - 1 / 125)
    assert correlations == pytest.approx([(-2 / 125 + 100 / 125**2) / (1 - 1 / 125)] * 3)


@pytest.mark.parametrize(
    "truth", [NoiseModel(12.0, (0.7, 0.6, 0.4)), NoiseModel(8.0, (1.2, 1.2, 0.8))]
)
def test_the_estimate_recovers_a_known_noise_under_a_perfect_reconstruction(truth):
    rng = np.random.default_rng(1)
    anatomy = _smooth_anatomy()
    pairs = [
        (np.clip(anatomy + noise_field(anatomy.shape, truth, rng), *WINDOW), anatomy)
        for _ in range(4)
    ]
    estimate = estimate_noise(pairs, WINDOW)
    assert estimate.sd_hu == pytest.approx(truth.sd_hu, rel=0.05)
    assert estimate.sigma == pytest.approx(truth.sigma, abs=0.05)


def test_a_volume_with_nothing_flat_to_measure_is_refused():
    air = np.full((16, 16, 8), WINDOW[0], dtype=np.float32)
    with pytest.raises(ValueError, match="flat body voxels"):
        estimate_noise([(air, air)], WINDOW)


def test_noise_leaves_clipped_voxels_alone_and_stays_in_the_window():
    hu = np.full((16, 16, 8), 40.0, dtype=np.float32)
    hu[:4] = WINDOW[0]  # air, clipped at the window's floor
    hu[-4:] = WINDOW[1]  # bone, clipped at its ceiling
    noisy = add_noise(hu, NoiseModel(30.0, (0.5, 0.5, 0.5)), WINDOW, np.random.default_rng(0))
    assert np.array_equal(noisy[:4], hu[:4]) and np.array_equal(noisy[-4:], hu[-4:])
    assert noisy[4:-4].std() > 20
    assert noisy.min() >= WINDOW[0] and noisy.max() <= WINDOW[1]


def test_train_ldm_records_the_noise_model_and_sample_adds_it(runs, tmp_path):  # noqa: F811
    metadata = read_metadata(runs[1] / "model.safetensors")
    model = NoiseModel.from_dict(metadata["noise_model"])
    assert model.sd_hu > 0 and model.voxels >= 100
    plain, noisy = tmp_path / "plain", tmp_path / "noisy"
    sample_volumes(micro_config(**{"sample.noise": "none"}), runs[1], plain, 1)
    sample_volumes(micro_config(**NOISY), runs[1], noisy, 1)
    manifest = json.loads((noisy / "manifest.json").read_text())
    assert manifest["settings"]["noise"] == model.to_dict()
    assert json.loads((plain / "manifest.json").read_text())["settings"]["noise"] is None
    name = "images/sample_00000.nii.gz"
    a = np.asarray(nib.load(plain / name).dataobj, dtype=np.float64)
    b = np.asarray(nib.load(noisy / name).dataobj, dtype=np.float64)
    inside = (a > WINDOW[0] + 2 * model.sd_hu) & (a < WINDOW[1] - 2 * model.sd_hu)
    assert inside.sum() > 100
    assert (b - a)[inside].std() == pytest.approx(model.sd_hu, rel=0.2)


def test_an_ldm_from_before_the_noise_model_samples_without_noise(runs, tmp_path):  # noqa: F811
    tensors, metadata = load_weights(runs[1] / "model.safetensors")
    del metadata["noise_model"]
    old = tmp_path / "old" / "model.safetensors"
    old.parent.mkdir()
    save_weights(old, tensors, metadata)
    sample_volumes(micro_config(**NOISY), old, tmp_path / "from_old", 1)
    sample_volumes(micro_config(**{"sample.noise": "none"}), runs[1], tmp_path / "plain", 1)
    name = "images/sample_00000.nii.gz"
    assert (tmp_path / "from_old" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_an_unreadable_noise_model_is_a_checkpoint_error(runs, tmp_path):  # noqa: F811
    tensors, metadata = load_weights(runs[1] / "model.safetensors")
    metadata["noise_model"] = {"sd_hu": 10.0, "sigma_voxels": [0.5, 0.5]}
    broken = tmp_path / "broken" / "model.safetensors"
    broken.parent.mkdir()
    save_weights(broken, tensors, metadata)
    with pytest.raises(CheckpointError, match="noise_model"):
        sample_volumes(micro_config(**NOISY), broken, tmp_path / "out", 1)


def test_a_folder_sampled_before_the_noise_model_continues_only_without_noise(runs, tmp_path):  # noqa: F811
    out = tmp_path / "old_folder"
    plain = micro_config(**{"sample.noise": "none"})
    sample_volumes(plain, runs[1], out, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["settings"]["noise"]  # as written before the setting existed
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="noise"):
        sample_volumes(micro_config(**NOISY), runs[1], out, 2)
    assert sample_volumes(plain, runs[1], out, 2)["complete"] == 2
