"""train-ldm: outputs, exact resume, latent cache reuse, refusal of mismatched inputs."""

from __future__ import annotations

import json

import pytest
import torch

from bladdergen.checkpoint import load_training_state, read_metadata
from bladdergen.diffusion import latents as latents_module
from bladdergen.diffusion.latents import LatentScaler
from bladdergen.diffusion.train import learning_rate, train_ldm
from bladdergen.errors import CheckpointError, InputError
from bladdergen.vqgan.load import load_vqgan
from test_diffusion_fixtures import make_vqgan, micro_config, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def vqgan_run(tiny_dataset, tmp_path_factory):
    return make_vqgan(tmp_path_factory.mktemp("vqgan"), tiny_dataset)


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, vqgan_run, tmp_path_factory):
    """A 4-step run (checkpoints at steps 2 and 4); tests must not modify it."""
    run = tmp_path_factory.mktemp("ldm") / "run"
    result = train_ldm(micro_config().ldm, tiny_dataset, run, vqgan_run)
    return run, result


def test_latent_scaler_maps_the_codebook_range_onto_minus_one_to_one():
    scaler = LatentScaler.from_codebook(-3.0, 5.0, channels=2)
    z = torch.tensor([-3.0, 1.0, 5.0, 7.0]).view(1, 1, 4, 1, 1).expand(1, 2, 4, 1, 1)
    expected = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 4, 1, 1).expand(1, 2, 4, 1, 1)
    assert torch.allclose(scaler.to_unit(z), expected)
    assert torch.allclose(scaler.from_unit(scaler.to_unit(z)), z)
    low, high = scaler.clip_bounds(z)
    assert low.flatten().tolist() == [-1.0, -1.0] and high.flatten().tolist() == [1.0, 1.0]


def test_standardized_latents_have_zero_mean_and_unit_variance_per_channel():
    # channel 0 holds 1 and 3 (mean 2, sample std sqrt(2)), channel 1 holds 10 and 30
    latents = torch.tensor([[1.0, 3.0], [10.0, 30.0]]).view(1, 2, 2, 1, 1)
    codes = torch.tensor([[0.0, 20.0], [4.0, 40.0]])  # (K=2 codes, D=2 channels)
    scaler = LatentScaler.standardized(latents, codes)
    unit = scaler.to_unit(latents)
    root2 = 2.0**0.5
    assert torch.allclose(unit.flatten(), torch.tensor([-1, 1, -1, 1]) / root2)
    low, high = scaler.clip_bounds(unit)  # codebook min/max per channel, in the same units
    assert torch.allclose(low.flatten(), torch.tensor([-2 / root2, 0.0]))
    assert torch.allclose(high.flatten(), torch.tensor([2 / root2, 20 / (10 * root2)]))
    assert torch.allclose(scaler.from_unit(unit), latents)


def test_a_scaler_round_trips_through_its_metadata_and_reads_the_old_low_high_form():
    latents = torch.randn(3, 4, 2, 2, 2) * 3 + 1
    scaler = LatentScaler.standardized(latents, torch.randn(5, 4))
    assert LatentScaler.from_dict(scaler.to_dict()) == scaler
    legacy = LatentScaler.from_dict({"low": -2.0, "high": 6.0}, channels=4)
    assert legacy == LatentScaler.from_codebook(-2.0, 6.0, channels=4)
    assert legacy.center == (2.0,) * 4 and legacy.spread == (4.0,) * 4


