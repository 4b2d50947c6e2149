"""Where training runs: device choice, seeding, mixed precision, and PyTorch DDP under torchrun.

Every trainer calls :func:`start_runtime` once. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) it initialises ``torch.distributed`` — NCCL on CUDA, gloo on CPU — and each rank gets
its own device; otherwise it is a single process and the collective helpers are no-ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from bladdergen.errors import InputError


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The process's place in a (possibly distributed) run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process logs, writes checkpoints and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when available, else ``cpu``; other names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device: got {name!r}, expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device: got {name!r}, but no CUDA GPU is available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def start_runtime(device_name: str = "auto") -> Runtime:
    """Set up the device and, under torchrun, the process group (idempotent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def stop_runtime() -> None:
    """Tear down the process group if one was started.

    After a run that ended normally every rank first waits for the others: a rank that exits
    while a peer is still in its last collective closes the gloo socket under it, and the peer
    aborts (SIGABRT, seen now and then in the two-process tests). Called from ``finally`` while
    an exception propagates, it skips the wait, since the failed rank's peers may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 gave NaNs upstream); full precision on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process); returns ``tensor``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op in a single process); returns ``tensor``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from rank ``src`` (no-op in a single process); returns ``tensor``."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first(runtime: Runtime) -> Iterator[None]:
    """Let rank 0 do a one-off job (e.g. caching latents) before the other ranks read its output."""
    if not runtime.is_main:
        barrier()
    yield
    if runtime.is_main:
        barrier()
