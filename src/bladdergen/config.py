"""Validated configuration: YAML file -> one typed config object per stage.

Every stage keeps its own dataclass in its own package (``data/config.py``, ``vqgan/config.py``, ...).
Dataclass defaults are the ``paper`` profile (512x512x24 on one 24 GB GPU); each stage module also
exports ``TINY``, the fields that differ in the ``tiny`` profile (CPU, small volumes, minutes).

A run's configuration is resolved in this order, later wins:

1. the profile (``paper`` defaults, or those plus the stage modules' ``TINY`` overrides);
2. a YAML file given with ``--config`` (any subset of sections and keys; it may name ``profile``);
3. command-line overrides such as ``--max-steps`` (dotted keys, e.g. ``vqgan.max_steps``).

An unknown key or a value of the wrong type is a one-line :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from bladdergen.data.config import PHANTOM_TINY, PhantomConfig, PreprocessConfig
from bladdergen.data.config import TINY as PREPROCESS_TINY
from bladdergen.deepatlas.config import TINY as DEEPATLAS_TINY
from bladdergen.deepatlas.config import DeepAtlasConfig
from bladdergen.diffusion.config import LDM_TINY, SAMPLE_TINY, LDMConfig, SampleConfig
from bladdergen.errors import ConfigError
from bladdergen.evaluate.config import TINY as EVALUATE_TINY
from bladdergen.evaluate.config import EvaluateConfig
from bladdergen.fileio import atomic_write_text
from bladdergen.settings import (  # noqa: F401  (re-exported: the pipeline-level API)
    _dotted_to_nested,
    _merge,
    _type_name,
    from_mapping,
    read_yaml_mapping,
    to_mapping,
)
from bladdergen.vqgan.config import TINY as VQGAN_TINY
from bladdergen.vqgan.config import VQGANConfig

PROFILES = ("tiny", "paper")


@dataclasses.dataclass
class PipelineConfig:
    """All stages' settings; each command reads its own section and records the whole object."""

    profile: str = "paper"
    seed: int = 0
    phantom: PhantomConfig = dataclasses.field(default_factory=PhantomConfig)
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    vqgan: VQGANConfig = dataclasses.field(default_factory=VQGANConfig)
    ldm: LDMConfig = dataclasses.field(default_factory=LDMConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    deepatlas: DeepAtlasConfig = dataclasses.field(default_factory=DeepAtlasConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)


_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "phantom": PHANTOM_TINY,
    "preprocess": PREPROCESS_TINY,
    "vqgan": VQGAN_TINY,
    "ldm": LDM_TINY,
    "sample": SAMPLE_TINY,
    "deepatlas": DEEPATLAS_TINY,
    "evaluate": EVALUATE_TINY,
}


# ----------------------------------------------------------------------------------------------
# Profiles, files, overrides


def profile_mapping(profile: str) -> dict[str, Any]:
    """The full settings of a named profile as a plain dict."""
    if profile not in PROFILES:
        raise ConfigError(f"profile: got {profile!r}, expected one of {', '.join(PROFILES)}")
    mapping = to_mapping(PipelineConfig(profile=profile))
    if profile == "tiny":
        mapping = _merge(mapping, _TINY_OVERRIDES)
    return mapping


