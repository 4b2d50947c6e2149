"""Does DeepAtlas gain from unlabeled (and synthetic) scans? The paper's experiment on phantoms.

For each number of labeled training cases (``--labeled``) and each seed (``--seeds``), three arms are
trained with the same networks, budget of segmentation updates and validation cases:

- ``supervised``: ``train-deepatlas --supervised-only`` on the labeled cases;
- ``deepatlas``: DeepAtlas with the labeled cases and ``--unlabeled`` real unlabeled phantoms;
- ``deepatlas+synthetic``: the same plus the volumes in ``--synthetic DIR`` (e.g. what ``sample``
  wrote) as unlabeled images (its plausible CT + label pairs as labeled cases with
  ``--set deepatlas.synthetic_pairs=true``);
- ``supervised+pairs``: ``--supervised-only --synthetic-pairs`` with the labeled cases and the
  synthetic CT + label pairs of ``--synthetic DIR`` (no registration, no unlabeled images); the
  synthetic arms are skipped without ``--synthetic``. ``{labeled}`` and ``{seed}`` in it are
  filled per run: pairs from one generator per split (``bench_fewlabel_pairs.py``).

Every arm's best checkpoint (mean foreground validation Dice) segments the same ``--test-cases``
held-out phantoms (a disjoint seed), scored on the preprocessed grid: wall Dice and HD95 (mm),
tumor Dice over the test cases that have a tumor, tumor detection rate (a tumor case with any
predicted tumor voxel overlapping the truth) and false-positive rate (a tumor-free case with any
predicted tumor voxel). Paired differences to ``supervised`` are per test case, averaged over the
seeds, with a seeded percentile bootstrap over test cases.

Predictions are scored as ``segment`` writes them, only the largest connected bladder component
kept; ``--all-components`` scores the raw predictions instead (``OUT/gain_all_components.*``).
Writes ``OUT/gain.json`` (every number), ``OUT/gain.md`` (the table) and the run folders;
``--summarise-only --rescore`` scores the trained runs again without training; with ``--final``
their last weights instead of their best validation checkpoints (``OUT/gain_final.*``).

The measurement docs/benchmarks.md reports (2 and 4 labeled x 3 seeds, two runs at once on the
2-core CPU: ~100 min; supervised runs 7.5-8.5 min, DeepAtlas 16-21 min), then the table::

    python bench/bench_gain.py --out /tmp/gain2 --labeled 2 4 --seeds 0 1 2 --test-cases 24 \\
        --unlabeled 12 --arms supervised deepatlas --jobs 2
    python bench/bench_gain.py --out /tmp/gain2 --labeled 1 2 4 --seeds 0 1 2 --test-cases 24 \\
        --unlabeled 12 --arms supervised deepatlas --summarise-only --rescore

The deepatlas arm starts from its supervised arm's run (``train-deepatlas --from-baseline``: the
same weights as training its supervised pre-training again, in 444-663 s per DeepAtlas run where
full 4-labeled runs took 667-726 s); its job waits for that run. Budget overrides go in as
``--set key=value`` (e.g. ``--set deepatlas.max_steps=700``). An ablation of a setting only
DeepAtlas uses (``anatomy_weight``, ``reg_augment_weight``, ...) reuses an earlier output's
baselines, data and subsets with ``--baselines EARLIER_OUT`` and trains only the deepatlas arm.
With another ``--unlabeled`` than the earlier output's, the phantoms are made again in OUT (the
unlabeled ones are the pool's last cases, so the first ones are the same phantoms) and the run
stops unless its labeled cases and test set equal the earlier output's voxel for voxel: the
supervised rows and hand-offs stay valid, and the deepatlas arm sees more (or fewer) unlabeled
scans.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import machine_description  # noqa: E402  (the sibling script: one machine line)

ARMS = ("supervised", "supervised+pairs", "deepatlas", "deepatlas+synthetic")
SYNTHETIC_ARMS = ("supervised+pairs", "deepatlas+synthetic")
# Tumors below this many voxels (about a sphere of radius 2.3 voxels, ~7 mm at the tiny profile's
# 3 mm grid) are reported apart: a one-voxel boundary error alone costs them half their Dice.
SMALL_TUMOR_VOXELS = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labeled", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-cases", type=int, default=24)
    parser.add_argument("--unlabeled", type=int, default=12)
    parser.add_argument("--val-cases", type=int, default=3)
    parser.add_argument("--phantom-size", type=int, default=128)
    parser.add_argument("--data-seed", type=int, default=2024)
    parser.add_argument("--synthetic", type=Path, default=None)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--baselines",
        type=Path,
        default=None,
        help="take the supervised arm from this earlier OUT instead of training it: its rows, "
        "run folders (the deepatlas arms start from their hand-offs), data and subsets",
    )
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument(
        "--jobs", type=int, default=1, help="training runs at once (the cores shared between them)"
    )
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="train nothing: the table of the runs OUT/gain.json already holds",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the trained runs' best checkpoints again (with --summarise-only: no training)",
    )
    parser.add_argument(
        "--all-components",
        action="store_true",
        help="score raw predictions, every island kept (OUT/gain_all_components.*); default: "
        "the largest connected bladder component, as `segment` writes it",
    )
    parser.add_argument(
        "--final",
        action="store_true",
        help="score each run's last weights (model.safetensors) instead of its best validation "
        "checkpoint (OUT/gain_final.*): what the best-checkpoint choice adds or costs",
    )
    return parser.parse_args(argv)


def parse_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items -> {KEY: VALUE read as YAML}."""
    found = {}
    for item in items:
        key, _, value = item.partition("=")
        found[key] = yaml.safe_load(value)
    return found


