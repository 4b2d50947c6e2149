"""How does DeepAtlas's synthetic filter treat real scans? (issue 11)

The filter keeps a synthetic volume when F_S's segmentation of it (F_S as pre-training leaves it)
passes the anatomy plausibility check against the labeled cases' ranges
(``train.filter_synthetic``). A filter that also rejects most *real* scans judges F_S's mistakes
more than the synthetic volumes. For each ``deepatlas+synthetic`` run of a ``bench_gain.py``
output this script loads the same F_S (the supervised baseline's ``pretraining_handoff.pt``) and
applies the same check (``train.passes_synthetic_filter``) to three groups, with the failed checks
and the count under ``sample``'s per-piece tumor rule beside it:

- the run's real unlabeled phantoms and the bench's test phantoms (F_S's segmentation of them);
- the test phantoms' true label maps (what a perfect F_S would give: the ranges' own share);
- the run's prepared synthetic volumes (its count is the run's logged ``kept``).

    python bench/filter_check.py --runs /tmp/P9_2 --baselines /tmp/B2 --out /tmp/P9_2/filter_check.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

ARM = "deepatlas+synthetic"


def _volume(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _handoff_segmenter(run_dir: Path, baseline_run: Path):
    """F_S as the run received it: its config's network with the baseline's hand-off weights."""
    from bladdergen import checkpoint as ckpt
    from bladdergen.deepatlas.config import DeepAtlasConfig
    from bladdergen.deepatlas.handoff import HANDOFF_NAME
    from bladdergen.deepatlas.networks import SegmentationNet
    from bladdergen.settings import from_mapping

    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["deepatlas"]
    net = SegmentationNet.from_config(from_mapping(DeepAtlasConfig, config, str(run_dir)))
    state = ckpt.load_training_state(baseline_run / HANDOFF_NAME)
    net.load_state_dict(state["seg_net"])
    return net.eval()


def _tally(class_maps, spacing, ranges) -> dict:
    """How many maps pass the filter (its own function), the checks they fail under its rule,
    and how many would pass ``sample``'s per-piece tumor rule instead."""
    from bladdergen.deepatlas.train import passes_synthetic_filter
    from bladdergen.evaluate.anatomy import measure_anatomy, plausibility

    passed, per_piece, failed, n = 0, 0, Counter(), 0
    for classes in class_maps:
        n += 1
        passed += passes_synthetic_filter(classes, spacing, ranges)
        measurement = measure_anatomy(classes, spacing)
        checks = plausibility(measurement, ranges, tumor_per_piece=False)
        failed.update(name for name, ok in checks.items() if ok is False)
        per_piece += bool(plausibility(measurement, ranges)["plausible"])
    return {
        "n": n,
        "passed": passed,
        "per_piece": per_piece,
        "failed": dict(sorted(failed.items())),
    }


def check_run(run_dir: Path, baselines: Path) -> dict:
    """The filter's pass counts for one ``deepatlas+synthetic`` run folder."""
    from bladdergen.deepatlas.segment import predict_classes
    from bladdergen.deepatlas.train import synthetic_filter_ranges

    name = run_dir.name.removesuffix(f"_{ARM}")  # n{labeled}_s{seed}
    net = _handoff_segmenter(run_dir, baselines / "runs" / f"{name}_supervised")
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    subset = baselines / "sets" / name
    label_files = [subset / "labels" / f"{case}.nii.gz" for case in split["labeled"]]
    spacing = tuple(float(s) for s in nib.load(str(label_files[0])).header.get_zooms()[:3])
    ranges = synthetic_filter_ranges([_volume(p).astype(np.uint8) for p in label_files], spacing)

    def segmented(paths):
        for path in paths:
            image = torch.from_numpy(_volume(path).astype(np.float32))[None, None]
            yield predict_classes(net, image).numpy()

    real_ids = [c.split(":", 1)[1] for c in split["unlabeled"] if c.startswith("unlabeled:")]
    real = [subset / "images" / f"{case}.nii.gz" for case in real_ids]
    test = sorted((baselines / "data" / "test" / "images").glob("*.nii.gz"))
    truth = [_volume(p.parent.parent / "labels" / p.name).astype(np.uint8) for p in test]
    synthetic = sorted((run_dir / "prepared" / "synthetic").glob("*.nii.gz"))
    return {
        "ranges": ranges,
        "real_unlabeled": _tally(segmented(real), spacing, ranges),
        "test": _tally(segmented(test), spacing, ranges),
        "test_truth": _tally(truth, spacing, ranges),
        "synthetic": _tally(segmented(synthetic), spacing, ranges),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="bench_gain.py outputs")
    parser.add_argument("--baselines", type=Path, required=True, help="their --baselines folder")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {}
    for folder in args.runs:
        for run_dir in sorted((folder / "runs").glob(f"*_{ARM}")):
            result[str(run_dir)] = check_run(run_dir, args.baselines)
            groups = {k: v for k, v in result[str(run_dir)].items() if k != "ranges"}
            counts = {k: (v["passed"], v["per_piece"], v["n"]) for k, v in groups.items()}
            print(run_dir.name, json.dumps(counts), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
