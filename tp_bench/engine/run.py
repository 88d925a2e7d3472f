"""A benchmark run: prepare, set up, train through the step driver, write the results.

Nothing is read back from the device inside a step: losses, gradient norms and phase stamps are
read once per log interval (``Recorder.flush``), where they are also reduced across ranks (times
and memory: the slowest rank's; loss: the mean over data-parallel replicas). There too, every
rank learns of a stop request (a signal on any rank) and of a step that did not update the
weights:

- a skipped step (DeepSpeed's overflow skip, the float16 loss scaler's) is kept apart and never
  timed as a training step; more skips than float16 loss scaling explains, or any skip without
  it, is a divergence;
- a non-finite loss or gradient norm is a divergence: the run ends "diverged", exit status 1.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from tp_bench.core import results
from tp_bench.core.config import BenchConfig
from tp_bench.core.dims import ParallelDims
from tp_bench.core.dist import DistContext, rank0_print, setup as setup_dist
from tp_bench.core.errors import Diverged, Interrupted
from tp_bench.core.metrics import StepRecord, resolve_phases
from tp_bench.engine.driver import GC_POLICY, PendingStep, dp_mean
from tp_bench.engine.failure import FailureGuard
from tp_bench.engine.profiling import profile_step
from tp_bench.engine.session import Session, check_output_dir, prepare

# float16 loss scaling starts at 2**16 and halves at each overflow: finding its scale skips a
# handful of steps, and each later growth attempt may skip one more.
LOSS_SCALING_SKIPS = 24
LOSS_SCALING_SKIPS_PER_1000_STEPS = 2


def allowed_skips(loss_scaling: Optional[str], steps: int) -> int:
    if loss_scaling is None:
        return 0
    return LOSS_SCALING_SKIPS + LOSS_SCALING_SKIPS_PER_1000_STEPS * steps // 1000


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Recorder:
    """Turns pending steps into StepRecords, one log interval at a time (a collective)."""

    def __init__(self, session: Session, guard: Optional[FailureGuard] = None):
        self.session = session
        self.guard = guard
        self.pending: list[PendingStep] = []
        self.warmup: list[StepRecord] = []
        self.measured: list[StepRecord] = []
        self.skipped: list[dict[str, Any]] = []
        self.stop_signal: Optional[int] = None     # agreed at the last flush
        self._previous_end = None                # last stamp of the previous step
        self._window_start: Optional[float] = None  # host time, for --timing none

    def begin(self) -> None:
        if self.session.cfg.timing == "none":
            self._sync_device()
            self._window_start = time.perf_counter()

    def _sync_device(self) -> None:
        if self.session.ctx.device.type == "cuda":
            torch.cuda.synchronize()

    def add(self, pending: PendingStep) -> None:
        self.pending.append(pending)

    def _phases(self, pending: list[PendingStep]) -> list[dict[str, float]]:
        phases = []
        for p in pending:
            times, self._previous_end = resolve_phases(p.stamps, self._previous_end)
            phases.append(times)
        if self.session.cfg.timing == "none":
            self._sync_device()
            now = time.perf_counter()
            per_step = (now - self._window_start) / len(pending)
            self._window_start = now
            phases = [{"step": per_step} for _ in pending]
        return phases

    def flush(self) -> list[StepRecord]:
        """Read the interval's steps (every rank, together); raise Diverged or Interrupted."""
        session, pending = self.session, self.pending
        self.pending = []
        if not pending:
            return []
        device, world = session.ctx.device, session.ctx.world_size
        phases = self._phases(pending)
        nan = float("nan")
        local_signal = float(self.guard.stop_signal or 0) if self.guard else 0.0
        maxed = torch.tensor(
            [[ph.get("step", nan), ph.get("forward", nan), ph.get("backward", nan),
              ph.get("optimizer", nan), *p.memory_gb, float(bool(p.stats.skipped)),
              local_signal] for ph, p in zip(phases, pending)], dtype=torch.float64,
            device=device)
        slowest = [0] * len(pending)
        if dist.is_initialized() and world > 1:
            step_times = maxed[:, 0].contiguous()
            every = [torch.empty_like(step_times) for _ in range(world)]
            dist.all_gather(every, step_times)
            slowest = torch.stack(every).argmax(dim=0).tolist()
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        losses = dp_mean(torch.stack([p.loss.float() for p in pending]).to(torch.float64), world)
        rows, losses = maxed.tolist(), losses.tolist()
        norms = [None if p.stats.grad_norm is None else float(p.stats.grad_norm)
                 for p in pending]
        records = []
        for p, row, loss, norm, slow in zip(pending, rows, losses, norms, slowest):
            step_s, fwd, bwd, opt, mem, peak, skipped, _ = row
            phase = None if session.cfg.timing == "none" else (fwd, bwd, opt)
            record = StepRecord(
                step=p.step, loss=loss, step_time_s=step_s,
                forward_time_s=phase and phase[0], backward_time_s=phase and phase[1],
                optimizer_time_s=phase and phase[2],
                memory_allocated_gb=mem, memory_peak_gb=peak, grad_norm=norm,
                slowest_rank=slow, **session.throughput.rates(step_s))
            if skipped:
                self.skipped.append({"step": p.step, "loss": loss, "grad_norm": norm,
                                     "step_time_s": step_s})
                continue
            self._check_finite(record)
            target = self.warmup if record.step < session.cfg.warmup_steps else self.measured
            target.append(record)
            records.append(record)
        self._check_skips(pending[-1].step + 1)
        self.stop_signal = int(rows[-1][-1]) or None
        return records

    def _check_finite(self, record: StepRecord) -> None:
        for what, value in (("loss", record.loss), ("gradient norm", record.grad_norm)):
            if value is not None and not math.isfinite(value):
                advice = " or --dtype bfloat16" if self.session.cfg.dtype == "float16" else ""
                raise Diverged(f"{what} is {value} at step {record.step}: the run diverged "
                               f"(try a lower --learning_rate{advice})")

    def _check_skips(self, steps_done: int) -> None:
        loss_scaling = self.session.trainer.loss_scaling
        allowed = allowed_skips(loss_scaling, steps_done)
        if len(self.skipped) > allowed:
            last = self.skipped[-1]
            why = (f"more than float16 loss scaling explains ({allowed})" if loss_scaling
                   else "without loss scaling, a skip means non-finite gradients")
            raise Diverged(f"{len(self.skipped)} of {steps_done} steps skipped the update, {why}"
                           f"; last at step {last['step']}, gradient norm {last['grad_norm']}: "
                           f"the run diverged (try a lower --learning_rate)")


