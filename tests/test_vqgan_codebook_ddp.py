"""Under DDP the EMA codebook (init, EMA statistics, dead-code restarts) stays identical on all ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bladdergen.vqgan.codebook import Codebook


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_codebook_on_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(100 + rank)  # every rank sees different encoder outputs
        codebook = Codebook(n_codes=16, dim=4, decay=0.9, restart_threshold=0.5)
        codebook.train()
        for _ in range(6):
            z_e = torch.randn(2, 4, 3, 3, 2) + rank  # (B, E, x, y, z), shifted per rank
            codebook(z_e)
        torch.save(
            {name: buffer.clone() for name, buffer in codebook.named_buffers()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_codebook_buffers_are_identical_on_both_ranks(tmp_path: Path):
    mp.spawn(_train_codebook_on_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert set(rank0) == {"embeddings", "cluster_size", "embed_sum", "initialized"}
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # The statistics really moved: the EMA counts are no longer the initial 1.0 everywhere.
    assert not torch.allclose(rank0["cluster_size"], torch.ones(16))
