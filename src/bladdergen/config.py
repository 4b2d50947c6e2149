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
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

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
# Generic dataclass <-> mapping conversion with type checking


def to_mapping(config: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_type_name(args[0])}"
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the dataclass's own form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
        return from_mapping(tp, value, where)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
            items = [
                _coerce(v, a, f"{where}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item_type = args[0] if args else Any
            items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
        return {
            _coerce(k, key_type, f"{where}.{k}"): _coerce(v, value_type, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: got {value!r}, expected null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected a string")
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def from_mapping(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected one of {', '.join(names)}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()  # stage-specific range checks raise ConfigError themselves
    return instance


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


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


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML config file; a missing, unreadable or non-mapping file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{path}: not a readable YAML file ({first_line})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    profile: str | None = None,
    config_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Resolve profile + YAML file + dotted overrides (``None`` values are ignored) into a config.

    The profile is taken from the argument, else from the file's ``profile`` key, else ``paper``.
    """
    file_data = read_yaml_mapping(config_path) if config_path is not None else {}
    chosen = profile or file_data.get("profile") or "paper"
    where = str(config_path) if config_path is not None else "config"
    mapping = profile_mapping(chosen)
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
