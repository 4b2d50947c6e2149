"""DeepAtlas started from the supervised baseline's run instead of repeating its pre-training.

DeepAtlas's supervised pre-training draws the baseline's batches update for update (the arms are
paired by design), so after ``seg_pretrain_steps`` updates F_S and its optimiser hold exactly the
baseline's state at that update. The baseline writes that state once, to
``pretraining_handoff.pt`` in its run folder, and ``train-deepatlas --from-baseline RUN`` loads it
at the end of registration pre-training instead of training those updates again: the same
weights at the end (tested bit for bit on CPU) without the pre-training's time.

The hand-off holds F_S and its Adam state after the update, the best (smoothed) validation
score, the running smoothed score and the best weights up to then (the validation *at* the
hand-off update is left to DeepAtlas, which also scores its registration there) and the
baseline's log records up to then, which DeepAtlas copies into its own log at its own step
numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bladdergen import checkpoint as ckpt
from bladdergen.data.dataset import first_differing_case
from bladdergen.engine.run import METRICS_NAME, unwrap
from bladdergen.errors import CheckpointError, InputError

HANDOFF_NAME = "pretraining_handoff.pt"
# Settings that cannot change what the first seg_pretrain_steps supervised updates compute: run
# bookkeeping, and everything only the registration net or the alternating phase uses (F_S is
# built before F_R from the seed, the supervised draws are keyed by the segmentation update, and
# schedule_fits_baseline keeps validation on the baseline's updates whatever reg_pretrain_steps
# is). So one baseline serves DeepAtlas runs that differ in these (an ablation of the anatomy
# term, say), each still bit-identical to training its own pre-training (tested).
_FREE_KEYS = {"max_steps", "device", "checkpoint_every", "log_every", "cache_volumes", "sw_overlap"}
_FREE_KEYS |= {"reg_filters", "reg_inplane_levels", "reg_inplane_downsample", "reg_lr"}
_FREE_KEYS |= {"diffeomorphic", "integration_steps", "lncc_kernel", "lncc_scales", "reg_weight"}
_FREE_KEYS |= {"prealign", "anatomy_weight", "anatomy_filled_bladder", "anatomy_gate_margin"}
_FREE_KEYS |= {"anatomy_gate_segmenter", "pair_tumor_sampling", "seg_supervised_draw"}
_FREE_KEYS |= {"reg_augment_weight", "reg_augment_tumor", "augment_warped", "synthetic_filter"}
_FREE_KEYS |= {"reg_augment_context"}
_FREE_KEYS |= {"reg_pretrain_steps"}
_FREE_KEYS |= {"reg_steps_per_cycle", "seg_steps_per_cycle"}
# These act on the supervised draws only through synthetic pairs among the labeled cases, and the
# labeled ids are compared on their own: free when neither run has a pair (a baseline of the
# defaults then serves a DeepAtlas run whose synthetic volumes are unlabeled images only).
_PAIR_KEYS = {"synthetic_pairs", "synthetic_pair_weight", "synthetic_pair_tumor"}
SYNTHETIC_ID_PREFIX = "synthetic:"


def _free_keys(labeled: list[str]) -> set[str]:
    paired = any(case_id.startswith(SYNTHETIC_ID_PREFIX) for case_id in labeled)
    return _FREE_KEYS if paired else _FREE_KEYS | _PAIR_KEYS


def handoff_identity(
    seed: int,
    cfg_mapping: dict[str, Any],
    data_dir: Path,
    labeled: list[str],
    validation: list[str],
) -> dict[str, Any]:
    """What must be the same in both runs for the hand-off to be DeepAtlas's own pre-training.

    ``labeled``: the training pool's labeled ids, synthetic CT + label pairs included."""
    free = _free_keys(labeled)
    settings = {k: v for k, v in sorted(cfg_mapping.items()) if k not in free}
    return json.loads(
        json.dumps(
            {
                "seed": seed,
                "settings": settings,
                "data": str(Path(data_dir).resolve()),
                "labeled": labeled,
                "validation": validation,
            }
        )
    )


def write_handoff(
    run_dir: Path,
    *,
    step: int,
    seg_net: torch.nn.Module,
    seg_opt: torch.optim.Optimizer,
    identity: dict[str, Any],
    best_score: float,
    best_step: int | None,
    val_ema: float | None,
) -> None:
    """Write the baseline's state after update ``step`` (rank 0, before that step's validation)."""
    best = None
    if best_step is not None:
        tensors, metadata = ckpt.load_weights(run_dir / ckpt.BEST_WEIGHTS_NAME)
        best = {"tensors": tensors, "validation": metadata.get("validation", {})}
    records = [
        json.loads(line)
        for line in (run_dir / METRICS_NAME).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    state = {
        "step": step,
        "identity": identity,
        "seg_net": unwrap(seg_net).state_dict(),
        "seg_opt": seg_opt.state_dict(),
        "best_score": best_score,
        "best_step": best_step,
        "val_ema": val_ema,
        "best": best,
        "records": [r for r in records if r["step"] <= step],
    }
    ckpt.save_training_state(run_dir / HANDOFF_NAME, state)


def read_handoff(baseline_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The hand-off of ``baseline_dir``, refused (InputError) unless it was written by a baseline
    run with this DeepAtlas run's seed, settings, data and labeled/validation split."""
    path = Path(baseline_dir) / HANDOFF_NAME
    if not path.is_file():
        raise InputError(
            f"{path}: not found; --from-baseline expects the run folder of a "
            "`train-deepatlas --supervised-only` run that has reached "
            "deepatlas.seg_pretrain_steps updates"
        )
    try:
        state = ckpt.load_training_state(path)
    except CheckpointError as error:
        raise InputError(str(error)) from None
    recorded = state.get("identity", {})
    for key in ("seed", "labeled", "validation"):
        if recorded.get(key) != identity[key]:
            raise InputError(
                f"{path}: the baseline ran with {key} {recorded.get(key)!r}, this run has "
                f"{identity[key]!r}; --from-baseline needs the same seed, data and split"
            )
    if recorded.get("data") != identity["data"]:
        # Another folder is the same data for the pre-training when its labeled and validation
        # cases are: the supervised updates read nothing else (e.g. a folder with more
        # unlabeled scans beside the same labeled ones).
        ids = identity["labeled"] + identity["validation"]
        differing = first_differing_case(Path(str(recorded.get("data"))), identity["data"], ids)
        if differing is not None:
            raise InputError(
                f"{path}: the baseline ran with data {recorded.get('data')!r}, this run has "
                f"{identity['data']!r}, and {differing}; --from-baseline needs the same seed, "
                "labeled and validation cases and split"
            )
    # a hand-off written by an older version also recorded keys since found free: not compared
    free = _free_keys(identity["labeled"])  # the labeled ids are equal by now
    theirs = {k: v for k, v in recorded.get("settings", {}).items() if k not in free}
    ours = identity["settings"]
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in differ[:4])
        raise InputError(
            f"{path}: the baseline's deepatlas settings differ from this run's ({shown}); "
            "--from-baseline needs the settings its pre-training depends on to be the same"
        )
    return state
