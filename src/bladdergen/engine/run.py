"""One run folder, the same in every trainer: open or resume, log, checkpoint, DDP.

Layout of ``RUN_DIR`` (every ``train-*`` command)::

    run.json             which stage's run this is (kind), written when the run starts
    config.yaml          the stage's resolved settings and the seed (loadable with --config)
    metrics.jsonl        one JSON record per logged step, and one per validation
    curves.png           the training curves, rewritten at every checkpoint
    training_state.pt    everything --resume needs: weights, optimisers, step, every rank's RNG
    model.safetensors    the latest weights with JSON metadata (what other commands load)
    best.safetensors     best weights by validation, where the stage validates

plus the stage's own entries (``images/`` previews, ``latents/`` cache, ``prepared/`` pools...).

A trainer keeps one readable loop over this object::

    RUN_KIND = RunKind("vqgan", resumable={"max_steps", ...}, entries={"images"})
    run = RunFolder.open(run_dir, RUN_KIND, cfg, runtime, seed=seed, resume=resume)
    ...build models and optimisers...
    run.restore(model=model, optimizer=optimizer)          # no-op for a new run
    for step in run.steps(cfg.max_steps, log_every=cfg.log_every):
        terms = one_update(step)                            # floats
        done = run.end_step(step, terms)                    # finite check, log, progress
        if run.due(done, cfg.checkpoint_every):
            run.save(done, {"model": model, "optimizer": optimizer}, write_weights)

Resume is exact: per-step randomness in the trainers comes from (seed, step), and the RNG state of
every rank is saved with the checkpoint, so a run killed between checkpoints and resumed gives the
same weights as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bladdergen import __version__
from bladdergen import checkpoint as ckpt
from bladdergen.errors import CheckpointError, InputError
from bladdergen.fileio import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    json_safe,
    truncate_jsonl_after_step,
)
from bladdergen.progress import SILENT, Reporter, Task
from bladdergen.runtime import Runtime, all_reduce_sum_, barrier
from bladdergen.settings import read_yaml_mapping, to_mapping, write_yaml

RUN_NAME = "run.json"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
# What every run folder may hold besides a stage's own entries.
RUN_ENTRIES = frozenset(
    {
        RUN_NAME,
        CONFIG_NAME,
        METRICS_NAME,
        CURVES_NAME,
        ckpt.STATE_NAME,
        ckpt.WEIGHTS_NAME,
        ckpt.BEST_WEIGHTS_NAME,
    }
)
# Names the train-* commands use for their kinds of run.
COMMANDS = {"vqgan": "train-vqgan", "ldm": "train-ldm", "deepatlas": "train-deepatlas"}


@dataclasses.dataclass(frozen=True)
class RunKind:
    """What a stage's run folder is: ``name`` (``vqgan``, ``ldm``, ``deepatlas``; also the config
    section), the ``resumable`` settings (may change on ``--resume``: they do not change what is
    learned) and the stage's own ``entries`` in RUN_DIR besides the common ones."""

    name: str
    resumable: frozenset[str]
    entries: frozenset[str] = frozenset()

    def __init__(self, name: str, resumable: Iterable[str], entries: Iterable[str] = ()) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "resumable", frozenset(resumable))
        object.__setattr__(self, "entries", frozenset(entries))


