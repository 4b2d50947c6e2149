"""sample: reproducible per-sample seeds, resumption, file geometry, manifest, bad input."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from bladdergen.cli import app
from bladdergen.diffusion.preview import encode_png_gray, slice_montage
from bladdergen.diffusion.sample import sample_seed, sample_volumes, saved_ldm_config
from bladdergen.diffusion.train import train_ldm
from bladdergen.errors import CheckpointError, InputError
from test_diffusion_fixtures import make_vqgan, micro_config, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """(VQ-GAN run, 4-step LDM run) trained on the tiny test set."""
    root = tmp_path_factory.mktemp("sample_runs")
    vqgan = make_vqgan(root / "vqgan", tiny_dataset)
    train_ldm(micro_config().ldm, tiny_dataset, root / "ldm", vqgan)
    return vqgan, root / "ldm"


@pytest.fixture(scope="module")
def three_samples(runs, tmp_path_factory):
    """Three samples drawn in one batch of three; tests must not modify the folder."""
    out = tmp_path_factory.mktemp("samples") / "out"
    sample_volumes(micro_config(**{"sample.batch_size": 3}), runs[1], out, 3)
    return out


def _bytes(path):
    return path.read_bytes()


def test_sample_files_do_not_depend_on_batch_size_or_interruption(runs, three_samples, tmp_path):
    out = tmp_path / "out"
    first = sample_volumes(micro_config(**{"sample.batch_size": 1}), runs[1], out, 2)
    second = sample_volumes(micro_config(**{"sample.batch_size": 2}), runs[1], out, 3)
    assert (first["generated"], second["generated"], second["skipped"]) == (2, 1, 2)
    for i in range(3):
        name = f"images/sample_{i:05d}.nii.gz"
        assert _bytes(out / name) == _bytes(three_samples / name)
    assert _bytes(out / "images/sample_00000.nii.gz") != _bytes(out / "images/sample_00001.nii.gz")


def test_sample_volumes_are_int16_hu_with_the_training_geometry(three_samples):
    image = nib.load(str(three_samples / "images/sample_00000.nii.gz"))
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.int16 and data.shape == (32, 32, 8)
    assert np.allclose(image.affine, np.diag([3.0, 3.0, 4.0, 1.0]))  # the test set's spacing
    assert data.min() >= -200 and data.max() <= 300  # inside the stored HU window


def test_manifest_records_seed_sampler_steps_and_checkpoint_hash(runs, three_samples):
    manifest = json.loads((three_samples / "manifest.json").read_text())
    checkpoint_hash = hashlib.sha256((runs[1] / "model.safetensors").read_bytes()).hexdigest()
    assert [s["index"] for s in manifest["samples"]] == [0, 1, 2]
    for entry in manifest["samples"]:
        assert entry["seed"] == sample_seed(0, entry["index"])
        assert (entry["sampler"], entry["steps"]) == ("ddim", 4)
        assert entry["checkpoint_sha256"] == checkpoint_hash
        assert (three_samples / entry["preview"]).is_file()
    assert len({s["seed"] for s in manifest["samples"]}) == 3


def test_preview_is_a_png_montage_of_all_slices(three_samples):
    data = (three_samples / "previews" / "sample_00000.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (96, 96)  # 8 slices of 32x32 in a 3x3 grid


def test_png_encoder_round_trips_pixels():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    data = encode_png_gray(image)
    idat_length = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41 : 41 + idat_length])
    rows = [raw[r * 5 + 1 : r * 5 + 5] for r in range(3)]  # each row: filter byte + 4 pixels
    assert np.array_equal(np.frombuffer(b"".join(rows), np.uint8).reshape(3, 4), image)


def test_montage_puts_anterior_up_and_slices_in_reading_order():
    hu = np.zeros((2, 3, 2), dtype=np.float32)
    hu[0, 2, 1] = 300.0  # slice 1, x = 0, most anterior y
    montage = slice_montage(hu, (-200.0, 300.0), columns=2)
    assert montage.shape == (3, 4)
    assert montage[0, 2] == 255 and montage.sum() == 255 + 11 * 102


def test_sampling_with_other_settings_into_the_same_folder_is_refused(runs, three_samples):
    with pytest.raises(InputError, match="sampler"):
        sample_volumes(micro_config(**{"sample.sampler": "ddpm"}), runs[1], three_samples, 3)


def test_ddpm_sampler_runs_through_the_pipeline(runs, tmp_path):
    config = micro_config(
        **{"sample.sampler": "ddpm", "sample.steps": 20, "sample.previews": False}
    )
    result = sample_volumes(config, runs[1], tmp_path / "out", 1)
    assert result["steps"] == 20 and (tmp_path / "out" / "images/sample_00000.nii.gz").is_file()


def test_bad_sample_requests_are_refused_with_clear_errors(runs, tiny_dataset, tmp_path):
    vqgan, ldm = runs
    with pytest.raises(InputError, match="at least 1"):
        sample_volumes(micro_config(), ldm, tmp_path / "a", 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        sample_volumes(micro_config(), ldm, tmp_path / "file", 1)
    with pytest.raises(CheckpointError, match="expected 'ldm'"):
        sample_volumes(micro_config(), vqgan, tmp_path / "b", 1)
    with pytest.raises(CheckpointError, match="no such run folder"):
        sample_volumes(micro_config(), tmp_path / "missing", tmp_path / "c", 1)
    other = make_vqgan(tmp_path / "other", tiny_dataset, seed=1)
    with pytest.raises(CheckpointError, match="not the VQ-GAN this LDM was trained with"):
        sample_volumes(micro_config(), ldm, tmp_path / "d", 1, vqgan_path=other)


def test_cli_sample_exits_2_on_zero_samples_and_0_on_success(runs, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["sample", "-n", "0", "--ldm", str(runs[1]), "--out", str(tmp_path)])
    assert bad.exit_code == 2
    ok = runner.invoke(
        app,
        ["sample", "-n", "1", "--ldm", str(runs[1]), "--out", str(tmp_path / "o"), "--steps", "2"]
        + ["--device", "cpu", "--json", "-q"],
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["complete"] == 1


def test_a_moved_vqgan_is_named_in_the_error(tiny_dataset, tmp_path):
    vqgan = make_vqgan(tmp_path / "vqgan", tiny_dataset)
    train_ldm(micro_config(**{"ldm.max_steps": 1}).ldm, tiny_dataset, tmp_path / "ldm", vqgan)
    (vqgan / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="no longer exists; pass --vqgan"):
        sample_volumes(micro_config(), tmp_path / "ldm", tmp_path / "out", 1)
    moved = sample_volumes(
        micro_config(), tmp_path / "ldm", tmp_path / "out", 1, tmp_path / "elsewhere.safetensors"
    )
    assert moved["complete"] == 1


def test_a_checkpoint_from_before_coordinate_channels_loads_without_them(tmp_path):
    from bladdergen.settings import to_mapping

    old = to_mapping(micro_config().ldm)  # as a checkpoint stores it
    del old["coordinate_channels"]
    weights = tmp_path / "model.safetensors"
    assert saved_ldm_config({"config": {"ldm": old}}, weights).coordinate_channels is False
    new = {**old, "coordinate_channels": True}
    assert saved_ldm_config({"config": {"ldm": new}}, weights).coordinate_channels is True
    with pytest.raises(CheckpointError, match="no valid config"):
        saved_ldm_config({"config": {}}, weights)
