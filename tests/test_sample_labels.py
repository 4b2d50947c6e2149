"""Paired generation: a VQ-GAN whose label decoder learned from labeled cases makes `sample` write
each CT's label map in the same geometry, with its anatomy checks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bladdergen.checkpoint import read_metadata
from bladdergen.diffusion.sample import sample_volumes
from bladdergen.diffusion.train import train_ldm
from bladdergen.vqgan.train import train_vqgan
from test_diffusion_fixtures import micro_config, one_torch_thread  # noqa: F401

SHORT_VQGAN = {"vqgan.max_steps": 3, "vqgan.disc_start": 100, "vqgan.device": "cpu"}


@pytest.fixture(scope="module")
def paired_ldm(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    config = micro_config(**SHORT_VQGAN, **{"ldm.max_steps": 2})
    train_vqgan(config.vqgan, tiny_dataset, root / "vqgan")
    train_ldm(config.ldm, tiny_dataset, root / "ldm", root / "vqgan")
    return root, config


def test_a_vqgan_trained_on_labeled_cases_records_a_trained_label_decoder(paired_ldm):
    root, _ = paired_ldm
    assert read_metadata(root / "vqgan/model.safetensors")["labels_trained"] is True


def test_samples_come_with_label_maps_of_dataset_values_in_the_image_geometry(paired_ldm):
    root, config = paired_ldm
    result = sample_volumes(config, root / "ldm", root / "out", 2)
    assert result["labels"] is True
    for index in range(2):
        image = nib.load(root / f"out/sample_{index:05d}.nii.gz")
        label = nib.load(root / f"out/labels/sample_{index:05d}.nii.gz")
        assert label.shape == image.shape
        assert np.allclose(label.affine, image.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 128, 255}
    manifest = json.loads((root / "out/manifest.json").read_text())
    for entry in manifest["samples"]:
        checks = json.loads(
            (root / "out/checks" / (entry["file"].split(".")[0] + ".json")).read_text()
        )
        assert entry["label"] == f"labels/{entry['file']}"
        assert entry["plausible"] == checks["checks"]["plausible"]
        assert entry["anatomy"]["measurement"]["wall_voxels"] == int(
            (np.asarray(nib.load(root / "out" / entry["label"]).dataobj) == 255).sum()
        )


def test_the_pairing_does_not_depend_on_the_batch_size(paired_ldm):
    root, config = paired_ldm
    one = micro_config(**SHORT_VQGAN, **{"sample.batch_size": 1})
    three = micro_config(**SHORT_VQGAN, **{"sample.batch_size": 3})
    sample_volumes(one, root / "ldm", root / "b1", 3)
    sample_volumes(three, root / "ldm", root / "b3", 3)
    for index in range(3):
        for part in ("", "labels/"):
            a = np.asarray(nib.load(root / f"b1/{part}sample_{index:05d}.nii.gz").dataobj)
            b = np.asarray(nib.load(root / f"b3/{part}sample_{index:05d}.nii.gz").dataobj)
            assert np.array_equal(a, b), (part, index)


def test_a_vqgan_trained_without_labels_samples_images_only(tiny_dataset, tmp_path):
    from test_diffusion_fixtures import make_vqgan

    config = micro_config(**{"ldm.max_steps": 1})
    vqgan = make_vqgan(tmp_path / "vqgan", tiny_dataset)  # no label training
    train_ldm(config.ldm, tiny_dataset, tmp_path / "ldm", vqgan)
    result = sample_volumes(config, tmp_path / "ldm", tmp_path / "out", 1)
    assert result["labels"] is False and not (tmp_path / "out/labels").exists()
