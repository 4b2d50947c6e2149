"""Paired generation: a VQ-GAN whose label decoder learned from labeled cases makes `sample` write
each CT's label map in the same geometry, with its anatomy checks."""

from __future__ import annotations

import json
from pathlib import Path

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
        image = nib.load(root / f"out/images/sample_{index:05d}.nii.gz")
        label = nib.load(root / f"out/labels/sample_{index:05d}.nii.gz")
        assert label.shape == image.shape
        assert np.allclose(label.affine, image.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 128, 255}
    manifest = json.loads((root / "out/manifest.json").read_text())
    for entry in manifest["samples"]:
        checks = json.loads(
            (root / "out/checks" / (Path(entry["file"]).name.split(".")[0] + ".json")).read_text()
        )
        assert entry["label"] == f"labels/{Path(entry['file']).name}"
        assert entry["plausible"] == checks["checks"]["plausible"]
        assert entry["anatomy"]["measurement"]["wall_voxels"] == int(
            (np.asarray(nib.load(root / "out" / entry["label"]).dataobj) == 255).sum()
        )


def test_the_pairing_does_not_depend_on_the_batch_size_or_an_interruption(paired_ldm):
    root, config = paired_ldm
    one = micro_config(**SHORT_VQGAN, **{"sample.batch_size": 1})
    three = micro_config(**SHORT_VQGAN, **{"sample.batch_size": 3})
    sample_volumes(one, root / "ldm", root / "b1", 3)
    sample_volumes(three, root / "ldm", root / "b3", 3)
    # an interrupted run: 2 samples, then the same folder asked for 3 (only the third is drawn)
    sample_volumes(one, root / "ldm", root / "resumed", 2)
    again = sample_volumes(three, root / "ldm", root / "resumed", 3)
    assert (again["generated"], again["skipped"]) == (1, 2)
    for index in range(3):
        for part in ("images/", "labels/"):
            name = f"{part}sample_{index:05d}.nii.gz"
            reference = (root / "b3" / name).read_bytes()
            assert (root / "b1" / name).read_bytes() == reference, (part, index)
            assert (root / "resumed" / name).read_bytes() == reference, (part, index)


def test_a_vqgan_trained_without_labels_samples_images_only(tiny_dataset, tmp_path):
    from test_diffusion_fixtures import make_vqgan

    config = micro_config(**{"ldm.max_steps": 1})
    vqgan = make_vqgan(tmp_path / "vqgan", tiny_dataset)  # no label training
    train_ldm(config.ldm, tiny_dataset, tmp_path / "ldm", vqgan)
    result = sample_volumes(config, tmp_path / "ldm", tmp_path / "out", 1)
    assert result["labels"] is False and not (tmp_path / "out/labels").exists()


def test_nnunet_layout_matches_nnunet_v2_names_and_dataset_json(paired_ldm):
    root, _ = paired_ldm
    config = micro_config(**SHORT_VQGAN, **{"sample.layout": "nnunet"})
    sample_volumes(config, root / "ldm", root / "nnunet", 2)
    dataset = json.loads((root / "nnunet/dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["labels"] == {"background": 0, "wall": 1, "tumor": 2}
    assert dataset["numTraining"] == 2 and dataset["file_ending"] == ".nii.gz"
    labels = sorted(p.name for p in (root / "nnunet/labelsTr").iterdir())
    images = sorted(p.name for p in (root / "nnunet/imagesTr").iterdir())
    assert labels == ["sample_00000.nii.gz", "sample_00001.nii.gz"]
    assert images == [name.replace(".nii.gz", "_0000.nii.gz") for name in labels]
    for name in labels:
        values = np.asarray(nib.load(root / "nnunet/labelsTr" / name).dataobj)
        assert set(np.unique(values)) <= {0, 1, 2}  # nnU-Net wants consecutive class indices


def _even_wall_is_plausible(measurement, ranges):
    """A stand-in rule that some samples pass and some fail, computable from the label file."""
    return {"plausible": measurement["wall_voxels"] % 2 == 0}


def _passes(label_file):
    return int((np.asarray(nib.load(label_file).dataobj) == 255).sum()) % 2 == 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_keep_plausible_keeps_exactly_the_first_samples_whose_checks_pass(
    paired_ldm, monkeypatch, batch_size
):
    import bladdergen.evaluate.anatomy as anatomy

    root, _ = paired_ldm
    monkeypatch.setattr(anatomy, "plausibility", _even_wall_is_plausible)
    every = micro_config(**SHORT_VQGAN, **{"sample.max_attempts": 1})
    sample_volumes(every, root / "ldm", root / "every", 8)
    passing = [i for i in range(8) if _passes(root / f"every/labels/sample_{i:05d}.nii.gz")]
    assert 0 < len(passing) < 8, "the stand-in rule should split the candidates"
    wanted = min(2, len(passing))

    config = micro_config(
        **SHORT_VQGAN,
        **{"sample.keep": "plausible", "sample.max_attempts": 4, "sample.batch_size": batch_size},
    )
    out = root / f"plausible_b{batch_size}"
    result = sample_volumes(config, root / "ldm", out, wanted)
    manifest = json.loads((out / "manifest.json").read_text())
    kept = [entry["index"] for entry in manifest["samples"]]
    assert kept == passing[:wanted] and result["complete"] == wanted
    last = kept[-1]
    assert [r["index"] for r in manifest["rejected"]] == [
        i for i in range(last) if i not in passing
    ]
    for i in range(8):
        assert (out / f"images/sample_{i:05d}.nii.gz").is_file() == (i in kept)
    for i in kept:  # the kept files are the same samples as in the keep-all run
        a = np.asarray(nib.load(out / f"labels/sample_{i:05d}.nii.gz").dataobj)
        b = np.asarray(nib.load(root / f"every/labels/sample_{i:05d}.nii.gz").dataobj)
        assert np.array_equal(a, b)


def test_keep_plausible_without_a_trained_label_decoder_is_refused(tiny_dataset, tmp_path):
    from bladdergen.errors import InputError
    from test_diffusion_fixtures import make_vqgan

    config = micro_config(**{"ldm.max_steps": 1, "sample.keep": "plausible"})
    vqgan = make_vqgan(tmp_path / "vqgan", tiny_dataset)
    train_ldm(config.ldm, tiny_dataset, tmp_path / "ldm", vqgan)
    with pytest.raises(InputError, match="labels_trained is false"):
        sample_volumes(config, tmp_path / "ldm", tmp_path / "out", 1)
    assert not (tmp_path / "out").exists()