class ResultWriter:
    """Assembles the results document at any point of the run; rank 0 writes it."""

    def __init__(self, session: Session):
        self.session = session
        self.recorder: Optional[Recorder] = None
        cfg = session.cfg
        self.path = results.result_path(cfg.output_dir, cfg.impl, cfg.tp_size, cfg.dp_size,
                                        cfg.dp_replicate)
        self.phase = "setup"                             # where the run is
        self.profile: Optional[dict[str, Any]] = None   # filled by --profile
        self.started = _utc_now()

    def document(self, status: str, error: Optional[str] = None) -> dict[str, Any]:
        s, rec = self.session, self.recorder
        measured = [r.to_dict() for r in rec.measured] if rec else []
        record = s.record()
        summary = results.summarize(measured, s.throughput.tokens_per_step,
                                    s.throughput.samples_per_step, s.ctx.world_size,
                                    s.throughput.flops_per_token, s.throughput.peak_tflops)
        if s.ctx.world_size > 1 and summary.get("slowest_rank"):
            summary["slowest_rank"]["node"] = s.topology.nodes[summary["slowest_rank"]["rank"]]
        return {
            "config": record["config"],
            "steps": measured,
            "summary": summary,
            "schema_version": results.SCHEMA_VERSION,
            "status": status,
            "error": error,
            "error_phase": self.phase if error else None,
            "warmup": [r.to_dict() for r in rec.warmup] if rec else [],
            "skipped": rec.skipped if rec else [],
            "model": record["model"],
            "precision": record["precision"],
            "strategy": record["strategy"],
            "measurement": {
                "timing": s.cfg.timing,
                "memory": s.memory.kind if s.memory else None,
                "times_are": "max over ranks",
                "python_gc": GC_POLICY,
                "loss_is": "mean over data-parallel replicas",
                "tokens_per_step": s.throughput.tokens_per_step,
                "peak_tflops_per_gpu": s.throughput.peak_tflops,
                "startup_rank0": s.startup,
            },
            "profile": self.profile,
            "environment": record["environment"],
            "run": {"pid": os.getpid(), "host": socket.gethostname(), "started_utc": self.started,
                    "updated_utc": _utc_now(), "phase": self.phase},
        }

    def write(self, status: str, error: Optional[str] = None,
              phase: Optional[str] = None) -> dict[str, Any]:
        """Write the document (rank 0); ``phase``: where the failing rank was, if not here."""
        if phase is not None:
            self.phase = phase
        doc = self.document(status, error)
        if self.session.ctx.is_rank0:
            results.write_json_atomic(self.path, doc)
        return doc


