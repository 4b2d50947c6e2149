"""``bladdergen demo``: the paper's whole pipeline on the embedded phantoms, resumable stage by stage.

Stages, in order (each is the same core function the matching command calls)::

    phantom -> preprocess -> train-vqgan -> train-ldm -> sample
            -> train-baseline (labeled only)
            -> train-deepatlas (labeled + unlabeled + synthetic, from the baseline's pre-training)
            -> segment (held-out test phantoms, both models) -> evaluate (seg and gen)

Run folder layout::

    RUN/config.yaml                     resolved configuration
    RUN/data/raw_train, raw_test        phantoms (HU NIfTI, labels 0/128/255)
    RUN/data/train                      preprocessed training set
    RUN/vqgan, ldm, deepatlas, baseline run folders of the trainers
    RUN/synthetic                       generated volumes (HU NIfTI) + manifest.json
    RUN/predictions/{baseline,deepatlas} label maps of the test phantoms, original geometry
    RUN/evaluation/{seg,gen}            reports, CSV, JSON, PNG montages
    RUN/report.md                       the final summary
    RUN/stages/<stage>.json             completion stamps (fingerprint of the stage's settings)

A stage whose stamp matches its fingerprint is skipped, so an interrupted demo resumes where it
stopped (trainers resume from their own training state). A stage whose settings changed is rerun
from scratch, together with everything after it; ``from_stage`` forces that from a given stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bladdergen.checkpoint import STATE_NAME
from bladdergen.config import PipelineConfig, to_mapping, write_config
from bladdergen.errors import InputError
from bladdergen.fileio import atomic_write_json, atomic_write_text
from bladdergen.progress import SILENT, Reporter

STAGES = (
    "phantom",
    "preprocess",
    "train-vqgan",
    "train-ldm",
    "sample",
    "train-baseline",
    "train-deepatlas",
    "segment",
    "evaluate",
)

# Which config sections each stage reads; a change there reruns it and everything after it.
_STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "phantom": (),
    "preprocess": ("preprocess",),
    "train-vqgan": ("vqgan",),
    "train-ldm": ("ldm",),
    "sample": ("sample",),
    "train-baseline": ("deepatlas",),
    "train-deepatlas": ("deepatlas",),
    "segment": (),
    "evaluate": ("evaluate",),
}


# The demo's own budgets over the tiny profile's. Its generated volumes enter DeepAtlas only when
# they pass the anatomy checks, which none did at the then tiny profile's 400 VQ-GAN / 1,200 LDM
# steps (0 of 16), nor at 300 / 600, so the 15-minute demo spends its time on the two
# segmentation arms instead (docs/benchmarks.md#demo): 300 VQ-GAN steps keep 50 with the
# discriminators, 300 LDM steps run every stage of generation; `bench/bench_paired.py` measures
# generation with the tiny budgets (400 / 2,400).
DEMO_DEFAULTS = {"tiny": {"vqgan.max_steps": 300, "ldm.max_steps": 300}}


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo's data: phantoms for training and held-out test phantoms."""

    # 8 labeled (3 held out for validation, 5 to train on), 10 unlabeled; 16 test phantoms
    train_cases: int = 18
    unlabeled_cases: int = 10
    test_cases: int = 16
    phantom_size: int = 128
    synthetic_volumes: int = 16


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes inside the run folder."""

    root: Path

    @property
    def raw_train(self) -> Path:
        return self.root / "data" / "raw_train"

    @property
    def raw_test(self) -> Path:
        return self.root / "data" / "raw_test"

    @property
    def train(self) -> Path:
        return self.root / "data" / "train"

    @property
    def vqgan(self) -> Path:
        return self.root / "vqgan"

    @property
    def ldm(self) -> Path:
        return self.root / "ldm"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def deepatlas(self) -> Path:
        return self.root / "deepatlas"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline"

    def predictions(self, model: str) -> Path:
        return self.root / "predictions" / model

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    def stamp(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def outputs(self, stage: str) -> list[Path]:
        """Folders a stage owns (removed when it reruns from scratch)."""
        return {
            "phantom": [self.raw_train, self.raw_test],
            "preprocess": [self.train],
            "train-vqgan": [self.vqgan],
            "train-ldm": [self.ldm],
            "sample": [self.synthetic],
            "train-baseline": [self.baseline],
            "train-deepatlas": [self.deepatlas],
            "segment": [self.root / "predictions"],
            "evaluate": [self.evaluation, self.root / "report.md"],
        }[stage]


def stage_fingerprints(config: PipelineConfig, plan: DemoPlan) -> dict[str, str]:
    """A fingerprint per stage: its own settings chained with every earlier stage's fingerprint."""
    settings = to_mapping(config)
    fingerprints: dict[str, str] = {}
    previous = json.dumps({"seed": config.seed, "plan": dataclasses.asdict(plan)}, sort_keys=True)
    for stage in STAGES:
        own = {name: settings[name] for name in _STAGE_SECTIONS[stage]}
        text = json.dumps({"stage": stage, "settings": own, "previous": previous}, sort_keys=True)
        previous = hashlib.sha256(text.encode()).hexdigest()
        fingerprints[stage] = previous
    return fingerprints


