"""The VQ-GAN autoencoder API (what the LDM stage relies on) and its safetensors round trip."""

from __future__ import annotations

import pytest
import torch

from bladdergen.checkpoint import load_weights, save_weights
from bladdergen.config import load_config
from bladdergen.errors import CheckpointError, InputError
from bladdergen.vqgan.load import load_vqgan, save_vqgan
from bladdergen.vqgan.model import VQGAN, stage_strides


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets gain nothing from threads; one avoids OpenMP spin-waits on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SMALL = {
    "vqgan.n_hiddens": 4,
    "vqgan.n_codes": 16,
    "vqgan.num_groups": 4,
    "vqgan.downsample": [4, 4, 2],
}


def _model(**extra) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(load_config("tiny", overrides={**SMALL, **extra}).vqgan)


def _trained_once(model: VQGAN, x: torch.Tensor) -> VQGAN:
    """One training-mode pass initialises the codebook from the encoder outputs."""
    model.train()
    model(x)
    return model.eval()


def test_stage_strides_stop_halving_an_axis_once_its_factor_is_reached():
    assert stage_strides((8, 8, 2)) == [(2, 2, 2), (2, 2, 1), (2, 2, 1)]
    assert stage_strides((4, 4, 1)) == [(2, 2, 1), (2, 2, 1)]


def test_encode_quantize_decode_shapes_follow_the_per_axis_factors():
    model = _model().eval()
    x = torch.rand(2, 1, 32, 32, 8) * 2 - 1
    z_e = model.encode(x)
    assert z_e.shape == (2, 8, 8, 8, 4)
    assert model.latent_shape((32, 32, 8)) == (8, 8, 8, 4)
    z_q, indices = model.quantize(z_e)
    assert z_q.shape == z_e.shape and indices.shape == (2, 8, 8, 4)
    assert model.decode(z_q).shape == x.shape


def test_quantized_latents_are_rows_of_the_codebook():
    model = _trained_once(_model(), torch.rand(2, 1, 32, 32, 8) * 2 - 1)
    z_q, indices = model.quantize(model.encode(torch.rand(1, 1, 32, 32, 8)))
    expected = model.codebook.embeddings[indices.flatten()]
    assert torch.equal(z_q.permute(0, 2, 3, 4, 1).reshape(-1, 8), expected)


def test_latent_shape_rejects_a_volume_not_divisible_by_the_factors():
    with pytest.raises(InputError, match="not divisible"):
        _model().latent_shape((30, 32, 8))


def test_codebook_range_is_the_min_and_max_over_all_entries():
    model = _model()
    with torch.no_grad():
        model.codebook.embeddings.zero_()
        model.codebook.embeddings[3, 2] = -1.5
        model.codebook.embeddings[7, 0] = 2.25
    assert model.codebook_range() == (-1.5, 2.25)


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.rand(1, 1, 32, 32, 8) * 2 - 1
    grads = []
    for enabled in (False, True):
        model = _trained_once(_model(**{"vqgan.activation_checkpointing": enabled}), x).train()
        model.codebook.eval()  # keep the codebook fixed so both passes see the same codes
        (model(x).x_hat - x).abs().mean().backward()
        grads.append(model.encoder.conv_first.conv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_saved_and_loaded_model_gives_identical_outputs(tmp_path):
    x = torch.rand(1, 1, 32, 32, 8) * 2 - 1
    model = _trained_once(_model(), x)
    meta = save_vqgan(
        tmp_path / "model.safetensors",
        model,
        step=7,
        window=(-200.0, 300.0),
        volume_shape=(32, 32, 8),
        code_usage=0.5,
    )
    loaded, metadata = load_vqgan(tmp_path)  # a run folder resolves to model.safetensors
    assert not loaded.training
    assert metadata["step"] == 7 and metadata["window"] == [-200.0, 300.0]
    assert metadata["weights_sha256"] == meta["weights_sha256"]
    assert (metadata["codebook_min"], metadata["codebook_max"]) == model.codebook_range()
    assert metadata["latent_shape"] == [8, 8, 8, 4]
    assert bool(loaded.codebook.initialized)
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(x)[0], model.reconstruct(x)[0])


def test_loading_another_stage_checkpoint_is_a_checkpoint_error(tmp_path):
    save_weights(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"kind": "ldm"})
    with pytest.raises(CheckpointError, match="expected 'vqgan'"):
        load_vqgan(tmp_path / "other.safetensors")


