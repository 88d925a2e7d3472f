"""The step driver: the only training loop. The CLI run, the suite, the parity check, the
self-checks and the sweep all step through it.

One step: data -> forward -> backward (per micro-batch) -> optimizer, with a phase stamp after
each phase. Nothing is read back from the device inside a step: the loss, the gradient norm and
the stamps are handed out as a ``PendingStep``, read once per log interval by the caller.
The suite times one phase alone: it runs the phases one at a time (``run_phase``), each step
still whole and in order.

Python's garbage collector runs on the driver's schedule, as in torchtitan's trainer ("to avoid
stragglers"): automatic collection is off while a driver exists, and a generation-1 collection
runs at the start of every ``GC_EVERY``-th step, inside its time. Left automatic, a full
(generation-2) collection lands in whichever step crosses the allocation threshold: 180-380 ms
on the H200 host, so one step in 15 of a batch-1 run took 2-3x the others, in the stacks whose
steps allocate more Python objects (docs/PERFORMANCE.md 0.8).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from tp_bench.core.data import SyntheticData
from tp_bench.core.metrics import MemoryMeter, PhaseTimer
from tp_bench.strategies.base import StepStats, Trainer

PHASES = ("data", "forward", "backward", "optimizer")
GC_EVERY = 50            # torchtitan's default ``training.gc_freq``
GC_POLICY = f"automatic collection off while training; generation 1 every {GC_EVERY} steps"


def take_over_gc() -> None:
    """Collect now and turn automatic collection off (``release_gc`` turns it back on)."""
    gc.disable()
    gc.collect(1)


def release_gc() -> None:
    gc.enable()


@dataclass
class PendingStep:
    """A step whose numbers may still live on the device."""

    step: int
    loss: torch.Tensor               # this rank's mean over the step's micro-batches
    stats: StepStats
    stamps: list
    memory_gb: tuple[float, float]   # allocated, peak (of this step, with per-step memory)


def dp_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Each data-parallel replica's loss, averaged over replicas (a collective). Every tp rank of
    a replica holds the same loss, so the sum over the world divided by the world is that mean."""
    if world_size > 1 and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= world_size
    return values


class StepDriver:
    def __init__(self, trainer: Trainer, data: SyntheticData, dp_rank: int, grad_accum: int,
                 timer: PhaseTimer, memory: MemoryMeter, per_step_memory: bool = True):
        self.trainer = trainer
        self.data = data
        self.dp_rank = dp_rank
        self.grad_accum = grad_accum
        self.timer = timer
        self.memory = memory
        self.per_step_memory = per_step_memory
        self.step_index = 0                 # the step being run (or next to run)
        self.last: Optional[PendingStep] = None   # the last completed step
        self.skipped: list[int] = []        # steps whose update was skipped, as the trainer knew
        self._next = 0                      # index in PHASES of the next phase
        self._micro = 0
        self._batch = None
        self._loss: Optional[torch.Tensor] = None
        self._losses: list[torch.Tensor] = []
        take_over_gc()

    @property
    def at_step_boundary(self) -> bool:
        return self._next == 0 and self._micro == 0

    @property
    def next_phase(self) -> str:
        return PHASES[self._next]

    def run_phase(self, phase: str) -> Optional[PendingStep]:
        """Run the next phase of the current step, which must be ``phase``; the optimizer phase
        completes the step and returns it."""
        if phase != PHASES[self._next]:
            raise RuntimeError(f"step driver: {phase} out of order (next is {self.next_phase})")
        if phase == "data":
            if self._micro == 0:
                if self.per_step_memory:
                    self.memory.reset_peak()
                self.timer.start()
                if self.step_index > 1 and self.step_index % GC_EVERY == 0:
                    gc.collect(1)
            self._batch = self.data.batch(self.step_index, self._micro, self.dp_rank)
            self._next = 1
        elif phase == "forward":
            self._loss = self.trainer.forward(self._batch)
            self.timer.mark("forward")
            self._next = 2
        elif phase == "backward":
            self.trainer.backward(self._loss)
            self.timer.mark("backward")
            self._losses.append(self._loss.detach())
            self._loss = self._batch = None
            self._micro += 1
            self._next = 0 if self._micro < self.grad_accum else 3
        else:
            stats = self.trainer.step()
            self.timer.mark("optimizer")
            if stats.skipped:
                self.skipped.append(self.step_index)
            losses = self._losses
            loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            self.last = PendingStep(self.step_index, loss, stats, self.timer.finish(),
                                    self.memory.read_gb())
            self.step_index += 1
            self._next, self._micro, self._losses = 0, 0, []
            return self.last
        return None

    def finish(self) -> None:
        """Run what is left of the current step (nothing at a step boundary)."""
        while not self.at_step_boundary:
            self.run_phase(self.next_phase)

    def step(self, before_update: Optional[Callable[[Trainer], None]] = None) -> PendingStep:
        """One whole step; ``before_update`` runs after the last backward, before the optimizer
        (the parity check reads the gradients there)."""
        self.finish()
        while self.next_phase != "optimizer":
            self.run_phase(self.next_phase)
        if before_update is not None:
            before_update(self.trainer)
        return self.run_phase("optimizer")
