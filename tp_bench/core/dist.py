"""The process group: this process's rank, device and backend.

nccl on CUDA, gloo on CPU, chosen automatically. Without torchrun the process becomes a world of
one (a private TCP store on a free port), so ``python benchmark.py`` works as is. The mesh over
the group is core.dims's.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from tp_bench.core.dims import forget_meshes

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def _group() -> Any:
    """torch.distributed when a process group exists, else None (torch is not imported here:
    the command line's analysis commands never need it)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def setup(timeout_s: float = 1800.0) -> DistContext:
    """Initialize (or reuse) the default process group and pick this rank's device."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        # DeepSpeed picks its accelerator at import time; tell it before anything imports it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, device=device, backend=backend)


def teardown() -> None:
    dist = _group()
    if dist is not None:
        forget_meshes()
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a process that has had a process group, with ``code``: flush, then ``os._exit``.
    gloo's worker threads can still hold tensors at interpreter shutdown and abort a process
    whose work succeeded ("terminate called without an active exception",
    pytorch/pytorch#190489)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank0_print(*args, file=None, **kwargs) -> None:
    dist = _group()
    if (dist.get_rank() if dist is not None else env_rank()) == 0:
        print(*args, file=file or sys.stdout, flush=True, **kwargs)


def from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (a collective; for set-up decisions, not the hot path)."""
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(value: T) -> list[T]:
    """Every rank's ``value``, by rank (a collective; for set-up, not the hot path)."""
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
