"""What the benchmark suite measures: one phase of a training step per pytest-benchmark entry.

Every round of every entry is a whole training step (data, forward, backward, optimizer), so a
strategy always goes through its normal cycle; only the phase being measured is timed. The phases
before it run in pytest-benchmark's ``setup``, the ones after it in ``teardown``, untimed:

  entry      setup (untimed)          timed                       teardown (untimed)
  forward    data                     forward                     backward, optimizer
  backward   data, forward            backward                    optimizer
  optimizer  data, forward, backward  optimizer (clip, step, zero)  -
  step       -                        data .. optimizer           -

pytest-benchmark reads its clock around the timed call; the suite's clock (``device_clock``)
first waits for the device, so a round's time covers its kernels, not just their launch. Rounds
and warm-up are fixed counts (``benchmark.pedantic``), identical on every rank, because a phase
contains collectives. After the rounds, each round's time becomes the slowest rank's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from tp_bench import results, runner
from tp_bench.config import DTYPES, BenchConfig, ConfigError
from tp_bench.distributed import DistContext
from tp_bench.mesh_shape import MeshShape

PHASES = ("forward", "backward", "optimizer", "step")
_STEP = ("data", "forward", "backward", "optimizer")   # what one training step runs, in order

# Share of a training step's FLOPs done by each entry (backward = 2 x forward, the convention of
# the 6N estimate); the optimizer's element-wise work is not counted, so it has no MFU.
FLOP_SHARE = {"forward": 1 / 3, "backward": 2 / 3, "optimizer": None, "step": 1.0}


def device_clock() -> float:
    """Host clock read after the device has drained its queue (pytest-benchmark's timer here)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


# What the suite measures when the command line does not say: a tiny model on CPU, the seed's
# shape on a GPU (the first preset that fits one GPU with room for the parity reference).
_DEFAULTS = {
    "cpu": dict(model="tiny", layers=2, seq=64, batch=2, dtype="bfloat16", rounds=3, warmup=1),
    "cuda": dict(model="Qwen/Qwen3-0.6B", layers=0, seq=2048, batch=1, dtype="bfloat16",
                 rounds=10, warmup=3),
}

# BenchConfig fields the suite decides itself; --tp-bench-args must not set them.
_SUITE_FIELDS = {
    "impl": "the impl is a parameter (select with -m)",
    "dp_size": "the mesh is a parameter (select with -m or --tp-bench-mesh)",
    "tp_size": "the mesh is a parameter (select with -m or --tp-bench-mesh)",
    "model_name": "use --tp-bench-model",
    "num_layers": "use --tp-bench-layers",
    "seq_length": "use --tp-bench-seq",
    "batch_size": "use --tp-bench-batch",
    "dtype": "use --tp-bench-dtype",
    "num_training_steps": "use --tp-bench-rounds",
    "warmup_steps": "use --tp-bench-warmup",
    "gradient_accumulation_steps": "the suite times one micro-batch per step",
    "timing": "the suite times each phase with a device-synchronized clock",
    "log_interval": "the suite does not log steps",
    "output_dir": "results go to pytest-benchmark's --benchmark-json / storage",
    "profile": "use benchmark.py --profile",
}


def parse_config_args(text: str) -> BenchConfig:
    """benchmark.py options (``--zero_stage 2 --activation_checkpointing``) as a BenchConfig;
    raises ConfigError for a bad option or one the suite sets itself."""
    from tp_bench.cli import _Parser, add_config_arguments, config_from_args

    tokens = shlex.split(text)
    for token in tokens:
        name = token.split("=", 1)[0].lstrip("-")
        if token.startswith("--") and name in _SUITE_FIELDS:
            raise ConfigError(f"--tp-bench-args may not set --{name}: {_SUITE_FIELDS[name]}")
    parser = _Parser(prog="--tp-bench-args")
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(tokens))


