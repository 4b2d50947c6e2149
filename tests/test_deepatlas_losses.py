"""DeepAtlas loss terms: anatomy Dice, local NCC, gradients reaching the field."""

import torch

from bladdergen.deepatlas.fields import Warper
from bladdergen.deepatlas.losses import DeepAtlasLosses, one_hot


def test_anatomy_loss_of_identical_segmentations_is_zero():
    torch.manual_seed(0)
    losses = DeepAtlasLosses()
    classes = torch.randint(0, 3, (2, 1, 8, 8, 4))
    hot = one_hot(classes)
    assert float(losses.anatomy(hot, hot)) == 0.0
    soft = torch.softmax(torch.randn(2, 3, 8, 8, 4), dim=1)
    assert abs(float(losses.anatomy(soft, soft))) < 1e-6


def test_anatomy_loss_of_disjoint_segmentations_is_large():
    losses = DeepAtlasLosses()
    a = torch.zeros(1, 1, 8, 8, 4, dtype=torch.long)
    b = torch.ones(1, 1, 8, 8, 4, dtype=torch.long)
    # background and wall swap completely; tumor absent in both (Dice 1 by smoothing)
    assert abs(float(losses.anatomy(one_hot(a), one_hot(b))) - 2.0 / 3.0) < 1e-4


def test_local_ncc_of_an_image_with_itself_is_minus_one():
    torch.manual_seed(1)
    image = torch.rand(1, 1, 8, 8, 6)
    assert abs(float(DeepAtlasLosses().similarity(image, image)) + 1.0) < 1e-4


def test_anatomy_loss_gradient_reaches_the_field_through_trilinear_warping():
    classes = torch.zeros(1, 1, 8, 8, 4, dtype=torch.long)
    classes[:, :, 2:6, 2:6] = 1
    target = one_hot(torch.roll(classes, 1, dims=2))
    field = torch.zeros(1, 3, 8, 8, 4, requires_grad=True)
    loss = DeepAtlasLosses().anatomy(Warper()(one_hot(classes), field), target)
    loss.backward()
    assert field.grad is not None and float(field.grad.abs().sum()) > 0
