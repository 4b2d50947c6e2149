"""DeepAtlas loss terms: anatomy Dice, local NCC, gradients reaching the field."""

import torch

from bladdergen.deepatlas.fields import Warper
from bladdergen.deepatlas.losses import IGNORED, DeepAtlasLosses, one_hot


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


def test_supervised_loss_leaves_ignored_voxels_out_of_dice_and_cross_entropy():
    # independent computation over the kept voxels only: foreground batch Dice (wall, tumor)
    # with MONAI's 1e-5 smoothing, and class-weighted cross-entropy averaged by the kept weights
    torch.manual_seed(2)
    weights = torch.tensor([1.0, 2.0, 4.0])
    losses = DeepAtlasLosses(class_weights=tuple(weights.tolist()))
    logits = torch.randn(2, 3, 6, 6, 3)
    classes = torch.randint(0, 3, (2, 1, 6, 6, 3))
    classes[0, 0, :2] = IGNORED
    kept = (classes[:, 0] != IGNORED).float()
    probs = torch.softmax(logits, dim=1)
    dice = []
    for c in (1, 2):
        p, t = probs[:, c] * kept, (classes[:, 0] == c).float() * kept
        dice.append(1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5))
    truth = classes[:, 0].clamp(max=2)  # ignored voxels get any class: their weight is zeroed
    log_p = torch.log_softmax(logits, dim=1).gather(1, truth[:, None])[:, 0]
    w = weights[truth] * kept
    expected = torch.stack(dice).mean() + (-(w * log_p).sum() / w.sum())
    assert abs(float(losses.supervised(logits, classes)) - float(expected)) < 1e-5


def test_supervised_loss_does_not_depend_on_the_logits_of_ignored_voxels():
    torch.manual_seed(3)
    losses = DeepAtlasLosses(class_weights=(1.0, 2.0, 4.0))
    logits = torch.randn(1, 3, 6, 6, 3)
    classes = torch.randint(0, 3, (1, 1, 6, 6, 3))
    classes[0, 0, 3:] = IGNORED
    changed = logits.clone()
    changed[:, :, 3:] = torch.randn(1, 3, 3, 6, 3) * 10
    assert float(losses.supervised(logits, classes)) == float(losses.supervised(changed, classes))