def _fmt_opt(value: Optional[float], fmt: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


def log_line(record: StepRecord, total_steps: int) -> str:
    return (f"step {record.step + 1:>5}/{total_steps} | loss {record.loss:.4f} | "
            f"{1000 * record.step_time_s:8.1f} ms | {record.tokens_per_sec:9.1f} tok/s | "
            f"{record.tflops_per_gpu:6.1f} TFLOP/s/GPU | MFU "
            f"{_fmt_opt(record.mfu and 100 * record.mfu, '.1f', '%')} | "
            f"mem {record.memory_allocated_gb:.2f}/{record.memory_peak_gb:.2f} GB")


def summary_line(doc: dict[str, Any], path: Path) -> str:
    s, c = doc["summary"], doc["config"]
    if not s.get("num_steps"):
        return f"summary: no measured steps -> {path}"
    spread = 100 * s["iqr_step_time_ms"] / s["median_step_time_ms"]
    mfu = _fmt_opt(s["mfu"] and 100 * s["mfu"], ".1f", "%")
    slow = s.get("slowest_rank") or {}
    slowest = (f", slowest rank {slow['rank']} on {slow['node']} "
               f"({100 * slow['share_of_steps']:.0f}% of steps)" if slow.get("node") else "")
    label = ParallelDims(c["dp_size"], c["tp_size"], c.get("dp_replicate", 1)).label
    return (f"summary: {c['impl']} {label} {c['model_name']} "
            f"seq {c['seq_length']} bs {c['batch_size']}: "
            f"{s['avg_tokens_per_sec']:.1f} tok/s ({s['avg_tokens_per_sec_per_gpu']:.1f}/GPU), "
            f"step {s['median_step_time_ms']:.1f} ms median (IQR {spread:.1f}%), "
            f"{s['tflops_per_gpu']:.1f} TFLOP/s/GPU, MFU {mfu}, "
            f"peak mem {s['peak_memory_gb']:.2f} GB, final loss {s['final_loss']:.4f}{slowest} "
            f"-> {path}")


def train(session: Session) -> dict[str, Any]:
    """Set up and train a prepared session; return the results document."""
    cfg, ctx = session.cfg, session.ctx
    writer = ResultWriter(session)
    guard = FailureGuard(ctx, on_abort=writer.write, phase=lambda: writer.phase)
    with guard:
        session.setup()
        rank0_print(
            f"tp_bench: {cfg.impl} {cfg.dims.label} on {ctx.world_size} x "
            f"{ctx.device.type} ({ctx.backend}), {cfg.model_name} "
            f"({session.model_config.num_layers} layers, "
            f"{session.model_config.num_parameters / 1e6:.1f}M params), "
            f"setup {session.setup_time_s:.1f} s")
        writer.phase = "train"
        recorder = writer.recorder = Recorder(session, guard)
        driver = session.driver(cfg.timing)
        recorder.begin()
        for step in range(cfg.num_training_steps):
            recorder.add(driver.step())
            if (step + 1) % cfg.log_interval == 0 or step == cfg.num_training_steps - 1:
                records = recorder.flush()
                if records:
                    rank0_print(log_line(records[-1], cfg.num_training_steps))
                if recorder.stop_signal is not None:
                    name = signal.Signals(recorder.stop_signal).name
                    raise Interrupted(f"{name}: stopped after step {step + 1} of "
                                      f"{cfg.num_training_steps}; {len(recorder.measured)} "
                                      f"measured steps kept in {writer.path}")
                writer.write("partial")
        if cfg.profile:
            writer.phase = "profile"
            writer.profile = profile_step(driver, ctx, writer.path.with_name(
                writer.path.stem.replace("results_", "trace_") + ".json.gz"))
        writer.phase = "done"
        doc = writer.write("complete")
    rank0_print(summary_line(doc, writer.path))
    return doc


def run(cfg: BenchConfig, ctx: Optional[DistContext] = None) -> dict[str, Any]:
    """Validate, set up, train and write results; ConfigError propagates before any model."""
    ctx = ctx or setup_dist()
    session = prepare(cfg, ctx)
    check_output_dir(session)
    return train(session)
