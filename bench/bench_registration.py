"""Registration on labeled phantom pairs: warped-label Dice against the identity.

Trains F_R (tiny-profile network) for ``--steps`` on random ordered pairs of the first ``--train``
labeled cases of a preprocessed set, with similarity + ``--reg-weight``·bending (voxel units) +
``--anatomy-weight``·anatomy (manual labels as S), optionally after the moments pre-alignment, then
registers every ordered pair of the next ``--test`` labeled cases and prints one JSON line: mean
warped-label wall Dice (``wall``) and filled-bladder Dice (``bl``), the same for the unmoved labels
(``wall_id``, ``bl_id``), folding fraction and mean |u| (voxels).

    bladdergen phantom raw -n 40 --seed 3 --size 128 --unlabeled 12
    bladdergen preprocess raw pre -p tiny
    python bench/bench_registration.py pre --reg-weight 1 --steps 60
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bladdergen.config import load_config
from bladdergen.data.dataset import PreprocessedSet
from bladdergen.deepatlas.align import compose, filled_bladder, prealignment
from bladdergen.deepatlas.fields import Warper, folding_fraction
from bladdergen.deepatlas.losses import DeepAtlasLosses, anatomy_channels, one_hot
from bladdergen.deepatlas.networks import RegistrationNet
from bladdergen.deepatlas.segment import dice_per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--reg-weight", type=float, default=1.0)
    parser.add_argument("--no-prealign", action="store_true")
    parser.add_argument("--lncc-kernel", type=int, default=7)
    parser.add_argument("--lncc-scales", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--anatomy-weight", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train", type=int, default=16)
    parser.add_argument("--test", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = PreprocessedSet.open(args.data)
    cases = dataset.labeled_cases[: args.train + args.test]
    images = [np.asarray(dataset.load_image(c), np.float32) for c in cases]
    labels = [np.asarray(dataset.load_label(c), np.int64) for c in cases]
    train, test = list(range(args.train)), list(range(args.train, len(cases)))
    cfg = load_config("tiny").deepatlas
    torch.manual_seed(0)
    net = RegistrationNet.from_config(cfg)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.reg_lr)
    losses, warper = DeepAtlasLosses(args.lncc_kernel, tuple(args.lncc_scales)), Warper()

    def tensor(a):
        return torch.from_numpy(a)[None, None]

    def field_of(i, j):
        moving, target = tensor(images[i]), tensor(images[j])
        if args.no_prealign:
            return net(moving, target)
        masks = [torch.from_numpy(filled_bladder(labels[k]))[None] for k in (i, j)]
        shift, scale = prealignment(*masks)
        return compose(shift, scale, net(warper(moving, shift), target))

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(args.steps):
        i, j = rng.choice(train, 2, replace=False)
        net.train()
        field = field_of(i, j)
        moving, target = tensor(images[i]), tensor(images[j])
        loss = losses.similarity(warper(moving, field), target)
        loss = loss + args.reg_weight * losses.regularity(field)
        if args.anatomy_weight > 0:
            warped = warper(anatomy_channels(one_hot(tensor(labels[i]))), field)
            anatomy = losses.anatomy(warped, anatomy_channels(one_hot(tensor(labels[j]))))
            loss = loss + args.anatomy_weight * anatomy
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    train_seconds = time.perf_counter() - started
    net.eval()
    found: dict[str, list[float]] = {k: [] for k in ("wall", "wall_id", "bl", "bl_id", "fold")}

    def mask_dice(a, b):
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    with torch.no_grad():
        for a in test:
            for b in test:
                if a == b:
                    continue
                field = field_of(a, b)
                warped = warper(one_hot(tensor(labels[a])), field).argmax(1)[0].numpy()
                truth = torch.from_numpy(labels[b])
                found["wall"].append(dice_per_class(torch.from_numpy(warped), truth)[1])
                found["wall_id"].append(dice_per_class(torch.from_numpy(labels[a]), truth)[1])
                found["bl"].append(mask_dice(filled_bladder(warped), filled_bladder(labels[b])))
                found["bl_id"].append(
                    mask_dice(filled_bladder(labels[a]), filled_bladder(labels[b]))
                )
                found["fold"].append(folding_fraction(field))
    result = {k: round(float(np.mean(v)), 4) for k, v in found.items()}
    print(
        json.dumps(
            {
                "args": vars(args) | {"data": str(args.data)},
                "train_seconds": round(train_seconds, 1),
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
