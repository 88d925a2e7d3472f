"""Phase timing, memory, throughput and MFU.

Timing modes (``--timing``):
  events  CUDA events recorded on the current stream at phase boundaries; nothing waits for
          them until the runner reads a whole log interval at once, so the step is undisturbed.
  sync    ``torch.cuda.synchronize()`` and a host clock at every boundary: simple, and it costs
          a few percent on a GPU (the host stops queueing work while the device drains).
  none    no phase times; step time is the log interval's wall time (synchronized at its ends)
          divided by its steps.
On CPU, kernels run on the calling thread, so "events" and "sync" both read the host clock.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch

GB = 1024**3

# Dense bf16 peak TFLOP/s per GPU (no sparsity), matched in order against the device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),       # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


def peak_tflops_for(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """The GPU's dense bf16 peak, ``override`` if given, None when unknown (and on CPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


Stamp = Union[float, "torch.cuda.Event"]


class PhaseTimer:
    """Collects (phase, stamp) pairs for one step; ``resolve`` turns them into seconds later."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.use_events = mode == "events" and device.type == "cuda"
        self.sync = mode == "sync" and device.type == "cuda"
        self._stamps: list[tuple[str, Stamp]] = []

    def _stamp(self) -> Stamp:
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._stamps = [("start", self._stamp())] if self.mode != "none" else []

    def mark(self, phase: str) -> None:
        """End of ``phase`` ("forward", "backward" or "optimizer")."""
        if self.mode != "none":
            self._stamps.append((phase, self._stamp()))

    def finish(self) -> list[tuple[str, Stamp]]:
        stamps, self._stamps = self._stamps, []
        return stamps


def _elapsed_s(a: Stamp, b: Stamp) -> float:
    if isinstance(a, float):
        return b - a
    return a.elapsed_time(b) / 1000.0


def resolve_phases(stamps: list[tuple[str, Stamp]],
                   previous_end: Optional[Stamp]) -> tuple[dict[str, float], Optional[Stamp]]:
    """Phase seconds of one step, and the stamp that ends it.

    Step time runs from the end of the previous step (so data preparation and host gaps between
    steps count), or from this step's start when there is no previous step.
    """
    if not stamps:
        return {}, previous_end
    last = stamps[-1][1]
    if not isinstance(last, float):
        last.synchronize()
    totals = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for (_, a), (phase, b) in zip(stamps, stamps[1:]):
        totals[phase] += _elapsed_s(a, b)
    begin = previous_end if previous_end is not None else stamps[0][1]
    return {"step": _elapsed_s(begin, last), **totals}, last


class MemoryMeter:
    """Allocated and peak memory of this rank: the CUDA caching allocator on a GPU, the process
    RSS on CPU (peak RSS is the process lifetime's, since the OS cannot reset it)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda_allocator" if self.cuda else "process_rss"
        self._page = os.sysconf("SC_PAGE_SIZE")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def read_gb(self) -> tuple[float, float]:
        if self.cuda:
            return torch.cuda.memory_allocated() / GB, torch.cuda.max_memory_allocated() / GB
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * self._page
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return rss / GB, max(rss, peak) / GB  # the two counters round differently


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc), i.e. since its launch."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def setup_memory_gb(device: torch.device) -> dict[str, Optional[float]]:
    """Peak memory since the process started: host RSS and, on a GPU, the CUDA allocator."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    gpu = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    return {"setup_peak_host_gb": host, "setup_peak_gpu_gb": gpu}


@dataclass
class StepRecord:
    """One step as the results file stores it (the seed's keys first, then additions)."""

    step: int
    loss: float
    step_time_s: float
    forward_time_s: Optional[float]
    backward_time_s: Optional[float]
    optimizer_time_s: Optional[float]
    tokens_per_sec: float
    samples_per_sec: float
    memory_allocated_gb: float
    memory_peak_gb: float
    tokens_per_sec_per_gpu: float
    tflops_per_gpu: float
    mfu: Optional[float]
    grad_norm: Optional[float]
    slowest_rank: Optional[int] = None   # whose step time this is (the step is the slowest's)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Throughput:
    """Turns a step time into tokens/s, samples/s, TFLOP/s per GPU and MFU."""

    tokens_per_step: int
    samples_per_step: int
    world_size: int
    flops_per_token: int
    peak_tflops: Optional[float]

    def rates(self, step_time_s: float) -> dict[str, Optional[float]]:
        tokens_per_sec = self.tokens_per_step / step_time_s
        tflops = self.flops_per_token * tokens_per_sec / self.world_size / 1e12
        return {
            "tokens_per_sec": tokens_per_sec,
            "samples_per_sec": self.samples_per_step / step_time_s,
            "tokens_per_sec_per_gpu": tokens_per_sec / self.world_size,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
        }
