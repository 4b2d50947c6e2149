"""safetensors checkpoints with metadata, run-folder resolution, training state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bladdergen.checkpoint import (
    load_state_dict_strict,
    load_training_state,
    load_weights,
    resolve_weights,
    rng_state,
    save_training_state,
    save_weights,
    set_rng_state,
)
from bladdergen.errors import CheckpointError


def test_weights_and_metadata_round_trip(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_weights(path, weights, {"kind": "vqgan", "step": 12, "config": {"seed": 1}})
    tensors, metadata = load_weights(path, expected_kind="vqgan")
    assert torch.equal(tensors["w"], weights["w"])
    assert metadata == {"kind": "vqgan", "step": 12, "config": {"seed": 1}}


def test_checkpoint_of_another_stage_is_refused(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    save_weights(path, {"w": torch.zeros(1)}, {"kind": "ldm"})
    with pytest.raises(CheckpointError, match="is a 'ldm' model, expected 'vqgan'"):
        load_weights(path, expected_kind="vqgan")


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(path)


def test_shape_mismatch_is_a_checkpoint_error(tmp_path: Path):
    module = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="does not match the configured model"):
        load_state_dict_strict(
            module, {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, tmp_path
        )


def test_run_folder_resolves_to_best_only_when_asked(tmp_path: Path):
    for name in ("model.safetensors", "best.safetensors"):
        save_weights(tmp_path / name, {"w": torch.zeros(1)}, {"kind": "seg"})
    assert resolve_weights(tmp_path).name == "model.safetensors"
    assert resolve_weights(tmp_path, prefer_best=True).name == "best.safetensors"


def test_empty_run_folder_is_an_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        resolve_weights(tmp_path)


def test_rng_state_restores_every_generator(tmp_path: Path):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    save_training_state(tmp_path / "state.pt", {"rng": rng_state(), "step": 5})
    expected = (torch.rand(3), random.random(), np.random.rand())
    state = load_training_state(tmp_path / "state.pt")
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert state["step"] == 5


def test_missing_training_state_is_a_checkpoint_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no training state to resume from"):
        load_training_state(tmp_path / "training_state.pt")