def run_demo(
    run_dir: Path,
    config: PipelineConfig,
    plan: DemoPlan = DemoPlan(),
    from_stage: str | None = None,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Run (or resume) the whole pipeline in ``run_dir``; returns timings and the key results."""
    if from_stage is not None and from_stage not in STAGES:
        raise InputError(f"--from: got {from_stage!r}, expected one of {', '.join(STAGES)}")
    paths = DemoPaths(Path(run_dir))
    if paths.root.exists() and not paths.root.is_dir():
        raise InputError(f"{paths.root}: exists and is not a folder")
    paths.root.mkdir(parents=True, exist_ok=True)
    write_config(config, paths.root)
    fingerprints = stage_fingerprints(config, plan)

    # Find the first stage that must run: forced, stale, or never finished.
    first = STAGES.index(from_stage) if from_stage is not None else len(STAGES)
    for index, stage in enumerate(STAGES):
        if _stamp_fingerprint(paths.stamp(stage)) != fingerprints[stage]:
            first = min(first, index)
            break
    for stage in STAGES[first:]:
        stamp = _stamp_fingerprint(paths.stamp(stage))
        paths.stamp(stage).unlink(missing_ok=True)
        stale = stamp is not None or (from_stage is not None and STAGES.index(stage) >= first)
        if stale:  # finished before with other settings (or forced): start that stage afresh
            for output in paths.outputs(stage):
                _remove(output)

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "phantom": lambda: _phantoms(paths, config, plan, reporter),
        "preprocess": lambda: _preprocess(paths, config, reporter),
        "train-vqgan": lambda: _train_vqgan(paths, config, reporter),
        "train-ldm": lambda: _train_ldm(paths, config, reporter),
        "sample": lambda: _sample(paths, config, plan, reporter),
        "train-baseline": lambda: _train_deepatlas(paths, config, reporter, supervised_only=True),
        "train-deepatlas": lambda: _train_deepatlas(paths, config, reporter, supervised_only=False),
        "segment": lambda: _segment(paths, config, reporter),
        "evaluate": lambda: _evaluate(paths, config, reporter),
    }
    seconds: dict[str, float] = {}
    for stage in STAGES:
        if stage in STAGES[:first]:
            seconds[stage] = 0.0
            continue
        reporter.notice(f"demo stage: {stage}")
        start = time.perf_counter()
        result = runners[stage]()
        seconds[stage] = round(time.perf_counter() - start, 1)
        atomic_write_json(
            paths.stamp(stage),
            {
                "stage": stage,
                "fingerprint": fingerprints[stage],
                "seconds": seconds[stage],
                "result": result,
            },
        )
    summary = _summary(paths, seconds, first)
    atomic_write_text(paths.root / "report.md", _report(paths, summary))
    atomic_write_json(paths.root / "demo.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Stages


def _phantoms(paths: DemoPaths, config: PipelineConfig, plan: DemoPlan, reporter: Reporter):
    from bladdergen.data.phantom import generate_phantoms

    train = generate_phantoms(
        paths.raw_train,
        n=plan.train_cases,
        seed=config.seed,
        size=plan.phantom_size,
        unlabeled=plan.unlabeled_cases,
        overwrite=True,
        reporter=reporter,
    )
    # A disjoint seed: test phantoms share no case with the training phantoms.
    test = generate_phantoms(
        paths.raw_test,
        n=plan.test_cases,
        seed=config.seed + 10_000,
        size=plan.phantom_size,
        unlabeled=0,
        overwrite=True,
        reporter=reporter,
    )
    return {"train": _brief(train), "test": _brief(test)}


def _preprocess(paths: DemoPaths, config: PipelineConfig, reporter: Reporter):
    from bladdergen.config import config_to_yaml
    from bladdergen.data.preprocess_run import preprocess_folder

    result = preprocess_folder(
        paths.raw_train,
        paths.train,
        config.preprocess,
        overwrite=True,
        config_yaml=config_to_yaml(config),
        reporter=reporter,
    )
    return _brief(result)


def _resuming(run_dir: Path) -> bool:
    """True when a trainer's folder holds a training state to continue; otherwise start clean."""
    if (run_dir / STATE_NAME).is_file():
        return True
    _remove(run_dir)
    return False


def _train_vqgan(paths: DemoPaths, config: PipelineConfig, reporter: Reporter):
    from bladdergen.vqgan.train import train_vqgan

    resume = _resuming(paths.vqgan)
    result = train_vqgan(
        config.vqgan, paths.train, paths.vqgan, seed=config.seed, resume=resume, reporter=reporter
    )
    return _brief(result)


def _train_ldm(paths: DemoPaths, config: PipelineConfig, reporter: Reporter):
    from bladdergen.diffusion.train import train_ldm

    resume = _resuming(paths.ldm)
    result = train_ldm(
        config.ldm,
        paths.train,
        paths.ldm,
        paths.vqgan,
        seed=config.seed,
        resume=resume,
        reporter=reporter,
    )
    return _brief(result)


def _sample(paths: DemoPaths, config: PipelineConfig, plan: DemoPlan, reporter: Reporter):
    from bladdergen.diffusion.sample import sample_volumes

    result = sample_volumes(
        config, paths.ldm, paths.synthetic, plan.synthetic_volumes, reporter=reporter
    )
    return _brief(result)


def _train_deepatlas(
    paths: DemoPaths, config: PipelineConfig, reporter: Reporter, supervised_only: bool
):
    from bladdergen.deepatlas.pools import synthetic_pair_count
    from bladdergen.deepatlas.train import schedule_fits_baseline, train_deepatlas

    run_dir = paths.baseline if supervised_only else paths.deepatlas
    resume = _resuming(run_dir)
    # DeepAtlas's supervised pre-training repeats the baseline's first updates bit for bit (paired
    # by design), so it starts from the baseline's state there instead of training them again;
    # unless plausible synthetic CT + label pairs join its labeled cases or the schedule
    # validates elsewhere than the baseline did (then it trains its own pre-training)
    cfg, from_baseline = config.deepatlas, None
    if not supervised_only and schedule_fits_baseline(cfg) is None:
        pairs = cfg.synthetic_pairs and synthetic_pair_count(paths.synthetic) > 0
        from_baseline = None if pairs else paths.baseline
    result = train_deepatlas(
        config.deepatlas,
        paths.train,
        run_dir,
        seed=config.seed,
        synthetic_dir=None if supervised_only else paths.synthetic,
        supervised_only=supervised_only,
        from_baseline=from_baseline,
        resume=resume,
        reporter=reporter,
    )
    return _brief(result)


def _segment(paths: DemoPaths, config: PipelineConfig, reporter: Reporter):
    from bladdergen.deepatlas.segment import segment_paths

    results = {}
    for name, run_dir in (("baseline", paths.baseline), ("deepatlas", paths.deepatlas)):
        result = segment_paths(
            run_dir,
            paths.raw_test / "images",
            paths.predictions(name),
            device=config.deepatlas.device,
            overwrite=True,
            reporter=reporter,
        )
        results[name] = _brief(result)
    return results


def _evaluate(paths: DemoPaths, config: PipelineConfig, reporter: Reporter):
    from bladdergen.evaluate.anatomy import load_segmenter
    from bladdergen.evaluate.gen import evaluate_generation
    from bladdergen.evaluate.seg import evaluate_segmentation

    seg = evaluate_segmentation(
        [paths.predictions("baseline"), paths.predictions("deepatlas")],
        paths.raw_test / "labels",
        paths.evaluation / "seg",
        config.evaluate,
        seed=config.seed,
        reporter=reporter,
    )
    segmenter = load_segmenter(paths.deepatlas, config.deepatlas.device, config.preprocess.window)
    gen = evaluate_generation(
        paths.synthetic,
        paths.train,
        paths.evaluation / "gen",
        config.evaluate,
        segmenter=segmenter,
        seed=config.seed,
        reporter=reporter,
    )
    return {"seg": _brief(seg), "gen": _brief(gen)}


# ----------------------------------------------------------------------------------------------
# Summary


def _brief(result: Any) -> Any:
    """A JSON-safe copy of a stage result (paths as strings)."""
    return json.loads(json.dumps(result, default=str))


def _summary(paths: DemoPaths, seconds: dict[str, float], first: int) -> dict[str, Any]:
    return {
        "run_dir": str(paths.root),
        "skipped_stages": list(STAGES[:first]),
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
        "report": str(paths.root / "report.md"),
        "segmentation_report": str(paths.evaluation / "seg"),
        "generation_report": str(paths.evaluation / "gen"),
    }


def _report(paths: DemoPaths, summary: dict[str, Any]) -> str:
    lines = [
        "# bladdergen demo",
        "",
        f"Run folder: `{paths.root}`. Stage times (s; 0 = skipped, already done):",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {stage} | {summary['seconds'][stage]} |" for stage in STAGES]
    for name, folder in (("Segmentation", "seg"), ("Generated volumes", "gen")):
        reports = sorted((paths.evaluation / folder).glob("*.md"))
        lines += ["", f"## {name}", ""]
        for report in reports:
            text = report.read_text(encoding="utf-8")
            # Re-root the evaluation report's relative links at the run folder, and nest its
            # headings under this section's.
            text = text.replace("](", f"](evaluation/{folder}/")
            lines += [("##" + line) if line.startswith("#") else line for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def _stamp_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
