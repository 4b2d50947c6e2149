"""bench/bench_fewlabel_pairs.py: a split's generator sees only what the split's segmenter may."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_a_generator_set_labels_only_the_splits_training_cases(tiny_dataset, tmp_path):
    from bladdergen.data.dataset import PreprocessedSet
    from bladdergen.deepatlas.pools import split_labeled

    _load("bench_gain")
    script = _load("bench_fewlabel_pairs")
    gain_out = tmp_path / "gain"
    (gain_out / "data").mkdir(parents=True)
    (gain_out / "data" / "pool").symlink_to(tiny_dataset)  # 4 labeled + 2 unlabeled cases

    sizes = script.generator_set(gain_out, tmp_path / "gen", n=1, seed=0, val_cases=2)

    split = PreprocessedSet.open(gain_out / "sets" / "n1_s0")  # bench_gain's 1 + 2 labeled
    # what train-deepatlas trains and validates on
    training, validation = split_labeled(split, 2, 0)
    generator = PreprocessedSet.open(tmp_path / "gen")
    ids = {case.case_id for case in generator.cases}
    assert [c.case_id for c in generator.labeled_cases] == training and len(training) == 1
    assert not ids & set(validation)
    assert len(ids) == 1 + 2  # the training case and the two unlabeled phantoms
    assert sizes == {"labeled": 1, "images": 3, "labeled_cases": training}