@dataclass(frozen=True)
class SuiteOptions:
    """The suite's model and measurement options, resolved for the device."""

    model: str
    layers: int
    seq: int
    batch: int
    dtype: str
    rounds: int
    warmup: int
    base: BenchConfig            # every other option (--tp-bench-args)

    @classmethod
    def resolve(cls, device_type: str, base: BenchConfig, **given: Optional[Any]) -> "SuiteOptions":
        defaults = _DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
        values = {k: defaults[k] if given.get(k) is None else given[k] for k in defaults}
        if values["dtype"] not in DTYPES:
            raise ConfigError(f"unknown --tp-bench-dtype {values['dtype']!r}; "
                              f"choose from {', '.join(DTYPES)}")
        for name in ("seq", "batch", "rounds"):
            if values[name] < 1:
                raise ConfigError(f"--tp-bench-{name} must be >= 1 (got {values[name]})")
        for name in ("layers", "warmup"):
            if values[name] < 0:
                raise ConfigError(f"--tp-bench-{name} must be >= 0 (got {values[name]})")
        return cls(base=base, **values)

    def config(self, impl: str, mesh: MeshShape) -> BenchConfig:
        return dataclasses.replace(
            self.base, impl=impl, dp_size=mesh.dp, tp_size=mesh.tp, model_name=self.model,
            num_layers=self.layers, seq_length=self.seq, batch_size=self.batch, dtype=self.dtype,
            gradient_accumulation_steps=1, timing="sync",
            # what a pytest-benchmark entry runs, recorded as steps
            num_training_steps=self.warmup + self.rounds, warmup_steps=self.warmup)

    @property
    def label(self) -> str:
        """The model part of a pytest-benchmark group name."""
        layers = f" L{self.layers}" if self.layers else ""
        return f"{self.model}{layers} seq{self.seq} bs{self.batch} {self.dtype}"


@dataclass(frozen=True)
class SharedMeshContext(DistContext):
    """A DistContext that builds each (dp, tp) mesh once: the suite's sessions on one shape share
    its process groups instead of creating new ones per session (communicators hold device
    memory and are never freed before the process group is)."""

    _meshes: dict = field(default_factory=dict, compare=False, repr=False)

    def mesh(self, dp_size: int, tp_size: int):
        key = (dp_size, tp_size)
        if key not in self._meshes:
            self._meshes[key] = super().mesh(dp_size, tp_size)
        return self._meshes[key]


@contextlib.contextmanager
def open_session(session: runner.Session) -> Iterator[runner.Session]:
    """Build the prepared session's strategy; free it on exit."""
    try:
        session.setup()
        yield session
    finally:
        session.close()


class StepDriver:
    """Runs a session's training steps phase by phase, so any one phase can be timed alone."""

    def __init__(self, session: runner.Session):
        self.session = session
        self.step = 0              # training steps completed
        self._next = 0             # index in _STEP of the next phase of the current step
        self._batch = None
        self._loss: Optional[torch.Tensor] = None
        self.last_loss: Optional[torch.Tensor] = None   # of the last completed step

    def _run(self, phase: str) -> None:
        assert _STEP[self._next] == phase, f"{phase} out of order"
        s = self.session
        if phase == "data":
            self._batch = s.data.batch(self.step, 0, s.dp_rank)
        elif phase == "forward":
            self._loss = s.strategy.forward(self._batch)
        elif phase == "backward":
            s.strategy.backward(self._loss)
        else:
            s.strategy.step()
            self.last_loss, self._loss, self._batch = self._loss.detach(), None, None
            self.step += 1
        self._next = (self._next + 1) % len(_STEP)

    def finish(self) -> None:
        """Run what is left of the current step (nothing at a step boundary)."""
        while self._next:
            self._run(_STEP[self._next])

    def whole_step(self) -> None:
        for phase in _STEP:
            self._run(phase)

    def round_functions(self, phase: str) -> tuple[Optional[Callable], Callable,
                                                   Optional[Callable]]:
        """(setup, target, teardown) for benchmark.pedantic: each round is one whole step."""
        if phase == "step":
            return None, self.whole_step, None
        position = _STEP.index(phase)

        def setup() -> None:
            self.finish()
            for before in _STEP[:position]:
                self._run(before)

        return setup, lambda: self._run(phase), self.finish


