"""The training loop shared by the CLI and the pytest suite.

One step: data -> strategy.forward -> strategy.backward (per micro-batch) -> strategy.step, with
phase stamps around each call. Nothing is read back from the device inside a step: losses, grad
norms and timing stamps are collected and read once per log interval (``Recorder.flush``), where
they are also reduced across ranks (times and memory: the slowest rank's; loss: the mean over
data-parallel replicas).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from tp_bench import distributed, results
from tp_bench.config import BenchConfig
from tp_bench.data import SyntheticData
from tp_bench.metrics import (MemoryMeter, PhaseTimer, StepRecord, Throughput, peak_tflops_for,
                              process_age_s, resolve_phases, setup_memory_gb)
from tp_bench.models import get_model_builder
from tp_bench.models.base import BaseModelBuilder, ModelConfig
from tp_bench.parallel.base import BaseTPStrategy
from tp_bench.parallel.factory import create_strategy


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class PendingStep:
    """A step whose numbers still live on the device."""

    step: int
    loss: torch.Tensor
    grad_norm: Optional[torch.Tensor]
    stamps: list
    memory_gb: tuple[float, float]


@dataclass
class Session:
    """Everything one benchmark run needs, built and validated before any model exists."""

    cfg: BenchConfig
    ctx: distributed.DistContext
    builder: BaseModelBuilder
    model_config: ModelConfig
    throughput: Throughput
    strategy: Optional[BaseTPStrategy] = None
    data: Optional[SyntheticData] = None
    timer: Optional[PhaseTimer] = None
    memory: Optional[MemoryMeter] = None
    setup_time_s: Optional[float] = None
    startup: dict[str, Any] = field(default_factory=dict)   # rank 0's launch-to-first-step costs

    @property
    def dp_rank(self) -> int:
        return self.ctx.rank // self.cfg.tp_size

    def setup(self) -> None:
        """Build the mesh and the strategy (the model is created here)."""
        start = time.perf_counter()
        mesh = self.ctx.mesh(self.cfg.dp_size, self.cfg.tp_size)
        self.strategy = create_strategy(self.cfg, self.builder, mesh, self.ctx.device)
        self.strategy.setup()
        self.data = SyntheticData(self.model_config.vocab_size, self.cfg.batch_size,
                                  self.cfg.seq_length, self.cfg.seed)
        self.timer = PhaseTimer(self.cfg.timing, self.ctx.device)
        self.memory = MemoryMeter(self.ctx.device)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()  # initialization kernels count as set-up, not as step 0
        self.setup_time_s = time.perf_counter() - start
        self.startup = {"setup_time_s": self.setup_time_s,
                        "launch_to_first_step_s": process_age_s(),
                        **setup_memory_gb(self.ctx.device)}

    def close(self) -> None:
        """Drop the strategy (model, gradients, optimizer state), so that the next session in
        this process (the pytest suite builds several) finds the memory free."""
        self.strategy = self.data = self.timer = None
        gc.collect()   # modules and optimizer state form reference cycles
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    def train_step(self, step: int) -> PendingStep:
        strategy, timer = self.strategy, self.timer
        self.memory.reset_peak()
        timer.start()
        losses = []
        for micro in range(self.cfg.gradient_accumulation_steps):
            batch = self.data.batch(step, micro, self.dp_rank)
            loss = strategy.forward(batch)
            timer.mark("forward")
            strategy.backward(loss)
            timer.mark("backward")
            losses.append(loss.detach())
        grad_norm = strategy.step()
        timer.mark("optimizer")
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return PendingStep(step, loss, grad_norm, timer.finish(), self.memory.read_gb())


def prepare(cfg: BenchConfig, ctx: distributed.DistContext) -> Session:
    """Validate everything that can be checked without building the model (raises ConfigError)."""
    cfg = cfg.validate(ctx.world_size)
    builder = get_model_builder(cfg.model_name)
    model_config = builder.model_config(cfg.num_layers)
    cfg.validate_model(model_config.num_attention_heads, model_config.num_key_value_heads)
    throughput = Throughput(
        tokens_per_step=cfg.tokens_per_step, samples_per_step=cfg.samples_per_step,
        world_size=ctx.world_size, flops_per_token=model_config.flops_per_token(cfg.seq_length),
        peak_tflops=peak_tflops_for(ctx.device, cfg.peak_tflops))
    return Session(cfg, ctx, builder, model_config, throughput)


class Recorder:
    """Turns pending steps into StepRecords, one log interval at a time (a collective)."""

    def __init__(self, session: Session):
        self.session = session
        self.pending: list[PendingStep] = []
        self.warmup: list[StepRecord] = []
        self.measured: list[StepRecord] = []
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

    def flush(self) -> list[StepRecord]:
        session, pending = self.session, self.pending
        self.pending = []
        if not pending:
            return []
        device = session.ctx.device
        phases = []
        for p in pending:
            times, self._previous_end = resolve_phases(p.stamps, self._previous_end)
            phases.append(times)
        if session.cfg.timing == "none":
            self._sync_device()
            now = time.perf_counter()
            per_step = (now - self._window_start) / len(pending)
            self._window_start = now
            phases = [{"step": per_step} for _ in pending]
        nan = float("nan")
        maxed = torch.tensor([[ph.get("step", nan), ph.get("forward", nan), ph.get("backward", nan),
                               ph.get("optimizer", nan), *p.memory_gb]
                              for ph, p in zip(phases, pending)], dtype=torch.float64,
                             device=device)
        losses = torch.stack([p.loss.float() for p in pending]).to(torch.float64)
        if dist.is_initialized() and session.ctx.world_size > 1:
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
            dist.all_reduce(losses, op=dist.ReduceOp.SUM)
            losses /= session.ctx.world_size   # tp ranks hold equal losses: this is the dp mean
        maxed, losses = maxed.tolist(), losses.tolist()
        norms = [None if p.grad_norm is None else float(p.grad_norm) for p in pending]
        records = []
        for p, row, loss, norm in zip(pending, maxed, losses, norms):
            step_s, fwd, bwd, opt, mem, peak = row
            phase = None if session.cfg.timing == "none" else (fwd, bwd, opt)
            records.append(StepRecord(
                step=p.step, loss=loss, step_time_s=step_s,
                forward_time_s=phase and phase[0], backward_time_s=phase and phase[1],
                optimizer_time_s=phase and phase[2],
                memory_allocated_gb=mem, memory_peak_gb=peak, grad_norm=norm,
                **session.throughput.rates(step_s)))
        for record in records:
            if not math.isfinite(record.loss):
                break  # keep what came before; the caller stops the run
            target = self.warmup if record.step < session.cfg.warmup_steps else self.measured
            target.append(record)
        return records


class ResultWriter:
    """Assembles the results document; rank 0 writes it."""

    def __init__(self, session: Session, recorder: Recorder):
        self.session = session
        self.recorder = recorder
        cfg = session.cfg
        self.path = results.result_path(cfg.output_dir, cfg.impl, cfg.tp_size, cfg.dp_size)
        self.profile: Optional[dict[str, Any]] = None   # filled by --profile

    def document(self, status: str, error: Optional[str] = None) -> dict[str, Any]:
        s, rec = self.session, self.recorder
        steps = [r.to_dict() for r in rec.measured]
        strategy = s.strategy
        env = results.environment(s.ctx.device, s.ctx.world_size, s.ctx.backend)
        if strategy is not None:
            env.update(strategy.environment())
        return {
            "config": s.cfg.to_dict(),
            "steps": steps,
            "summary": results.summarize(steps, s.throughput.tokens_per_step,
                                         s.throughput.samples_per_step, s.ctx.world_size,
                                         s.throughput.flops_per_token, s.throughput.peak_tflops),
            "schema_version": results.SCHEMA_VERSION,
            "status": status,
            "error": error,
            "warmup": [r.to_dict() for r in rec.warmup],
            "model": {**s.model_config.to_dict(),
                      "flops_per_token": s.throughput.flops_per_token},
            "precision": strategy.precision_policy() if strategy else None,
            "strategy": strategy.describe() if strategy else None,
            "measurement": {
                "timing": s.cfg.timing,
                "memory": s.memory.kind if s.memory else None,
                "times_are": "max over ranks",
                "loss_is": "mean over data-parallel replicas",
                "tokens_per_step": s.throughput.tokens_per_step,
                "peak_tflops_per_gpu": s.throughput.peak_tflops,
                "startup_rank0": s.startup,
            },
            "profile": self.profile,
            "environment": env,
        }

    def write(self, status: str, error: Optional[str] = None) -> None:
        if self.session.ctx.is_rank0:
            results.write_json_atomic(self.path, self.document(status, error))


def _fmt_opt(value: Optional[float], fmt: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


def log_line(record: StepRecord, total_steps: int) -> str:
    return (f"step {record.step + 1:>5}/{total_steps} | loss {record.loss:.4f} | "
            f"{1000 * record.step_time_s:8.1f} ms | {record.tokens_per_sec:9.1f} tok/s | "
            f"{record.tflops_per_gpu:6.1f} TFLOP/s/GPU | MFU {_fmt_opt(record.mfu and 100 * record.mfu, '.1f', '%')} | "
            f"mem {record.memory_allocated_gb:.2f}/{record.memory_peak_gb:.2f} GB")


def summary_line(doc: dict[str, Any], path) -> str:
    s, c = doc["summary"], doc["config"]
    if not s.get("num_steps"):
        return f"summary: no measured steps -> {path}"
    spread = 100 * s["iqr_step_time_ms"] / s["median_step_time_ms"]
    mfu = _fmt_opt(s["mfu"] and 100 * s["mfu"], ".1f", "%")
    return (f"summary: {c['impl']} dp{c['dp_size']}xtp{c['tp_size']} {c['model_name']} "
            f"seq {c['seq_length']} bs {c['batch_size']}: "
            f"{s['avg_tokens_per_sec']:.1f} tok/s ({s['avg_tokens_per_sec_per_gpu']:.1f}/GPU), "
            f"step {s['median_step_time_ms']:.1f} ms median (IQR {spread:.1f}%), "
            f"{s['tflops_per_gpu']:.1f} TFLOP/s/GPU, MFU {mfu}, "
            f"peak mem {s['peak_memory_gb']:.2f} GB, final loss {s['final_loss']:.4f} -> {path}")


def train(session: Session) -> dict[str, Any]:
    """Run the benchmark loop of a prepared session; return the results document."""
    cfg, ctx = session.cfg, session.ctx
    recorder = Recorder(session)
    writer = ResultWriter(session, recorder)
    with distributed.FailureGuard(ctx, on_abort=lambda msg: writer.write("failed", msg)):
        session.setup()
        distributed.rank0_print(
            f"tp_bench: {cfg.impl} dp{cfg.dp_size}xtp{cfg.tp_size} on {ctx.world_size} x "
            f"{ctx.device.type} ({ctx.backend}), {cfg.model_name} "
            f"({session.model_config.num_layers} layers, "
            f"{session.model_config.num_parameters / 1e6:.1f}M params), "
            f"setup {session.setup_time_s:.1f} s")
        recorder.begin()
        for step in range(cfg.num_training_steps):
            recorder.add(session.train_step(step))
            if (step + 1) % cfg.log_interval == 0 or step == cfg.num_training_steps - 1:
                records = recorder.flush()
                bad = next((r for r in records if not math.isfinite(r.loss)), None)
                if bad is not None:
                    raise NonFiniteLossError(f"loss is {bad.loss} at step {bad.step}; stopping "
                                             f"(try a lower --learning_rate or --dtype bfloat16)")
                distributed.rank0_print(log_line(records[-1], cfg.num_training_steps))
                writer.write("partial")
        if cfg.profile:
            from tp_bench.profiling import profile_step

            writer.profile = profile_step(session, writer.path.with_name(
                writer.path.stem.replace("results_", "trace_") + ".json.gz"))
        doc = writer.document("complete")
        writer.write("complete")
    distributed.rank0_print(summary_line(doc, writer.path))
    return doc


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Validate, set up, train and write results; ConfigError propagates before any model."""
    ctx = distributed.setup()
    session = prepare(cfg, ctx)
    return train(session)
