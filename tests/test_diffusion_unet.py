"""Pseudo-3D U-Net: shapes, in-plane-only convolutions, slices linked by depth attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bladdergen.diffusion.config import LDMConfig
from bladdergen.diffusion.unet import (
    ChannelLayerNorm,
    DepthAttention,
    PseudoUNet3D,
    voxel_coordinates,
)
from test_diffusion_fixtures import one_torch_thread  # noqa: F401

SMALL = LDMConfig(
    base_channels=8,
    channel_mults=(1, 2, 2),
    attention_heads=2,
    attention_head_channels=4,
    norm_groups=4,
)


def test_denoiser_output_has_the_shape_of_its_input_latent():
    torch.manual_seed(0)
    net = PseudoUNet3D(latent_channels=3, config=SMALL)
    x = torch.randn(2, 3, 8, 12, 5)
    out = net(x, torch.tensor([0, 299]))
    assert out.shape == (2, 3, 8, 12, 5)
    assert torch.isfinite(out).all()


def test_voxel_coordinates_run_from_minus_one_to_one_along_each_axis():
    coordinates = voxel_coordinates(torch.zeros(2, 5, 3, 2, 5))
    assert coordinates.shape == (2, 3, 3, 2, 5)
    # by hand: n evenly spaced points from -1 to 1, varying only along their own axis
    assert torch.allclose(coordinates[1, 0, :, 1, 4], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(coordinates[0, 1, 2, :, 0], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(coordinates[0, 2, 0, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))


def test_only_coordinate_channels_let_the_denoiser_tell_slices_apart():
    # A slab whose slices are all the same: in-plane convolutions and depth attention (a weighted
    # mean of identical values) give every slice the same output, wherever it lies along Z.
    torch.manual_seed(0)
    slab = torch.randn(1, 3, 8, 8, 1).expand(-1, -1, -1, -1, 6).contiguous()
    t = torch.tensor([10])
    blind = PseudoUNet3D(3, dataclasses.replace(SMALL, coordinate_channels=False))
    placed = PseudoUNet3D(3, dataclasses.replace(SMALL, coordinate_channels=True))
    with torch.no_grad():
        blind_out, placed_out = blind(slab, t), placed(slab, t)
    assert torch.allclose(blind_out, blind_out[..., :1].expand_as(blind_out), atol=1e-5)
    assert (placed_out[..., 0] - placed_out[..., -1]).abs().max() > 1e-3
    assert placed.init_conv.in_channels == 3 + 3


def test_denoiser_rejects_in_plane_sizes_not_divisible_by_its_downsampling():
    net = PseudoUNet3D(latent_channels=3, config=SMALL)  # 3 levels -> X, Y divisible by 4
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 6, 8, 4), torch.tensor([1]))


def test_every_convolution_is_in_plane_and_depth_is_never_resampled():
    net = PseudoUNet3D(latent_channels=3, config=SMALL)
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert convs
    for conv in convs:
        assert conv.kernel_size[2] == 1 and conv.stride[2] == 1
    assert any(conv.kernel_size == (3, 3, 1) for conv in convs)


def test_depth_attention_lets_one_slice_influence_the_others_at_the_same_position():
    torch.manual_seed(0)
    attention = DepthAttention(8, heads=2, head_channels=4, max_distance=4)
    x = torch.randn(1, 8, 3, 3, 5)
    changed = x.clone()
    changed[:, :, 1, 1, 4] += 1.0  # one voxel column entry, slice 4
    with torch.no_grad():
        delta = (attention(changed) - attention(x)).abs().sum(dim=1)  # (1, X, Y, Z)
    assert float(delta[0, 1, 1, 0]) > 0  # slice 0 at the same in-plane position changes
    assert float(delta[0, 0, 0].sum()) == 0  # other in-plane positions do not


def test_depth_attention_bias_depends_only_on_clamped_slice_distance():
    attention = DepthAttention(4, heads=2, head_channels=2, max_distance=2)
    bias = attention.position_bias(5, torch.device("cpu"))
    assert bias.shape == (2, 5, 5)
    assert torch.equal(bias[:, 0, 1], bias[:, 3, 4])  # distance +1 twice
    assert torch.equal(bias[:, 0, 3], bias[:, 0, 4])  # +3 and +4 both clamp to +2


def test_channel_layer_norm_normalises_each_voxel_over_its_channels():
    norm = ChannelLayerNorm(6)
    with torch.no_grad():
        norm.gain.copy_(torch.arange(1.0, 7.0).view(1, 6, 1, 1, 1))
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64) * 3 + 1
    # by hand, per voxel: subtract the channels' mean, divide by their population std
    mean = x.mean(dim=1, keepdim=True)
    std = ((x - mean) ** 2).mean(dim=1, keepdim=True).add(norm.eps).sqrt()
    expected = (x - mean) / std * norm.gain.double()
    assert torch.allclose(norm(x.float()).double(), expected, atol=1e-5)
