"""train-vqgan under torchrun: 2 gloo processes on CPU train two steps and write one checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from bladdergen.checkpoint import load_training_state
from bladdergen.vqgan.load import load_vqgan

CONFIG = """
vqgan:
  n_hiddens: 4
  n_codes: 32
  num_groups: 4
  disc_channels: 4
  disc_layers: 2
  disc_start: 1
  batch_size: 1
  max_steps: 2
  log_every: 1
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_train_and_write_one_consistent_checkpoint(tiny_dataset, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(CONFIG)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "bladdergen",
        "train-vqgan",
        str(tiny_dataset),
        str(run),
        "-p",
        "tiny",
        "-c",
        str(config),
        "--device",
        "cpu",
        "-q",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    model, metadata = load_vqgan(run)
    assert metadata["step"] == 2
    state = load_training_state(run / "training_state.pt")
    assert len(state["rng"]) == 2  # one RNG state per rank, for an exact DDP resume
    # rank 0 saved the codebook; the buffers in the state match the safetensors ones
    assert torch.equal(state["model"]["codebook.embeddings"], model.codebook.embeddings)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # only rank 0 logs
