"""Loss terms and discriminators of the VQ-GAN on tiny hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from bladdergen.config import load_config
from bladdergen.vqgan.discriminators import VolumeDiscriminator, slice_discriminator
from bladdergen.vqgan.losses import (
    AdversarialLoss,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    pick_slices,
)
from bladdergen.vqgan.reconstruct import psnr, resample_baseline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets gain nothing from threads; one avoids OpenMP spin-waits on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_hinge_discriminator_loss_matches_hand_computation():
    real = torch.tensor([2.0, 0.5])  # relu(1 - real) = [0, 0.5] -> mean 0.25
    fake = torch.tensor([-3.0, 0.0])  # relu(1 + fake) = [0, 1]  -> mean 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))


def test_hinge_generator_loss_is_minus_the_mean_logit():
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_least_squares_losses_are_zero_at_their_targets():
    loss = AdversarialLoss("least_squares")
    ones, zeros = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    assert loss.discriminator(ones, zeros).item() == pytest.approx(0.0)
    assert loss.generator(ones).item() == pytest.approx(0.0)


def test_feature_matching_ignores_logits_and_scales_the_layer_sum_by_four_over_layers():
    real = [torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.full((1, 1), 100.0)]
    fake = [torch.ones(1, 2, 2), torch.full((1, 2, 2), 3.0), torch.zeros(1, 1)]
    # layers: L1 = 1 and 3; sum 4; times 4 / 2 layers = 8; the logits (100 apart) do not count
    assert feature_matching_loss(fake, real).item() == pytest.approx(8.0)


def test_feature_matching_sends_no_gradient_to_the_real_features():
    real = [torch.zeros(3, requires_grad=True), torch.zeros(1)]
    fake = [torch.ones(3, requires_grad=True), torch.zeros(1)]
    feature_matching_loss(fake, real).backward()
    assert real[0].grad is None and fake[0].grad is not None


def test_pick_slices_takes_one_axial_slice_per_volume():
    volume = torch.arange(2 * 1 * 2 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 2, 3)
    slices = pick_slices(volume, torch.tensor([2, 0]))
    assert slices.shape == (2, 1, 2, 2)
    assert torch.equal(slices[0], volume[0, :, :, :, 2])
    assert torch.equal(slices[1], volume[1, :, :, :, 0])


@pytest.mark.parametrize("shape", [(32, 32, 8), (64, 64, 24)])
def test_discriminators_return_features_and_a_logit_map_for_thin_volumes(shape):
    config = load_config("tiny", overrides={"vqgan.disc_channels": 4}).vqgan
    volume = torch.randn(2, 1, *shape)
    features3d = VolumeDiscriminator(config, depth=shape[2])(volume)
    features2d = slice_discriminator(config)(volume[..., 0])
    assert features3d[-1].shape[:2] == (2, 1) and features3d[-1].dim() == 5
    assert features2d[-1].shape[:2] == (2, 1) and features2d[-1].dim() == 4
    assert len(features3d) == config.disc_layers + 2


def test_psnr_matches_hand_computation():
    a = torch.zeros(1, 1, 2, 2, 2)
    b = torch.full((1, 1, 2, 2, 2), 0.2)  # MSE 0.04, peak-to-peak 2: 10 log10(4 / 0.04) = 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, a) == math.inf


def test_resampling_baseline_keeps_a_linear_ramp_along_z_inside_the_volume():
    z = torch.arange(8, dtype=torch.float32)
    volume = z.view(1, 1, 1, 1, 8).expand(1, 1, 4, 4, 8).contiguous()
    out = resample_baseline(volume, (2, 2, 2), "area")
    assert out.shape == volume.shape
    # box means of pairs (0.5, 2.5, ...) interpolated back reproduce the ramp away from the ends
    assert torch.allclose(out[..., 1:7], volume[..., 1:7])
