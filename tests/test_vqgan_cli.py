"""train-vqgan / reconstruct command shells: help text and exit code 2 with one line on bad input."""

from __future__ import annotations

from typer.testing import CliRunner

from bladdergen.cli import app


def test_train_vqgan_on_a_folder_that_is_not_a_preprocessed_set_exits_2(tmp_path):
    result = CliRunner().invoke(
        app, ["train-vqgan", str(tmp_path / "nothing"), str(tmp_path / "run"), "-p", "tiny"]
    )
    assert result.exit_code == 2
    assert "not a preprocessed set" in result.output


def test_reconstruct_with_a_folder_without_weights_exits_2(tmp_path, tiny_dataset):
    result = CliRunner().invoke(app, ["reconstruct", str(tmp_path), str(tiny_dataset)])
    assert result.exit_code == 2
    assert "model.safetensors" in result.output


def test_bad_config_value_exits_2_naming_the_key(tmp_path, tiny_dataset):
    config = tmp_path / "bad.yaml"
    config.write_text("vqgan:\n  downsample: [3, 4, 2]\n")
    result = CliRunner().invoke(
        app, ["train-vqgan", str(tiny_dataset), str(tmp_path / "run"), "-c", str(config)]
    )
    assert result.exit_code == 2
    assert "vqgan.downsample" in result.output


def test_both_commands_have_help():
    for command in ("train-vqgan", "reconstruct"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--json" in result.output
