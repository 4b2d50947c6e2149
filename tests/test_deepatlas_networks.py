"""The DeepAtlas networks: anisotropic plan, near-identity start, safetensors-safe weights."""

import torch
from safetensors.torch import load_file, save_file

from bladdergen.deepatlas.networks import (
    RegistrationNet,
    SegmentationNet,
    anisotropic_plan,
    expand_state_dict,
    portable_state_dict,
)


def test_first_levels_convolve_and_downsample_within_the_axial_plane():
    kernels, strides = anisotropic_plan(4, inplane_levels=1)
    assert kernels == [(3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3)]
    assert strides == [(1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)]


def test_registration_net_starts_near_identity_with_a_full_resolution_field():
    torch.manual_seed(0)
    net = RegistrationNet((4, 8, 8), 1, inplane_downsample=2, diffeomorphic=True)
    image = torch.randn(1, 1, 32, 32, 8)
    field = net(image, torch.randn(1, 1, 32, 32, 8))
    assert field.shape == (1, 3, 32, 32, 8)
    assert float(field.abs().max()) < 1e-2  # voxels


def test_weights_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    net = SegmentationNet((4, 8, 8), 1)
    save_file(portable_state_dict(net), tmp_path / "w.safetensors")  # refuses shared tensors
    other = SegmentationNet((4, 8, 8), 1)
    other.load_state_dict(expand_state_dict(other, load_file(tmp_path / "w.safetensors")))
    image = torch.randn(1, 1, 32, 32, 8)
    torch.testing.assert_close(other(image), net(image))