def overrides(args: argparse.Namespace) -> dict:
    return {
        "deepatlas.val_cases": args.val_cases,
        "deepatlas.device": "cpu",
        **parse_sets(args.set),
    }


def make_data(args: argparse.Namespace, config) -> tuple[Path, Path]:
    """Phantoms (a labeled pool, unlabeled ones, a disjoint test set), preprocessed once."""
    from bladdergen.config import config_to_yaml
    from bladdergen.data.phantom import generate_phantoms
    from bladdergen.data.preprocess_run import preprocess_folder

    pool, test = args.out / "data" / "pool", args.out / "data" / "test"
    if (pool / "manifest.json").is_file() and (test / "manifest.json").is_file():
        return pool, test
    n_labeled = max(args.labeled) + args.val_cases
    raw = args.out / "data" / "raw"
    generate_phantoms(
        raw / "pool",
        n=n_labeled + args.unlabeled,
        seed=args.data_seed,
        size=args.phantom_size,
        unlabeled=args.unlabeled,
        overwrite=True,
    )
    generate_phantoms(
        raw / "test",
        n=args.test_cases,
        seed=args.data_seed + 10_000,
        size=args.phantom_size,
        unlabeled=0,
        overwrite=True,
    )
    text = config_to_yaml(config)
    preprocess_folder(raw / "pool", pool, config.preprocess, overwrite=True, config_yaml=text)
    preprocess_folder(raw / "test", test, config.preprocess, overwrite=True, config_yaml=text)
    return pool, test


def subset(pool: Path, out: Path, n_labeled: int, val_cases: int, seed: int) -> Path:
    """A preprocessed set over ``pool``'s files: ``n_labeled + val_cases`` labeled cases (seeded
    choice; train-deepatlas holds ``val_cases`` of them out) and every unlabeled case."""
    manifest = json.loads((pool / "manifest.json").read_text())
    labeled = [c for c in manifest["cases"] if c.get("label")]
    pick = np.random.default_rng([seed, n_labeled]).permutation(len(labeled))
    chosen = {labeled[i]["case_id"] for i in pick[: n_labeled + val_cases]}
    cases = []
    out.mkdir(parents=True, exist_ok=True)

    def link(relative: str) -> str:
        # manifests name files inside their own folder: a symbolic link to the pool's file
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink():
            target.symlink_to((pool / relative).resolve())
        return relative

    for case in manifest["cases"]:
        entry = {**case, "image": link(case["image"])}
        if case.get("label") and case["case_id"] in chosen:
            entry["label"] = link(case["label"])
        elif case.get("label"):
            continue  # a labeled case not chosen stays out (not even as unlabeled)
        else:
            entry["label"] = None
        cases.append(entry)
    # written only when new or changed: --baselines reads another OUT's subsets, never writes them
    _write_if_changed(out / "manifest.json", json.dumps({**manifest, "cases": cases}, indent=1))
    if (pool / "config.yaml").is_file():
        _write_if_changed(out / "config.yaml", (pool / "config.yaml").read_text())
    return out