@dataclass
class Measurement:
    phase: str
    times_s: list[float]          # per round, the slowest rank's; empty with --benchmark-disable
    loss: float                   # last step's, mean over data-parallel replicas
    memory_gb: tuple[float, float]   # allocated, peak: max over ranks


def _all_ranks(session: runner.Session, values: list[float], op) -> list[float]:
    ctx = session.ctx
    if ctx.world_size == 1 or not values:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def measure(benchmark, driver: StepDriver, phase: str, options: SuiteOptions,
            group: str) -> Measurement:
    """Time ``phase`` with pytest-benchmark and record what it needs to be read on its own.

    A collective: every rank must call it for the same phase.
    """
    session = driver.session
    benchmark.group = group            # read when the rounds start
    setup, target, teardown = driver.round_functions(phase)
    session.memory.reset_peak()
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=options.rounds,
                       warmup_rounds=options.warmup)
    driver.finish()   # with --benchmark-disable pedantic runs setup and target only
    stats = benchmark.stats.stats if benchmark.stats else None
    local_times = list(stats.data) if stats else []
    maxed = _all_ranks(session, [*local_times, *session.memory.read_gb()], dist.ReduceOp.MAX)
    loss = _all_ranks(session, [float(driver.last_loss)], dist.ReduceOp.SUM)[0]
    loss /= session.ctx.world_size      # tp ranks hold equal losses: this is the dp mean
    times, memory = maxed[:len(local_times)], (maxed[-2], maxed[-1])
    if stats:
        # pytest-benchmark computes its statistics lazily from ``data``: none has been read yet.
        stats.data[:] = times
        benchmark.extra_info.update(extra_info(session, phase, times, memory, loss, options))
    return Measurement(phase, times, loss, memory)


def extra_info(session: runner.Session, phase: str, times_s: list[float],
               memory_gb: tuple[float, float], loss: float,
               options: SuiteOptions) -> dict[str, Any]:
    """What a pytest-benchmark entry carries besides its times (README: "What each field means")."""
    ctx, cfg, throughput = session.ctx, session.cfg, session.throughput
    rates = throughput.rates(statistics.median(times_s))
    share = FLOP_SHARE[phase]
    tflops = None if share is None else share * rates["tflops_per_gpu"]
    mfu = None if share is None or rates["mfu"] is None else share * rates["mfu"]
    environment = results.environment(ctx.device, ctx.world_size, ctx.backend)
    environment.update(session.strategy.environment())
    return {
        "phase": phase,
        "impl": cfg.impl,
        "mesh": f"dp{cfg.dp_size}-tp{cfg.tp_size}",
        "dp_size": cfg.dp_size,
        "tp_size": cfg.tp_size,
        "world_size": ctx.world_size,
        "times_are": "per round, the slowest rank's, device-synchronized",
        "rounds": options.rounds,
        "warmup_rounds": options.warmup,
        "tokens_per_step": throughput.tokens_per_step,
        "tokens_per_sec": rates["tokens_per_sec"],
        "tokens_per_sec_per_gpu": rates["tokens_per_sec_per_gpu"],
        "flops_share": share,
        "tflops_per_gpu": tflops,
        "mfu": mfu,
        "peak_tflops_per_gpu": throughput.peak_tflops,
        "memory_allocated_gb": memory_gb[0],
        "memory_peak_gb": memory_gb[1],
        "memory_is": session.memory.kind,
        "loss": loss,
        "precision": session.strategy.precision_policy(),
        "strategy": session.strategy.describe(),
        "model": {**session.model_config.to_dict(),
                  "flops_per_token": throughput.flops_per_token},
        "config": cfg.to_dict(),
        "environment": environment,
    }