def load_config(
    profile: str | None = None,
    config_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> PipelineConfig:
    """Resolve profile + YAML file + dotted overrides (``None`` values are ignored) into a config.

    The profile is taken from the argument, else from the file's ``profile`` key, else ``paper``.
    ``defaults``: per profile, dotted settings a command puts over the profile's own (the file
    and the overrides still win), e.g. ``demo``'s shorter generator budgets.
    """
    file_data = read_yaml_mapping(config_path) if config_path is not None else {}
    chosen = profile or file_data.get("profile") or "paper"
    where = str(config_path) if config_path is not None else "config"
    mapping = profile_mapping(chosen)
    mapping = _merge(mapping, _dotted_to_nested((defaults or {}).get(chosen, {})))
    file_data = {k: v for k, v in file_data.items() if k != "profile"}
    mapping = _merge(mapping, file_data)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    mapping = _merge(mapping, _dotted_to_nested(given))
    mapping["profile"] = chosen
    return from_mapping(PipelineConfig, mapping, where)


def config_to_yaml(config: PipelineConfig) -> str:
    """The configuration as YAML text, readable back by :func:`load_config`."""
    return yaml.safe_dump(to_mapping(config), sort_keys=False, default_flow_style=None)


def write_config(config: PipelineConfig, directory: Path, name: str = "config.yaml") -> Path:
    """Write the resolved configuration next to an output (atomically); returns its path."""
    path = Path(directory) / name
    atomic_write_text(path, config_to_yaml(config))
    return path


def config_from_yaml_file(path: Path) -> PipelineConfig:
    """Load a resolved configuration written by :func:`write_config` (e.g. in a run folder)."""
    data = read_yaml_mapping(path)
    profile = data.get("profile", "paper")
    mapping = _merge(profile_mapping(profile), data)
    return from_mapping(PipelineConfig, mapping, str(path))


# ----------------------------------------------------------------------------------------------
# Configuration reference, generated from the dataclasses so the docs cannot drift


def _field_comments(cls: type) -> dict[str, str]:
    """Comments on a dataclass's field lines: trailing ``# ...`` or ``# ...`` lines just above."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    pattern = re.compile(r"^\s{4}(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = pattern.match(line)
        if match and not stripped.startswith(("def ", "return", "raise")):
            text = " ".join(pending + ([match.group(2)] if match.group(2) else []))
            comments.setdefault(match.group(1), text.strip())
        pending = []
    return comments


def _docstring_descriptions(cls: type) -> dict[str, str]:
    """``name``: description lines in a dataclass docstring."""
    import re

    found: dict[str, str] = {}
    for match in re.finditer(r"``(\w+)``:\s*(.+)", cls.__doc__ or ""):
        found[match.group(1)] = match.group(2).strip()
    return found


def config_reference_markdown() -> str:
    """Every configuration key with its type, ``paper`` and ``tiny`` values and description."""
    paper, tiny = profile_mapping("paper"), profile_mapping("tiny")
    hints = typing.get_type_hints(PipelineConfig)
    out = [
        "# Configuration reference",
        "",
        "Generated from the config classes by `bladdergen config reference`; do not edit by hand.",
        "Every key can be set in a YAML file passed with `--config` (any subset). Defaults are the",
        "`paper` profile; the `tiny` column shows where the `tiny` profile differs.",
        "",
        "| key | type | paper | tiny |",
        "|---|---|---|---|",
        f"| `profile` | {_type_name(hints['profile'])} | `paper` | `tiny` |",
        f"| `seed` | int | `{paper['seed']}` | `{tiny['seed']}` |",
    ]
    for section in dataclasses.fields(PipelineConfig):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        descriptions = {**_field_comments(cls), **_docstring_descriptions(cls)}
        out += ["", f"## `{section.name}`", ""]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        if summary:
            out += [summary, ""]
        out += ["| key | type | paper | tiny | description |", "|---|---|---|---|---|"]
        field_hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            p = paper[section.name][item.name]
            t = tiny[section.name][item.name]
            tiny_cell = "" if t == p else f"`{_yaml_inline(t)}`"
            description = descriptions.get(item.name, "").replace("|", "\\|")
            type_cell = _type_name(field_hints[item.name]).replace("|", "\\|")
            out.append(
                f"| `{section.name}.{item.name}` | {type_cell} | `{_yaml_inline(p)}` | "
                f"{tiny_cell} | {description} |"
            )
    return "\n".join(out) + "\n"


def _yaml_inline(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000)
        .strip()
        .removesuffix("...")
        .strip()
    )