def test_tampered_weights_are_refused(tmp_path):
    model = _trained_once(_model(), torch.rand(1, 1, 32, 32, 8))
    path = tmp_path / "model.safetensors"
    save_vqgan(path, model, 1, (-200.0, 300.0), (32, 32, 8), code_usage=1.0)
    tensors, metadata = load_weights(path)
    tensors["codebook.embeddings"] = tensors["codebook.embeddings"] + 1.0
    save_weights(path, tensors, metadata)
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_vqgan(path)


def test_weights_that_do_not_match_the_recorded_config_are_refused(tmp_path):
    model = _trained_once(_model(), torch.rand(1, 1, 32, 32, 8))
    path = tmp_path / "model.safetensors"
    save_vqgan(path, model, 1, (-200.0, 300.0), (32, 32, 8), code_usage=1.0)
    tensors, metadata = load_weights(path)
    metadata["config"]["n_codes"] = 32
    del metadata["weights_sha256"]
    save_weights(path, tensors, metadata)
    with pytest.raises(CheckpointError, match="does not match"):
        load_vqgan(path)


def test_label_classes_write_the_lumen_class_as_background():
    model = _model()
    assert model.label_decoder is not None
    z_q = torch.zeros(1, model.config.embedding_dim, 2, 2, 2)
    logits = model.decode_labels(z_q)
    assert logits.shape[1] == 4  # background, wall, tumor, lumen
    expected = logits.argmax(dim=1)
    expected[expected == 3] = 0
    assert torch.equal(model.decode_label_classes(z_q), expected.to(torch.uint8))


def test_checkpoints_from_before_the_lumen_class_still_load(tmp_path):
    x = torch.rand(1, 1, 16, 16, 8) * 2 - 1
    old = _trained_once(_model(**{"vqgan.label_lumen": False}), x)
    metadata = save_vqgan(tmp_path / "old.safetensors", old, 1, (-100, 200), (16, 16, 8), 1.0)
    # a file written before the option existed has no label_lumen key in its config
    tensors, stored = load_weights(tmp_path / "old.safetensors")
    del stored["config"]["label_lumen"]
    save_weights(tmp_path / "older.safetensors", tensors, stored)
    loaded, _ = load_vqgan(tmp_path / "older.safetensors")
    assert not loaded.config.label_lumen
    assert loaded.label_decoder is not None
    assert metadata["config"]["label_lumen"] is False


def test_the_image_decoder_reads_the_label_decoders_class_probabilities():
    model = _model()
    last = model.decoder.conv_last.conv
    assert model.decoder.condition_channels == 4  # background, wall, tumor, lumen
    assert last.in_channels == model.config.n_hiddens + 4  # the last features + the classes
    with torch.no_grad():  # let the last layer copy the wall probability at the centre tap
        last.weight.zero_()
        last.bias.zero_()
        features = last.in_channels - model.decoder.condition_channels
        last.weight[0, features + 1, 1, 1, 1] = 1.0  # condition channel 1: the wall
    z_q = torch.randn(1, model.config.embedding_dim, 2, 2, 2)
    wall = torch.softmax(model.decode_labels(z_q), dim=1)[:, 1:2]
    assert torch.allclose(model.decode(z_q), wall, atol=1e-6)


def test_the_image_loss_does_not_train_the_label_decoder():
    model = _model().train()
    x = torch.rand(1, 1, 16, 16, 8) * 2 - 1
    out = model(x)
    out.x_hat.sum().backward()
    assert all(p.grad is None for p in model.label_decoder.parameters())
    assert model.decoder.conv_last.conv.weight.grad is not None


def test_checkpoints_from_before_the_image_read_the_labels_still_load(tmp_path):
    x = torch.rand(1, 1, 16, 16, 8) * 2 - 1
    old = _trained_once(_model(**{"vqgan.image_from_labels": False}), x)
    save_vqgan(tmp_path / "old.safetensors", old, 1, (-100, 200), (16, 16, 8), 1.0)
    tensors, stored = load_weights(tmp_path / "old.safetensors")
    del stored["config"]["image_from_labels"]  # written before the option existed
    save_weights(tmp_path / "older.safetensors", tensors, stored)
    loaded, _ = load_vqgan(tmp_path / "older.safetensors")
    assert loaded.decoder.condition_channels == 0
    z_q = loaded.codebook.embed(torch.zeros(1, 4, 4, 4, dtype=torch.long))
    assert torch.equal(loaded.decode(z_q), old.decode(z_q))


def test_decode_pair_gives_the_image_and_label_map_of_decode_and_decode_label_classes():
    model = _model().eval()
    z_q = torch.randn(2, model.config.embedding_dim, 2, 2, 2)
    image, classes = model.decode_pair(z_q)
    assert torch.equal(image, model.decode(z_q))
    assert torch.equal(classes, model.decode_label_classes(z_q))
