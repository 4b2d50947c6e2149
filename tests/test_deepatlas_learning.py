"""DeepAtlas parts that must *learn*: registration leaves the identity, the anatomy term beats it,
the segmenter finds tumors. Seeded, CPU, tiny volumes, well under a minute each."""

from __future__ import annotations

import numpy as np
import torch

from bladdergen.deepatlas.align import MAX_SCALE, compose, filled_bladder, prealignment
from bladdergen.deepatlas.config import DeepAtlasConfig
from bladdergen.deepatlas.fields import Warper
from bladdergen.deepatlas.losses import DeepAtlasLosses, anatomy_channels, one_hot
from bladdergen.deepatlas.networks import SegmentationNet
from synthetic import make_case


def _tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)[None, None]


def _smooth_field(shape: tuple[int, int, int], amplitude: float) -> torch.Tensor:
    """A Gaussian bump of in-plane displacement (voxels) centred in the volume, sigma 7 voxels."""
    x, y, _ = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    bump = np.exp(-((x - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2) / (2 * 7.0**2))
    field = np.zeros((1, 3, *shape), np.float32)
    field[0, 0] = amplitude * bump
    field[0, 1] = -0.6 * amplitude * bump
    return torch.from_numpy(field)


def _register(moving, target, loss_of, steps: int) -> torch.Tensor:
    """Optimise a displacement field (voxels) from the identity with Adam; returns it detached.

    The field itself is the parameter (not the network) so that the test checks what the losses
    reward at their default weights, in seconds on a loaded CPU.
    """
    field = torch.zeros(1, 3, *moving.shape[2:], requires_grad=True)
    optimiser = torch.optim.Adam([field], lr=0.05)
    for _ in range(steps):
        loss = loss_of(field)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return field.detach()


def test_registration_recovers_a_known_smooth_displacement_to_within_half_its_size():
    torch.manual_seed(0)
    shape = (32, 32, 8)
    image, label = make_case(shape, np.random.default_rng(3))
    moving = _tensor(image)
    truth = _smooth_field(shape, amplitude=2.5)
    warper = Warper()
    target = warper(moving, truth)  # target(x) = moving(x + truth(x))
    cfg = DeepAtlasConfig()
    losses = DeepAtlasLosses(cfg.lncc_kernel, cfg.lncc_scales)

    def loss_of(field):
        similarity = losses.similarity(warper(moving, field), target)
        return similarity + cfg.reg_weight * losses.regularity(field)

    field = _register(moving, target, loss_of, steps=150)
    # where the bladder is (the flat background carries no information about the motion)
    region = torch.from_numpy(filled_bladder(label)) & (truth[0].norm(dim=0) > 0.5)
    error = (field[0] - truth[0]).norm(dim=0)[region].mean()
    size = truth[0].norm(dim=0)[region].mean()
    assert float(error) < 0.5 * float(size)


def test_moments_prealignment_maps_a_shifted_scaled_bladder_onto_the_target():
    shape = (40, 40, 12)
    target = np.zeros(shape, np.uint8)
    target[10:20, 12:20, 3:7] = 1  # a box: centroid (14.5, 15.5, 4.5)
    moving = np.zeros(shape, np.uint8)
    moving[16:30, 20:28, 5:9] = 1  # shifted, 14 voxels long along X instead of 10
    field, scale = prealignment(
        torch.from_numpy(moving.astype(bool))[None], torch.from_numpy(target.astype(bool))[None]
    )
    # standard deviation of n evenly spaced voxels: sqrt((n² - 1) / 12)
    expected = np.sqrt((14**2 - 1) / (10**2 - 1))
    assert expected < MAX_SCALE
    torch.testing.assert_close(
        scale[0], torch.tensor([expected, 1.0, 1.0], dtype=torch.float32), rtol=1e-4, atol=0
    )
    warped = Warper()(one_hot(_tensor(moving, torch.long)), field).argmax(dim=1)[0].numpy()
    dice = 2 * ((warped == 1) & (target == 1)).sum() / ((warped == 1).sum() + target.sum())
    assert dice > 0.85  # unaligned the two boxes do not overlap at all


def test_filled_bladder_channel_covers_the_lumen_the_wall_encloses():
    classes = np.zeros((9, 9, 2), np.int64)
    classes[2:7, 2:7] = 1
    classes[3:6, 3:6] = 0  # 9 lumen voxels per slice
    channels = anatomy_channels(one_hot(_tensor(classes, torch.long)))
    assert channels.shape == (1, 2, 9, 9, 2)
    assert float(channels[0, 0].sum()) == 16 * 2  # wall
    assert float(channels[0, 1].sum()) == 25 * 2  # wall + lumen


def test_anatomy_term_raises_warped_label_dice_on_labeled_pairs_above_the_identity():
    shape = (32, 32, 8)
    rng = np.random.default_rng(5)
    (_, label_a), (_, label_b) = make_case(shape, rng), make_case(shape, rng)
    label_b = np.roll(label_b, (3, -2), axis=(0, 1))  # bladders clearly apart
    hot_a, hot_b = one_hot(_tensor(label_a, torch.long)), one_hot(_tensor(label_b, torch.long))
    cfg = DeepAtlasConfig()
    losses = DeepAtlasLosses(cfg.lncc_kernel, cfg.lncc_scales)
    warper = Warper()
    target_channels = anatomy_channels(hot_b)

    def loss_of(field):
        anatomy = losses.anatomy(warper(anatomy_channels(hot_a), field), target_channels)
        return cfg.reg_weight * losses.regularity(field) + cfg.anatomy_weight * anatomy

    field = _register(hot_a, hot_b, loss_of, steps=150)

    def wall_dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2 * ((a == 1) & (b == 1)).sum() / ((a == 1).sum() + (b == 1).sum())

    warped = warper(hot_a, field).argmax(dim=1)[0].numpy()
    identity = wall_dice(label_a, label_b)
    assert wall_dice(warped, label_b) > identity + 0.2


def test_prealigned_residual_composes_to_the_same_warp_as_two_successive_warps():
    torch.manual_seed(1)
    shape = (16, 16, 6)
    moving = torch.rand(1, 1, *shape)
    mask = torch.zeros(1, *shape, dtype=torch.bool)
    mask[0, 4:10, 5:12, 1:4] = True
    shift, scale = prealignment(torch.roll(mask, 2, dims=1), mask)
    residual = 0.3 * torch.randn(1, 3, *shape).clamp(-1, 1)
    residual = torch.nn.functional.avg_pool3d(residual, 3, 1, 1)  # smooth: no border effects
    warper = Warper()
    inner = (slice(None), slice(None), slice(4, 12), slice(4, 12), slice(2, 4))
    twice = warper(warper(moving, shift), residual)
    once = warper(moving, compose(shift, scale, residual))
    torch.testing.assert_close(once[inner], twice[inner], atol=0.05, rtol=0)


def test_segmenter_predicts_tumor_voxels_on_tumor_bearing_phantoms():
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    shape = (32, 32, 4)
    images, labels = [], []
    for _ in range(2):
        image, label = make_case(shape, rng)
        wall = np.argwhere(label == 1)
        seed = wall[rng.integers(len(wall))]
        lo, hi = np.maximum(seed - 1, 0), seed + 2
        label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 2  # <= 27 voxels of 4,096
        image[label == 2] = 0.2
        images.append(image)
        labels.append(label)
    batch = torch.from_numpy(np.stack(images))[:, None]
    classes = torch.from_numpy(np.stack(labels))[:, None].long()
    net = SegmentationNet((8, 16, 16), inplane_levels=1)
    losses = DeepAtlasLosses(class_weights=(1.0, 1.0, 3.0))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(45):
        loss = losses.supervised(net(batch), classes)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = net.eval()(batch).argmax(dim=1)
    truth = classes[:, 0] == 2
    for case in range(2):
        tumor = predicted[case] == 2
        assert tumor.any()
        dice = 2 * (tumor & truth[case]).sum() / (tumor.sum() + truth[case].sum())
        assert float(dice) > 0.3