def test_training_writes_weights_state_config_metrics_and_latent_cache(trained_run, vqgan_run):
    run, result = trained_run
    assert result["steps"] == 4 and result["latent_shape"] == [8, 8, 8, 4]
    for name in ("model.safetensors", "training_state.pt", "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file()
    assert len(list((run / "latents").glob("latents-*.safetensors"))) == 1
    metadata = read_metadata(run / "model.safetensors")
    vqgan, vq_meta = load_vqgan(vqgan_run)
    low, high = vqgan.codebook_range()
    assert metadata["kind"] == "ldm" and metadata["step"] == 4
    scaler = LatentScaler.from_dict(metadata["scaler"])
    assert scaler.scaling == "codebook"
    assert scaler.center == pytest.approx(((high + low) / 2,) * 8)
    assert scaler.spread == pytest.approx(((high - low) / 2,) * 8)
    assert metadata["vqgan_hash"] == vq_meta["weights_sha256"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["lr"] for r in records] == [micro_config().ldm.learning_rate] * 4  # constant


def test_standardize_scaling_records_the_training_latents_mean_and_spread_and_samples(
    tiny_dataset, vqgan_run, tmp_path
):
    from safetensors.torch import load_file

    from bladdergen.diffusion.sample import sample_volumes

    config = micro_config(**{"ldm.latent_scaling": "standardize"})
    train_ldm(config.ldm, tiny_dataset, tmp_path / "ldm", vqgan_run)
    scaler = LatentScaler.from_dict(read_metadata(tmp_path / "ldm/model.safetensors")["scaler"])
    cache = next((tmp_path / "ldm/latents").glob("latents-*.safetensors"))
    latents = load_file(cache)["latents"].double()  # (N, D, x, y, z), computed here again
    assert scaler.scaling == "standardize"
    assert scaler.center == pytest.approx(latents.mean(dim=(0, 2, 3, 4)).tolist(), rel=1e-6)
    assert scaler.spread == pytest.approx(latents.std(dim=(0, 2, 3, 4)).tolist(), rel=1e-6)
    result = sample_volumes(config, tmp_path / "ldm", tmp_path / "samples", 2)
    assert result["complete"] == 2


def test_interrupted_and_resumed_training_equals_an_uninterrupted_run(
    tiny_dataset, vqgan_run, trained_run, tmp_path
):
    train_ldm(
        micro_config(**{"ldm.max_steps": 2}).ldm, tiny_dataset, tmp_path / "resumed", vqgan_run
    )
    train_ldm(micro_config().ldm, tiny_dataset, tmp_path / "resumed", vqgan_run, resume=True)
    straight = load_training_state(trained_run[0] / "training_state.pt")
    resumed = load_training_state(tmp_path / "resumed" / "training_state.pt")
    assert resumed["step"] == 4
    for part in ("model", "ema"):
        for name, tensor in straight[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name} differs"
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_a_second_run_reuses_the_cached_latents_without_encoding(
    tiny_dataset, vqgan_run, trained_run, tmp_path, monkeypatch
):
    cache = trained_run[0] / "latents"
    config = micro_config(**{"ldm.latent_cache_dir": str(cache), "ldm.max_steps": 1})

    def refuse(*args, **kwargs):
        raise AssertionError("latents were encoded again")

    monkeypatch.setattr(latents_module, "encode_dataset", refuse)
    result = train_ldm(config.ldm, tiny_dataset, tmp_path / "second", vqgan_run)
    assert result["steps"] == 1
    assert result["latent_cache"].startswith(str(cache))


def test_resuming_with_another_vqgan_is_refused(tiny_dataset, trained_run, tmp_path):
    run = trained_run[0]
    other = make_vqgan(tmp_path / "other_vqgan", tiny_dataset, seed=1)
    with pytest.raises(CheckpointError, match="frozen VQ-GAN"):
        train_ldm(micro_config(**{"ldm.max_steps": 8}).ldm, tiny_dataset, run, other, resume=True)


def test_training_into_an_existing_run_without_resume_is_refused(tiny_dataset, vqgan_run, tmp_path):
    run = tmp_path / "ldm"
    train_ldm(micro_config(**{"ldm.max_steps": 1}).ldm, tiny_dataset, run, vqgan_run)
    with pytest.raises(InputError, match="--resume"):
        train_ldm(micro_config().ldm, tiny_dataset, run, vqgan_run)


def test_resuming_with_a_different_denoiser_architecture_is_refused_naming_the_key(
    tiny_dataset, vqgan_run, trained_run
):
    config = micro_config(**{"ldm.base_channels": 12, "ldm.max_steps": 8})
    with pytest.raises(CheckpointError, match="ldm.base_channels is 12 but the run used 8"):
        train_ldm(config.ldm, tiny_dataset, trained_run[0], vqgan_run, resume=True)


def test_the_cosine_learning_rate_falls_from_the_rate_to_a_tenth():
    config = micro_config(**{"ldm.lr_schedule": "cosine", "ldm.learning_rate": 2e-3})
    config.ldm.max_steps = 11
    # progress 0, 1/2, 1: lr x (0.1 + 0.9 x (1 + cos(pi p)) / 2) = lr, 0.55 lr, 0.1 lr
    assert learning_rate(config.ldm, 0) == pytest.approx(2e-3)
    assert learning_rate(config.ldm, 5) == pytest.approx(1.1e-3)
    assert learning_rate(config.ldm, 10) == pytest.approx(2e-4)
    constant = micro_config(**{"ldm.lr_schedule": "constant", "ldm.learning_rate": 2e-3})
    assert learning_rate(constant.ldm, 10) == 2e-3


def test_mirrored_latents_are_the_encodings_of_the_mirrored_images(tiny_dataset, vqgan_run):
    from bladdergen.data.dataset import PreprocessedSet

    vqgan, _ = load_vqgan(vqgan_run, torch.device("cpu"))
    dataset = PreprocessedSet.open(tiny_dataset)
    both = latents_module.encode_dataset(vqgan, dataset, torch.device("cpu"), mirror_x=True)
    n = len(dataset.cases)
    assert both.shape[0] == 2 * n
    case = dataset.cases[1]
    image = torch.from_numpy(dataset.load_image(case)).flip(0)[None, None]  # (X, Y, Z): X first
    with torch.no_grad():
        expected = vqgan.encode(image).float()
    assert torch.allclose(both[n + 1], expected[0], atol=1e-6)
    plain = latents_module.encode_dataset(vqgan, dataset, torch.device("cpu"))
    assert torch.equal(both[:n], plain)
    assert not torch.allclose(both[n + 1], plain[1])


def test_a_mirrored_cache_is_kept_apart_from_the_plain_one(tiny_dataset, vqgan_run, tmp_path):
    from bladdergen.data.dataset import PreprocessedSet

    vqgan, meta = load_vqgan(vqgan_run, torch.device("cpu"))
    dataset = PreprocessedSet.open(tiny_dataset)
    cpu = torch.device("cpu")
    plain, plain_path = latents_module.cached_latents(
        vqgan, meta["weights_sha256"], dataset, tmp_path, cpu
    )
    mirrored, mirrored_path = latents_module.cached_latents(
        vqgan, meta["weights_sha256"], dataset, tmp_path, cpu, mirror_x=True
    )
    assert plain_path != mirrored_path
    assert (len(plain), len(mirrored)) == (len(dataset.cases), 2 * len(dataset.cases))
