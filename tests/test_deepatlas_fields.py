"""Warping and folding of displacement fields (voxel units, channel k along axis k)."""

import torch

from bladdergen.deepatlas.fields import Warper, folding_fraction, jacobian_determinant


def test_warping_with_a_one_voxel_shift_moves_the_image_by_one_voxel():
    torch.manual_seed(0)
    image = torch.rand(1, 1, 8, 7, 6)
    for axis in range(3):
        field = torch.zeros(1, 3, 8, 7, 6)
        field[:, axis] = 1.0
        warped = Warper()(image, field)
        # pull-back: warped(x) = image(x + e_axis), so warped's first n-1 slabs are image's last n-1
        n = image.shape[2 + axis]
        expected = image.narrow(2 + axis, 1, n - 1)
        torch.testing.assert_close(warped.narrow(2 + axis, 0, n - 1), expected)


def test_a_zero_field_is_the_identity():
    torch.manual_seed(1)
    image = torch.rand(2, 3, 6, 5, 4)
    warped = Warper()(image, torch.zeros(2, 3, 6, 5, 4))
    torch.testing.assert_close(warped, image)


def test_identity_has_unit_jacobian_and_a_mirrored_axis_is_fully_folded():
    zero = torch.zeros(1, 3, 6, 6, 6)
    torch.testing.assert_close(jacobian_determinant(zero), torch.ones(1, 6, 6, 6))
    assert folding_fraction(zero) == 0.0
    # u_x = -2x maps x -> -x: det(I + grad u) = 1 - 2 = -1 everywhere
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1).expand(1, 6, 6, 6)
    mirror = torch.zeros(1, 3, 6, 6, 6)
    mirror[:, 0] = -2.0 * x
    torch.testing.assert_close(jacobian_determinant(mirror), -torch.ones(1, 6, 6, 6))
    assert folding_fraction(mirror) == 1.0
