"""The suite's options, declared once (torch-free: the pytest plugin reads them at start-up in
every pytest run): the ``--tp-bench-*`` options with their CPU and GPU defaults, and what
``--tp-bench-args`` may set."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Any, Optional

from tp_bench.core.config import DTYPES, BenchConfig
from tp_bench.core.dims import ParallelDims
from tp_bench.core.errors import ConfigError
from tp_bench.frontends.arguments import parse_config


@dataclass(frozen=True)
class SuiteOption:
    """One ``--tp-bench-NAME`` option: a BenchConfig field the suite sets per run (its help comes
    from the field), or a measurement count (``field`` None), with its CPU and GPU defaults."""

    name: str
    field: Optional[str]
    cpu: Any
    cuda: Any
    kind: type
    help: str = ""


# Declared once: the pytest plugin's options, the defaults by device and SuiteOptions' fields.
SUITE_OPTIONS = (
    SuiteOption("model", "model_name", "tiny", "Qwen/Qwen3-0.6B", str),
    SuiteOption("layers", "num_layers", 2, 0, int),
    SuiteOption("seq", "seq_length", 64, 2048, int),
    SuiteOption("batch", "batch_size", 2, 1, int),
    SuiteOption("dtype", "dtype", "float32", "bfloat16", str,
                "Compute dtype (bf16 matmuls are emulated, 6x slower, on most CPUs)"),
    # 10 rounds on CPU: fully separated 10 vs 10 rounds give the gate's rank test p ~ 1e-4,
    # under its alpha of 0.001; 20 on a GPU, whose runs are cheap next to their start-up.
    SuiteOption("rounds", None, 10, 20, int, "Timed rounds (training steps) per entry"),
    SuiteOption("warmup", None, 3, 3, int, "Untimed warm-up rounds per entry"),
)

# BenchConfig fields the suite decides itself; --tp-bench-args must not set them.
_SUITE_FIELDS = {
    "impl": "the impl is a parameter (select with -m)",
    "dp_size": "the mesh is a parameter (select with -m or --tp-bench-mesh)",
    "tp_size": "the mesh is a parameter (select with -m or --tp-bench-mesh)",
    **{o.field: f"use --tp-bench-{o.name}" for o in SUITE_OPTIONS if o.field},
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
    tokens = shlex.split(text)
    for token in tokens:
        name = token.split("=", 1)[0].lstrip("-")
        if token.startswith("--") and name in _SUITE_FIELDS:
            raise ConfigError(f"--tp-bench-args may not set --{name}: {_SUITE_FIELDS[name]}")
    return parse_config(tokens, prog="--tp-bench-args")


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
        values = {o.name: (o.cuda if device_type == "cuda" else o.cpu)
                  if given.get(o.name) is None else given[o.name] for o in SUITE_OPTIONS}
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

    def config(self, impl: str, dims: ParallelDims) -> BenchConfig:
        return dataclasses.replace(
            self.base, impl=impl, dp_size=dims.dp, tp_size=dims.tp, model_name=self.model,
            num_layers=self.layers, seq_length=self.seq, batch_size=self.batch, dtype=self.dtype,
            gradient_accumulation_steps=1, timing="none",
            # what a pytest-benchmark entry runs, recorded as steps
            num_training_steps=self.warmup + self.rounds, warmup_steps=self.warmup)

    @property
    def label(self) -> str:
        """The model part of a pytest-benchmark group name."""
        layers = f" L{self.layers}" if self.layers else ""
        return f"{self.model}{layers} seq{self.seq} bs{self.batch} {self.dtype}"