def synthetic_folder(template: Path | None, n_labeled: int, seed: int) -> Path | None:
    """``--synthetic`` for one run: ``{labeled}`` and ``{seed}`` in it filled in, so that each
    split can have pairs from a generator of its own (``bench_fewlabel_pairs.py``)."""
    if template is None:
        return None
    return Path(str(template).format(labeled=n_labeled, seed=seed))


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def score_run(
    run_dir: Path, test: Path, all_components: bool = False, final: bool = False
) -> list[dict]:
    """Per test case: wall and tumor scores of the run's best checkpoint (its last weights with
    ``final``) on the preprocessed grid, post-processed as ``segment`` does (largest connected
    bladder component) unless ``all_components``."""
    import torch

    from bladdergen.data.dataset import PreprocessedSet
    from bladdergen.deepatlas.segment import (
        largest_bladder_component,
        load_segmentation_model,
        predict_classes,
    )
    from bladdergen.evaluate.seg import score_structure

    net, _ = load_segmentation_model(run_dir, "cpu", prefer_best=not final)
    dataset = PreprocessedSet.open(test)
    rows = []
    for case in dataset.labeled_cases:
        image = torch.from_numpy(np.ascontiguousarray(dataset.load_image(case), np.float32))
        with torch.no_grad():
            predicted = predict_classes(net, image[None, None]).numpy()
        if not all_components:
            predicted = largest_bladder_component(predicted)
        truth = dataset.load_label(case)
        spacing = dataset.spacing(case)
        wall = score_structure(predicted == 1, truth == 1, spacing)
        tumor = score_structure(predicted == 2, truth == 2, spacing)
        rows.append(
            {
                "case_id": case.case_id,
                "wall_dice": wall["dice"],
                "wall_hd95_mm": wall["hd_mm"],
                "has_tumor": bool((truth == 2).any()),
                "tumor_voxels": int((truth == 2).sum()),
                "tumor_dice": tumor["dice"],
                "tumor_detected": bool(((predicted == 2) & (truth == 2)).any()),
                "tumor_predicted": bool((predicted == 2).any()),
            }
        )
    return rows


def summarise(results: dict, arms: list[str], labeled: list[int], seeds: list[int], samples: int):
    """Per labeled count and arm: means over seeds and test cases; paired differences to
    ``supervised`` with a bootstrap CI over test cases."""
    from bladdergen.evaluate.stats import bootstrap_mean_ci

    def per_case(n: int, arm: str, key: str, where=None) -> dict[str, float]:
        values: dict[str, list[float]] = {}
        for seed in seeds:
            for row in results.get(f"{n}/{seed}/{arm}", []):
                if where is not None and not where(row):
                    continue
                if row[key] is not None:
                    values.setdefault(row["case_id"], []).append(float(row[key]))
        return {case: float(np.mean(v)) for case, v in values.items()}

    table = []
    for n in labeled:
        for arm in arms:
            if not any(f"{n}/{s}/{arm}" in results for s in seeds):
                continue
            wall = per_case(n, arm, "wall_dice")
            hd = per_case(n, arm, "wall_hd95_mm")
            tumor = per_case(n, arm, "tumor_dice", lambda r: r["has_tumor"])
            small = per_case(n, arm, "tumor_dice", lambda r: _tumor_size(r) == "small")
            large = per_case(n, arm, "tumor_dice", lambda r: _tumor_size(r) == "large")
            detected = per_case(n, arm, "tumor_detected", lambda r: r["has_tumor"])
            false_pos = per_case(n, arm, "tumor_predicted", lambda r: not r["has_tumor"])
            entry = {
                "labeled": n,
                "arm": arm,
                "wall_dice": float(np.mean(list(wall.values()))),
                "wall_hd95_mm": float(np.mean(list(hd.values()))) if hd else None,
                "wall_hd95_n": len(hd),
                "tumor_dice": float(np.mean(list(tumor.values()))) if tumor else None,
                "tumor_cases": len(tumor),
                "tumor_dice_small": float(np.mean(list(small.values()))) if small else None,
                "tumor_cases_small": len(small),
                "tumor_dice_large": float(np.mean(list(large.values()))) if large else None,
                "tumor_cases_large": len(large),
                "tumor_detection_rate": float(np.mean(list(detected.values())))
                if detected
                else None,
                "tumor_false_positive_rate": float(np.mean(list(false_pos.values())))
                if false_pos
                else None,
            }
            if arm != "supervised":
                for key, mine, ref in (
                    ("wall_dice", wall, per_case(n, "supervised", "wall_dice")),
                    ("wall_hd95_mm", hd, per_case(n, "supervised", "wall_hd95_mm")),
                    (
                        "tumor_dice",
                        tumor,
                        per_case(n, "supervised", "tumor_dice", lambda r: r["has_tumor"]),
                    ),
                ):
                    shared = sorted(set(mine) & set(ref))
                    diff = np.array([mine[c] - ref[c] for c in shared])
                    if diff.size:
                        low, high = bootstrap_mean_ci(diff, samples, 0.95, seed=0)
                        entry[f"{key}_diff"] = [float(diff.mean()), low, high, int(diff.size)]
            table.append(entry)
    return table


