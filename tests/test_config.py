"""The configuration system: profiles, YAML files, overrides, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bladdergen.config import (
    config_from_yaml_file,
    config_to_yaml,
    load_config,
    write_config,
)
from bladdergen.errors import ConfigError


def test_paper_profile_is_512_by_512_by_24():
    config = load_config("paper")
    assert config.preprocess.target_size == (512, 512)
    assert config.preprocess.target_depth == 24


def test_tiny_profile_overrides_only_what_it_names():
    tiny, paper = load_config("tiny"), load_config("paper")
    assert tiny.preprocess.target_size == (64, 64)
    assert tiny.preprocess.window == paper.preprocess.window


def test_yaml_file_overrides_profile_and_dotted_overrides_win(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("profile: tiny\nseed: 7\npreprocess:\n  target_depth: 16\n")
    config = load_config(None, path, overrides={"preprocess.target_depth": 20, "seed": None})
    assert config.profile == "tiny"
    assert config.seed == 7  # a None override means "flag not given"
    assert config.preprocess.target_depth == 20


def test_command_defaults_sit_over_their_profile_and_under_the_file(tmp_path: Path):
    defaults = {"tiny": {"vqgan.max_steps": 300, "ldm.max_steps": 600}}
    tiny = load_config("tiny", defaults=defaults)
    assert (tiny.vqgan.max_steps, tiny.ldm.max_steps) == (300, 600)
    assert load_config("paper", defaults=defaults).vqgan.max_steps == 100_000  # other profile
    path = tmp_path / "run.yaml"
    path.write_text("vqgan:\n  max_steps: 350\n")
    from_file = load_config("tiny", path, overrides={"ldm.max_steps": 700}, defaults=defaults)
    assert (from_file.vqgan.max_steps, from_file.ldm.max_steps) == (350, 700)


def test_unknown_key_is_an_error_naming_the_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("preprocess:\n  target_dept: 16\n")
    with pytest.raises(ConfigError, match=r"preprocess\.target_dept: unknown key"):
        load_config("paper", path)


def test_wrong_type_is_an_error_naming_the_key_and_value(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("preprocess:\n  window: [-200, high]\n")
    with pytest.raises(ConfigError, match=r"preprocess\.window.*'high'"):
        load_config("paper", path)


def test_boolean_is_not_accepted_as_integer():
    with pytest.raises(ConfigError, match=r"preprocess\.target_depth.*expected an integer"):
        load_config("paper", overrides={"preprocess.target_depth": True})


def test_stage_validation_rejects_inverted_window():
    with pytest.raises(ConfigError, match=r"preprocess\.window"):
        load_config("paper", overrides={"preprocess.window": [300.0, -200.0]})


def test_plausible_range_coverage_is_a_probability_or_null():
    with pytest.raises(ConfigError, match=r"evaluate\.plausible_range_coverage: got 1\.0"):
        load_config("paper", overrides={"evaluate.plausible_range_coverage": 1.0})
    assert load_config("paper", overrides={"evaluate.plausible_range_coverage": None})


def test_unknown_profile_is_an_error():
    with pytest.raises(ConfigError, match="profile: got 'huge'"):
        load_config("huge")


def test_file_that_is_not_a_mapping_is_an_error(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config("paper", path)


def test_written_config_reads_back_identically(tmp_path: Path):
    config = load_config("tiny", overrides={"seed": 3, "preprocess.window": [-100.0, 200.0]})
    path = write_config(config, tmp_path)
    assert config_from_yaml_file(path) == config
    assert config_to_yaml(config_from_yaml_file(path)) == config_to_yaml(config)


def test_configuration_reference_in_docs_is_generated_from_the_config_classes():
    from bladdergen.config import config_reference_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert docs.read_text(encoding="utf-8") == config_reference_markdown(), (
        "docs/configuration.md is stale: run `bladdergen config reference -o docs/configuration.md`"
    )