def scheduled_learning_rate(schedule: str, lr: float, step: int, max_steps: int) -> float:
    """The rate at 0-based ``step``: ``constant`` keeps ``lr``; ``cosine`` decays from ``lr`` at
    step 0 to ``lr / 10`` at the last of ``max_steps`` steps, a steadier final model on short
    runs than a constant rate, without stopping learning early."""
    if schedule == "constant" or max_steps <= 1:
        return lr
    progress = min(step / (max_steps - 1), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class TrainingDiverged(InputError):
    """A loss became NaN or infinite; the run stopped and its last good checkpoint is kept."""


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def no_sync(module: torch.nn.Module, active: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (skip the gradient all-reduce while accumulating) when ``active``."""
    if active and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


@dataclasses.dataclass
class RunFolder:
    """A training run's folder, opened new or resumed; see the module docstring.

    ``step`` is where training starts (0, or the resumed checkpoint's step); ``state`` the loaded
    training state of a resumed run (None for a new one); ``reporter`` shows progress on rank 0
    only.
    """

    path: Path
    kind: str
    runtime: Runtime
    facts: dict[str, Any]
    reporter: Reporter
    step: int = 0
    state: dict[str, Any] | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    last_saved: int | None = None
    _total: int = 0
    _log_every: int = 1
    _show: tuple[str, ...] = ()
    _task: Task | None = None
    _window: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    last_logged: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------------------------------
    # Opening

    @classmethod
    def open(
        cls,
        path: Path,
        stage: RunKind,
        settings: Any,
        runtime: Runtime,
        *,
        seed: int,
        resume: bool,
        reporter: Reporter = SILENT,
        facts: dict[str, Any] | None = None,
    ) -> RunFolder:
        """Open ``path`` for a new run of ``stage``, or for ``resume``.

        ``settings``: the stage's config dataclass (section ``stage.name`` of config.yaml); on
        resume every key outside ``stage.resumable`` and the seed must equal the recorded run's.
        ``facts``: other things a resume must match (e.g. the frozen VQ-GAN's hash, the training
        images), JSON-able, named for a person ("the frozen VQ-GAN (weights sha256)").

        Raises InputError for a run folder that is a file, holds another stage's run, an earlier
        run of this stage (without ``resume``) or unrelated files; CheckpointError when there is
        nothing to resume or a setting or fact differs from the recorded run's.
        """
        kind = stage.name
        path = Path(path)
        facts = json.loads(json.dumps(facts or {}))  # plain JSON values, comparable after a load
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: RUN_DIR is a file, expected a folder for the run")
        mapping = {"seed": seed, kind: to_mapping(settings)}
        if resume:
            state = _load_resumable(path, kind, mapping, set(stage.resumable), facts)
            run = cls(path, kind, runtime, facts, reporter if runtime.is_main else SILENT)
            run.step, run.state = int(state["step"]), state
            if runtime.is_main:
                truncate_jsonl_after_step(path / METRICS_NAME, run.step)
                write_yaml(mapping, path / CONFIG_NAME)  # only resumable keys can have changed
                run.reporter.notice(f"resuming {path} from step {run.step}")
            return run
        _check_new_run_folder(path, kind, RUN_ENTRIES | stage.entries)
        run = cls(path, kind, runtime, facts, reporter if runtime.is_main else SILENT)
        if runtime.is_main:
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path / RUN_NAME, {"kind": kind, "bladdergen": __version__})
            write_yaml(mapping, path / CONFIG_NAME)
            atomic_write_text(path / METRICS_NAME, "")  # a start before any checkpoint: anew
        barrier()
        return run

    def restore(self, **stateful: Any) -> None:
        """Load ``name -> module/optimiser`` state dicts from a resumed state, and this rank's
        RNG state; does nothing for a new run. CheckpointError when a state does not fit."""
        if self.state is None:
            return
        where = self.path / ckpt.STATE_NAME
        for name, target in stateful.items():
            if target is None:
                continue
            if name not in self.state:
                raise CheckpointError(f"{where}: training state lacks {name!r}; cannot resume")
            try:
                target.load_state_dict(self.state[name])
            except (RuntimeError, KeyError, ValueError) as error:
                detail = " ".join(str(error).strip().splitlines()[:2])[:240]
                raise CheckpointError(
                    f"{where}: {name} does not match the configured model ({detail})"
                ) from None
        states = self.state["rng"]
        ckpt.set_rng_state(
            states[self.runtime.rank] if self.runtime.rank < len(states) else states[0]
        )

    # ------------------------------------------------------------------------------------------
    # The loop

    def steps(
        self,
        total: int,
        *,
        log_every: int,
        description: str | None = None,
        show: Iterable[str] = (),
    ) -> Iterator[int]:
        """Step indices ``self.step .. total-1`` (0-based) with a progress task around them.

        Each step must be closed by :meth:`end_step` (or passed over by :meth:`skip_to`): the
        next index is the step count they leave."""
        self._total, self._log_every, self._show = total, max(1, log_every), tuple(show)
        description = description or COMMANDS.get(self.kind, self.kind)
        self._task = self.reporter.task(description, total=total, completed=min(self.step, total))
        try:
            while self.step < total:
                step = self.step
                yield step
                if self.step <= step:
                    raise RuntimeError(f"step {step} was neither ended nor skipped")
        finally:
            self._task.close()

    def skip_to(self, done: int) -> int:
        """Count the steps up to ``done`` as done without running them (their result was taken
        from another run); advances the progress, logs nothing. Returns ``done``."""
        if done <= self.step or done > self._total:
            raise ValueError(f"cannot skip from step {self.step} to {done} of {self._total}")
        if self._task is not None:
            self._task.advance(done - self.step)
        self.step = done
        self._window = {}
        return done

    def end_step(self, step: int, terms: dict[str, float], phase: str | None = None) -> int:
        """Close 0-based step ``step``: stop on a non-finite term, log the window's mean terms
        (over all ranks) every ``log_every`` steps and at the end, advance the progress.

        Returns the number of steps done (``step + 1``). Raises TrainingDiverged.
        """
        done = step + 1
        self.step = done
        bad = [k for k, v in terms.items() if not math.isfinite(float(v))]
        # on the run's device: NCCL all-reduces CUDA tensors only
        flag = all_reduce_sum_(torch.tensor([float(bool(bad))], device=self.runtime.device))
        if float(flag[0]) > 0:
            shown = ", ".join(f"{k}={terms[k]}" for k in bad) or "on another rank"
            kept = (
                f"the last good checkpoint (step {self.last_saved or self._resumed_step()}) is kept"
                if (self.last_saved or self._resumed_step())
                else "no checkpoint had been written yet"
            )
            raise TrainingDiverged(
                f"{self.path}: training became non-finite at step {done} ({shown}); stopped, "
                f"{kept}. Lower the learning rate or check the data for NaN voxels"
            )
        for key, value in terms.items():
            self._window.setdefault(key, []).append(float(value))
        if done % self._log_every == 0 or done == self._total:
            record = self._window_means()
            self._window = {}
            if phase is not None:
                record["phase"] = phase
            self.log(done, record)
        fields = {k: terms[k] for k in self._show if k in terms}
        if self._task is not None:
            self._task.advance(1, **fields)
        return done

    def due(self, done: int, every: int) -> bool:
        """True every ``every`` steps and at the last step."""
        return done % every == 0 or done == self._total

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Append ``{"step": step, **record, "seconds": ...}`` to metrics.jsonl (rank 0)."""
        record = {"step": step, **json_safe(record)}
        record["seconds"] = round(time.perf_counter() - self.started, 3)
        self.last_logged = record
        if self.runtime.is_main:
            append_jsonl(self.path / METRICS_NAME, record)

    def log_validation(self, step: int, record: dict[str, Any]) -> None:
        """A validation record (``phase: validation``), marked as such in curves.png."""
        self.log(step, {"phase": "validation", **record})

    def _window_means(self) -> dict[str, float]:
        """Each term's mean over the window's steps and over all ranks. A term may be missing on
        some ranks (e.g. a loss only defined on labeled batches), so the ranks first agree on the
        names, then sum values and counts."""
        keys = sorted(self._window)
        if self.runtime.distributed:
            gathered: list[Any] = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, keys)
            keys = sorted({k for rank_keys in gathered for k in rank_keys})
        # float64 for the sums; on the run's device, as NCCL all-reduces CUDA tensors only
        where = {"dtype": torch.float64, "device": self.runtime.device}
        sums = torch.tensor([float(sum(self._window.get(k, []))) for k in keys], **where)
        counts = torch.tensor([float(len(self._window.get(k, []))) for k in keys], **where)
        if self.runtime.distributed and keys:
            all_reduce_sum_(sums)
            all_reduce_sum_(counts)
        return {k: float(s / c) for k, s, c in zip(keys, sums, counts, strict=True) if c > 0}

    def _resumed_step(self) -> int:
        return int(self.state["step"]) if self.state is not None else 0

    # ------------------------------------------------------------------------------------------
    # Checkpoints and DDP

    def save(
        self,
        step: int,
        stateful: dict[str, Any],
        write_weights: Callable[[], None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint at ``step`` (call on every rank): gather every rank's RNG state, then rank 0
        writes training_state.pt (state dicts of ``stateful``, ``extra`` values), the weights
        (``write_weights``) and curves.png. The state goes first: resume reads only it."""
        rngs = [ckpt.rng_state()]
        if self.runtime.distributed:
            gathered: list[Any] = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.runtime.is_main:
            state = {name: unwrap(m).state_dict() for name, m in stateful.items() if m is not None}
            state |= {"kind": self.kind, "step": step, "facts": self.facts, "rng": rngs}
            state |= extra or {}
            ckpt.save_training_state(self.path / ckpt.STATE_NAME, state)
            if write_weights is not None:
                write_weights()
            self.write_curves()
        self.last_saved = step
        barrier()

    def write_curves(self) -> None:
        """Redraw curves.png from metrics.jsonl (rank 0)."""
        if not self.runtime.is_main:
            return
        from bladdergen.engine.curves import write_curves

        write_curves(self.path / METRICS_NAME, self.path / CURVES_NAME, COMMANDS.get(self.kind))

    def wrap(self, module: torch.nn.Module, **ddp_options: Any) -> torch.nn.Module:
        """``module`` in DistributedDataParallel under torchrun, else unchanged."""
        if not self.runtime.distributed:
            return module
        device = self.runtime.device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, **ddp_options)

    def summary(self, **stage_facts: Any) -> dict[str, Any]:
        """The result every trainer returns: run folder, steps, weights, curves, seconds, plus
        the stage's own facts (non-finite floats become None so the result is valid JSON)."""
        best = self.path / ckpt.BEST_WEIGHTS_NAME
        return json_safe(
            {
                "run_dir": str(self.path),
                "kind": self.kind,
                "start_step": self._resumed_step(),
                "steps": self.step,
                "weights": str(self.path / ckpt.WEIGHTS_NAME),
                "best": str(best) if best.is_file() else None,
                "metrics": str(self.path / METRICS_NAME),
                "curves": str(self.path / CURVES_NAME),
                "seconds": round(time.perf_counter() - self.started, 2),
                **stage_facts,
            }
        )


# ----------------------------------------------------------------------------------------------
# Checks when a run folder is opened


def _recorded_kind(path: Path) -> str | None:
    """The stage of the run in ``path``: run.json, else the weights' metadata (older runs)."""
    try:
        return json.loads((path / RUN_NAME).read_text(encoding="utf-8"))["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for name in (ckpt.WEIGHTS_NAME, ckpt.BEST_WEIGHTS_NAME):
        if (path / name).is_file():
            try:
                return ckpt.read_metadata(path / name).get("kind")
            except (CheckpointError, ValueError, AttributeError):
                return None
    return None


def _check_new_run_folder(path: Path, kind: str, allowed: set[str]) -> None:
    if not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    recorded = _recorded_kind(path)
    if recorded is not None and recorded != kind:
        raise InputError(
            f"{path}: holds a {COMMANDS.get(recorded, recorded)} run, not a "
            f"{COMMANDS.get(kind, kind)} run; choose a new RUN_DIR"
        )
    has_checkpoint = {ckpt.STATE_NAME, ckpt.WEIGHTS_NAME, ckpt.BEST_WEIGHTS_NAME} & set(entries)
    if has_checkpoint:
        raise InputError(
            f"{path}: already holds a {COMMANDS.get(kind, kind)} run; pass --resume to continue "
            "it or choose a new RUN_DIR"
        )
    unrelated = [name for name in entries if name not in allowed]
    if unrelated:
        shown = ", ".join(unrelated[:3]) + (", ..." if len(unrelated) > 3 else "")
        raise InputError(
            f"{path}: holds files that are not part of a {COMMANDS.get(kind, kind)} run "
            f"({shown}); choose an empty or new RUN_DIR"
        )


def _load_resumable(
    path: Path, kind: str, mapping: dict[str, Any], resumable: set[str], facts: dict[str, Any]
) -> dict[str, Any]:
    state_path = path / ckpt.STATE_NAME
    if not state_path.is_file():
        raise CheckpointError(
            f"{path}: nothing to resume ({ckpt.STATE_NAME} not found: no checkpoint was written); "
            "run without --resume to start a new run"
        )
    recorded_kind = _recorded_kind(path)
    if recorded_kind is not None and recorded_kind != kind:
        raise CheckpointError(
            f"{path}: holds a {COMMANDS.get(recorded_kind, recorded_kind)} run, cannot resume it "
            f"with {COMMANDS.get(kind, kind)}"
        )
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; cannot check the run before resuming")
    recorded = read_yaml_mapping(config_path)
    if recorded.get("seed") != mapping["seed"]:
        raise CheckpointError(
            f"{config_path}: cannot resume, seed is {mapping['seed']!r} but the run used "
            f"{recorded.get('seed')!r}"
        )
    old, new = recorded.get(kind), mapping[kind]
    if not isinstance(old, dict):
        raise CheckpointError(f"{config_path}: has no {kind} section; cannot check the run")
    for key, value in new.items():
        if key not in resumable and old.get(key) != value:
            raise CheckpointError(
                f"{config_path}: cannot resume, {kind}.{key} is {value!r} but the run used "
                f"{old.get(key)!r} (only {', '.join(sorted(resumable))} may change)"
            )
    state = ckpt.load_training_state(state_path)
    if state.get("kind", kind) != kind:
        raise CheckpointError(f"{state_path}: a {state.get('kind')!r} state, expected {kind!r}")
    recorded_facts = state.get("facts", {})
    for key, value in facts.items():
        if recorded_facts.get(key) != value:
            raise CheckpointError(
                f"{path}: cannot resume, {key} differs from the run's "
                f"({_brief(value)} now, {_brief(recorded_facts.get(key))} in the run)"
            )
    return state


def _brief(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