def _tumor_size(row: dict) -> str | None:
    """A tumor case's size group: "small" (under ``SMALL_TUMOR_VOXELS`` voxels on the preprocessed
    grid) or "large"; None for a tumor-free case or a row scored before the size was recorded."""
    if not row["has_tumor"] or "tumor_voxels" not in row:
        return None
    return "small" if row["tumor_voxels"] < SMALL_TUMOR_VOXELS else "large"


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _diff(entry: dict, key: str, digits=3) -> str:
    if key not in entry:
        return "–"
    mean, low, high, _ = entry[key]
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def render(table: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = table_lines(table) + [
        "",
        f"Seeds {args.seeds}, {args.test_cases} test phantoms, {args.unlabeled} unlabeled, "
        f"{args.val_cases} validation cases, overrides {args.set or 'none'}; "
        f"{'every predicted island' if args.all_components else 'largest bladder component'} "
        f"of the {'last weights' if args.final else 'best validation checkpoint'} scored; small tumors: < {SMALL_TUMOR_VOXELS} voxels on the preprocessed grid; "
        f"{seconds / 60:.1f} min.",
        "",
        f"Machine: {machine_description()}",
    ]
    return "\n".join(lines) + "\n"


def table_lines(table: list[dict]) -> list[str]:
    """The markdown table of :func:`summarise`'s entries, one row per (labeled count, arm)."""
    lines = [
        "| labeled | arm | wall Dice | Δ wall Dice [95% CI] | wall HD95 mm (n) | Δ HD95 mm | "
        "tumor Dice (tumor cases) | small / large tumors | Δ tumor Dice | detection | "
        "false positive |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['labeled']} | {e['arm']} | {_fmt(e['wall_dice'])} | {_diff(e, 'wall_dice_diff')} "
            f"| {_fmt(e['wall_hd95_mm'], 1)} ({e['wall_hd95_n']}) | "
            f"{_diff(e, 'wall_hd95_mm_diff', 1)} | {_fmt(e['tumor_dice'])} ({e['tumor_cases']}) | "
            f"{_fmt(e['tumor_dice_small'])} ({e['tumor_cases_small']}) / "
            f"{_fmt(e['tumor_dice_large'])} ({e['tumor_cases_large']}) | "
            f"{_diff(e, 'tumor_dice_diff')} | {_fmt(e['tumor_detection_rate'], 2)} | "
            f"{_fmt(e['tumor_false_positive_rate'], 2)} |"
        )
    return lines


def unlabeled_count(pool: Path) -> int:
    """How many cases of a preprocessed pool carry no label."""
    manifest = json.loads((pool / "manifest.json").read_text())
    return sum(1 for case in manifest["cases"] if not case.get("label"))


def require_same_cases(ours: Path, theirs: Path, labeled_only: bool) -> None:
    """SystemExit unless two preprocessed folders hold the same (labeled) cases, voxel for
    voxel (phantoms are made again per output, so the names alone prove nothing)."""
    from bladdergen.data.dataset import PreprocessedSet, first_differing_case

    ids = sorted(
        {
            case.case_id
            for folder in (ours, theirs)
            for case in PreprocessedSet.open(folder, check_voxels=False).cases
            if case.labeled or not labeled_only
        }
    )
    differing = first_differing_case(theirs, ours, ids)
    if differing is not None:
        raise SystemExit(
            f"--baselines: {ours} and {theirs} differ: {differing}; expected the same labeled "
            "cases and test set (pass the baselines' --labeled, --val-cases, --test-cases, "
            "--phantom-size and --data-seed)"
        )


def take_baselines(other: Path, labeled: list[int], seeds: list[int]) -> dict:
    """The supervised arm's scored runs of another bench_gain OUT (``--baselines``), every one
    this invocation needs, or SystemExit naming the first missing."""
    path = other / "gain.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    taken = {}
    for n in labeled:
        for seed in seeds:
            key = f"{n}/{seed}/supervised"
            if key not in runs:
                raise SystemExit(f"--baselines {other}: {path} has no run {key}")
            taken[key] = runs[key]
    return taken


def job_threads(jobs: int) -> int:
    """Torch threads per training run: ``OMP_NUM_THREADS`` when set (two bench_gain.py at once
    on 2 cores each need 1, or they oversubscribe the cores: 3.5x slower per step, measured),
    else the cores shared between the ``jobs`` runs at once."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def train_and_score(job: dict) -> dict:
    """One arm of one (labeled count, seed): train it, score its best checkpoint on the test set.
    Runs in a worker process with ``--jobs`` > 1 (spawned: a forked torch can deadlock)."""
    import torch

    from bladdergen.checkpoint import STATE_NAME
    from bladdergen.config import load_config
    from bladdergen.deepatlas.train import train_deepatlas

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    config = load_config(job["profile"], overrides=job["overrides"])
    run_dir = Path(job["run_dir"])
    # a bench killed mid-run continues each run from its last checkpoint (bit-identical to an
    # uninterrupted run with the same thread count); one killed before its first checkpoint
    # starts again
    resume = (run_dir / STATE_NAME).is_file()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    summary = train_deepatlas(
        config.deepatlas,
        job["data"],
        run_dir,
        seed=job["seed"],
        synthetic_dir=job["synthetic"],
        supervised_only=job["arm"].startswith("supervised"),
        from_baseline=job["from_baseline"],
        resume=resume,
    )
    rows = score_run(job["run_dir"], job["test"], job["all_components"], job["final"])
    report = {
        "run": job["key"],
        "train_seconds": round(time.perf_counter() - t0, 1),
        "best_step": summary["best_step"],
        "gate": summary.get("anatomy_gate_open"),
        "wall_dice": round(float(np.mean([r["wall_dice"] for r in rows])), 4),
    }
    return {"key": job["key"], "rows": rows, "report": report}


def run_jobs(jobs: list[dict], workers: int, record) -> None:
    """Train ``jobs``, ``workers`` at a time; a job with ``after`` starts once that job is done."""
    waiting = [j for j in jobs if j["after"] is not None]
    if workers <= 1:
        for job in [j for j in jobs if j["after"] is None] + waiting:
            record(train_and_score(job))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        running = {pool.submit(train_and_score, j): j for j in jobs if j["after"] is None}
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)["key"]
                record(future.result())
                for job in [j for j in waiting if j["after"] == key]:
                    waiting.remove(job)
                    running[pool.submit(train_and_score, job)] = job


def arm_overrides(arm: str) -> dict:
    """What an arm sets itself: supervised+pairs exists to take the synthetic CT + label pairs as
    labeled cases, which ``deepatlas.synthetic_pairs`` leaves off by default."""
    return {"deepatlas.synthetic_pairs": True} if arm == "supervised+pairs" else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bladdergen.config import load_config
    from bladdergen.deepatlas.handoff import HANDOFF_NAME
    from bladdergen.deepatlas.pools import synthetic_pair_count
    from bladdergen.deepatlas.train import schedule_fits_baseline

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gain" + ("_all_components" if args.all_components else "") + ("_final" * args.final)
    results_path = args.out / f"{name}.json"
    results = json.loads(results_path.read_text())["runs"] if results_path.is_file() else {}
    arms = [a for a in args.arms if a not in SYNTHETIC_ARMS or args.synthetic is not None]
    base = load_config(args.profile, overrides=overrides(args))
    # with --baselines the data, subsets and supervised runs are the other folder's
    source = args.baselines or args.out
    source_sets = source  # where the subsets live: the baselines' own unless the data differ
    if args.baselines is not None:
        results |= take_baselines(args.baselines, args.labeled, args.seeds)
        arms = list(dict.fromkeys(["supervised", *arms]))
        data_args = argparse.Namespace(**{**vars(args), "out": args.baselines})
        pool, test = make_data(data_args, base)
        if args.unlabeled != unlabeled_count(pool):
            # another number of unlabeled scans than the baselines': this output's own data and
            # subsets, whose labeled cases and test set must be the baselines' (the supervised
            # rows stay paired with the new arms case by case)
            own_pool, own_test = make_data(args, base)
            require_same_cases(own_pool, pool, labeled_only=True)
            require_same_cases(own_test, test, labeled_only=False)
            pool, test, source_sets = own_pool, own_test, args.out
    else:
        pool, test = make_data(args, base)
    # DeepAtlas's supervised pre-training is the baseline's first updates (paired by design): the
    # deepatlas arm starts from the supervised arm's hand-off instead of training them again
    handoff = "supervised" in arms and schedule_fits_baseline(base.deepatlas) is None
    jobs = []
    for seed in args.seeds:
        for n in args.labeled:
            data = subset(pool, source_sets / "sets" / f"n{n}_s{seed}", n, args.val_cases, seed)
            synthetic = synthetic_folder(args.synthetic, n, seed)
            # so does deepatlas+synthetic when its synthetic volumes are unlabeled images only
            # (with synthetic CT + label pairs among its labeled cases its pre-training is its own)
            handoff_arms = {"deepatlas"}
            if synthetic is not None and not (
                base.deepatlas.synthetic_pairs and synthetic_pair_count(synthetic) > 0
            ):
                handoff_arms.add("deepatlas+synthetic")
            for arm in arms:
                key = f"{n}/{seed}/{arm}"
                home = source if arm == "supervised" else args.out
                run_dir = home / "runs" / f"n{n}_s{seed}_{arm}"
                if args.rescore and (run_dir / "best.safetensors").is_file():
                    results[key] = score_run(run_dir, test, args.all_components, args.final)
                    continue
                if key in results or args.summarise_only:
                    continue  # measured by an earlier, interrupted invocation
                jobs.append(
                    {
                        "key": key,
                        "arm": arm,
                        "seed": seed,
                        "data": data,
                        "test": test,
                        "run_dir": run_dir,
                        "profile": args.profile,
                        "overrides": {**overrides(args), "seed": seed, **arm_overrides(arm)},
                        "synthetic": synthetic if arm in SYNTHETIC_ARMS else None,
                        "all_components": args.all_components,
                        "final": args.final,
                        "from_baseline": None,
                        "after": None,  # the key of the job whose hand-off this one takes
                        # the cores shared out between the runs at once
                        "threads": job_threads(args.jobs),
                    }
                )
                baseline = source / "runs" / f"n{n}_s{seed}_supervised"
                if arm in handoff_arms and handoff:
                    pending = f"{n}/{seed}/supervised" not in results
                    if pending or (baseline / HANDOFF_NAME).is_file():
                        jobs[-1] |= {"from_baseline": baseline}
                        jobs[-1] |= {"after": f"{n}/{seed}/supervised" if pending else None}

    def record(done: dict) -> None:
        results[done["key"]] = done["rows"]
        print(json.dumps(done["report"]), flush=True)
        results_path.write_text(json.dumps({"runs": results}, indent=1))

    run_jobs(jobs, args.jobs, record)
    table = summarise(results, arms, args.labeled, args.seeds, args.bootstrap)
    seconds = time.perf_counter() - started
    results_path.write_text(json.dumps({"runs": results, "table": table}, indent=1))
    (args.out / f"{name}.md").write_text(render(table, args, seconds))
    print(render(table, args, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
