"""Process group, device mesh and rank discipline.

nccl on CUDA, gloo on CPU, chosen automatically. Without torchrun the process becomes a world of
one (a private TCP store on a free port), so ``python benchmark.py`` works as is.

The mesh is ("dp", "tp") with tp innermost: rank r sits at (r // tp, r % tp), so TP groups are
rows of consecutive ranks and DP groups are columns, as in the seed's picture.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

ABORT_KEY = "tp_bench/abort"
ACK_KEY = "tp_bench/abort_ack"


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

    def mesh(self, dp_size: int, tp_size: int):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (dp_size, tp_size), mesh_dim_names=("dp", "tp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup(timeout_s: float = 1800.0) -> DistContext:
    """Initialize (or reuse) the default process group and pick this rank's device."""
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
    if dist.is_initialized():
        dist.destroy_process_group()


def rank0_print(*args, file=None, **kwargs) -> None:
    if (dist.get_rank() if dist.is_initialized() else env_rank()) == 0:
        print(*args, file=file or sys.stdout, flush=True, **kwargs)


class FailureGuard:
    """Makes one rank's failure every rank's clean exit, with one message and no hang.

    A rank that raises publishes a one-line reason in the process group's store (first writer
    wins, so eight identical OOMs print once). A watcher thread on every rank polls that key:
    rank 0 runs ``on_abort`` (keeping the results measured so far), prints the reason once and
    acknowledges; then every rank leaves with exit code 1. Ranks blocked inside a collective are
    never woken by Python code, which is why the exit is ``os._exit`` from the watcher thread.
    """

    def __init__(self, ctx: DistContext, on_abort: Callable[[str], None],
                 poll_s: float = 0.5, ack_timeout_s: float = 30.0):
        self.ctx = ctx
        self.on_abort = on_abort
        self.poll_s = poll_s
        self.ack_timeout_s = ack_timeout_s
        self._store = dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self._lock = threading.Lock()   # one handler per process: main thread or watcher
        self._handled = False
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "FailureGuard":
        self._thread = threading.Thread(target=self._watch, name="tp_bench-failure-watch",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # never leave it inside a store call at process-group teardown
        if exc is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return False
        self.fail(f"{type(exc).__name__}: {exc}".splitlines()[0], exc)
        return True  # not reached: fail() exits

    def fail(self, reason: str, exc: BaseException | None = None) -> None:
        """Called on the rank that failed: publish, let rank 0 keep results, exit."""
        message = f"rank {self.ctx.rank}: {reason}"
        if os.environ.get("TP_BENCH_DEBUG") and exc is not None:
            import traceback

            traceback.print_exception(exc)
        self._store.compare_set(ABORT_KEY, "", message)
        self._handle()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self._store.check([ABORT_KEY]):
                    self._handle()
            except Exception:  # the store went away: the launcher is tearing down anyway
                return

    def _handle(self) -> None:
        with self._lock:
            if self._handled:
                return
            self._handled = True
        message = self._store.get(ABORT_KEY).decode()
        if self.ctx.is_rank0:
            try:
                self.on_abort(message)
            except Exception as exc:  # noqa: BLE001 - the exit below must happen regardless
                print(f"tp_bench: error: could not save the results: {type(exc).__name__}: "
                      f"{exc}", file=sys.stderr, flush=True)
            print(f"tp_bench: error: {message}", file=sys.stderr, flush=True)
            self._store.set(ACK_KEY, "1")
        else:
            # Wait for rank 0 to save the results before the launcher starts killing workers.
            deadline = time.monotonic() + self.ack_timeout_s
            while time.monotonic() < deadline:
                try:
                    if self._store.check([ACK_KEY]):
                        break
                except Exception:
                    break
                time.sleep(0.1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
