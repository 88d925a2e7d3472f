"""BenchConfig: every option of a run, declared once.

The CLI (cli.py) and the pytest plugin build their options from these fields, so a name, a
default or a help text lives in exactly one place. ``validate`` checks everything that can be
checked before a model is built and raises ConfigError with a one-line, user-facing message.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

DTYPES = ("bfloat16", "float16", "float32")
ATTN_IMPLS = ("sdpa", "flash_attention_2", "eager")
ZERO_STAGES = (0, 1, 2)
TIMING_MODES = ("events", "sync", "none")
OPTIMIZER_IMPLS = ("fused", "foreach")


class ConfigError(ValueError):
    """A bad option or option combination; the message is shown to the user as is."""


def _opt(default: Any, help: str, group: str, choices: tuple | None = None,
         metavar: str | None = None) -> Any:
    meta = {"help": help, "group": group, "choices": choices, "metavar": metavar}
    return field(default=default, metadata=meta)


MODEL, PARALLEL, TRAINING, MEMORY, BENCH = (
    "Model Configuration",
    "Parallelism Configuration",
    "Training Configuration",
    "Memory Optimization",
    "Benchmarking Configuration",
)


@dataclass
class BenchConfig:
    # Model
    model_name: str = _opt("Qwen/Qwen3-32B",
                           "HuggingFace model name, shipped preset (see `tp-bench models`), "
                           "local directory or config.json path", MODEL)
    num_layers: int = _opt(0, "Override number of layers (0 = use model default)", MODEL)
    attn_impl: str = _opt("sdpa", "Attention implementation", MODEL, ATTN_IMPLS)
    # Parallelism
    impl: str = _opt("autotp", "TP implementation", PARALLEL)
    tp_size: Optional[int] = _opt(None, "Tensor parallel degree (default: world_size / dp_size)",
                                  PARALLEL)
    dp_size: int = _opt(1, "Data parallel degree (both implementations)", PARALLEL)
    zero_stage: int = _opt(1, "DeepSpeed ZeRO stage (AutoTP only, 0-2)", PARALLEL, ZERO_STAGES)
    use_vocab_parallel: bool = _opt(True, "Vocabulary-parallel embedding, lm_head and loss "
                                    "(logits stay sharded over tp); --no_vocab_parallel disables",
                                    PARALLEL)
    sequence_parallel: bool = _opt(True, "fsdp_dtensor: keep norms and the residual stream "
                                   "sharded on the sequence dim over tp (no effect at tp 1)",
                                   PARALLEL)
    fsdp_at_dp1: bool = _opt(False, "fsdp_dtensor: wrap with FSDP2 even when dp_size is 1 (it "
                             "only adds copies there; for study)", PARALLEL)
    # Training
    batch_size: int = _opt(1, "Per-GPU micro batch size", TRAINING)
    seq_length: int = _opt(2048, "Sequence length", TRAINING)
    num_training_steps: int = _opt(100, "Total training steps", TRAINING)
    learning_rate: float = _opt(1e-5, "Learning rate", TRAINING)
    weight_decay: float = _opt(0.01, "Weight decay", TRAINING)
    gradient_accumulation_steps: int = _opt(1, "Gradient accumulation steps", TRAINING)
    max_grad_norm: float = _opt(1.0, "Maximum gradient norm (0 = no clipping)", TRAINING)
    optimizer_impl: str = _opt("fused", "AdamW kernels: fused (one kernel per parameter "
                               "group) or foreach", TRAINING, OPTIMIZER_IMPLS)
    # Memory / precision
    dtype: str = _opt("bfloat16", "Training (compute) dtype; parameters and optimizer state "
                      "stay float32 (master weights)", MEMORY, DTYPES)
    autocast: bool = _opt(False, "Mixed precision through torch.autocast (uses --dtype) instead "
                          "of the strategy's parameter casting", MEMORY)
    activation_checkpointing: bool = _opt(False, "Enable activation checkpointing "
                                          "(per transformer layer)", MEMORY)
    meta_init: bool = _opt(True, "fsdp_dtensor: build the model on the meta device and "
                           "materialize only this rank's shards (no rank holds the full model)",
                           MEMORY)
    compile: bool = _opt(False, "torch.compile each transformer layer", MEMORY)
    # Benchmarking
    warmup_steps: int = _opt(5, "Steps to skip in metrics collection", BENCH)
    log_interval: int = _opt(10, "Logging interval (steps); metrics are read from the "
                             "device once per interval", BENCH)
    output_dir: str = _opt("./results", "Output directory for results", BENCH)
    seed: int = _opt(42, "Random seed (weights and data)", BENCH)
    timing: str = _opt("events", "Phase timing: device events read once per log interval "
                       "(events), host sync at every phase boundary (sync), or step time "
                       "only (none)", BENCH, TIMING_MODES)
    peak_tflops: Optional[float] = _opt(None, "Dense bf16 peak TFLOP/s per GPU for MFU "
                                        "(default: looked up from the device name)", BENCH)
    profile: bool = _opt(False, "After the run, profile one extra step with torch.profiler and "
                         "write a Chrome trace (rank 0) to output_dir", BENCH)

    # ------------------------------------------------------------------ validation
    def validate(self, world_size: int) -> "BenchConfig":
        """Check options that need no model; return a copy with tp_size resolved."""
        from tp_bench.parallel.factory import available_strategies

        if self.impl not in available_strategies():
            raise ConfigError(f"unknown --impl {self.impl!r}; "
                              f"choose from {', '.join(available_strategies())}")
        for name, allowed in (("dtype", DTYPES), ("attn_impl", ATTN_IMPLS),
                              ("zero_stage", ZERO_STAGES), ("timing", TIMING_MODES),
                              ("optimizer_impl", OPTIMIZER_IMPLS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"unknown --{name} {value!r}; choose from "
                                  f"{', '.join(map(str, allowed))}")
        for name in ("dp_size", "batch_size", "seq_length", "num_training_steps",
                     "gradient_accumulation_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("num_layers", "warmup_steps", "learning_rate", "weight_decay",
                     "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        if self.num_training_steps <= self.warmup_steps:
            raise ConfigError(f"--num_training_steps ({self.num_training_steps}) must exceed "
                              f"--warmup_steps ({self.warmup_steps}): no step would be measured")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"--peak_tflops must be > 0 (got {self.peak_tflops})")

        tp = self.tp_size
        if tp is None:
            if world_size % self.dp_size:
                raise ConfigError(f"world size {world_size} is not divisible by "
                                  f"--dp_size {self.dp_size}")
            tp = world_size // self.dp_size
        if tp < 1:
            raise ConfigError(f"--tp_size must be >= 1 (got {tp})")
        if self.dp_size * tp != world_size:
            raise ConfigError(f"dp_size * tp_size must equal the world size: "
                              f"{self.dp_size} * {tp} = {self.dp_size * tp}, "
                              f"but {world_size} processes were launched")
        if self.attn_impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("--attn_impl flash_attention_2 needs the flash_attn package, "
                              "which is not installed; use sdpa")
        return dataclasses.replace(self, tp_size=tp)

    def validate_model(self, num_attention_heads: int, num_key_value_heads: int) -> None:
        """Checks that need the model's shape (called before the model is built)."""
        tp = self.tp_size or 1
        for what, heads in (("num_attention_heads", num_attention_heads),
                            ("num_key_value_heads", num_key_value_heads)):
            if heads % tp:
                raise ConfigError(f"{self.model_name}: {what} = {heads} is not divisible by "
                                  f"tp_size = {tp}")

    # ------------------------------------------------------------------ helpers
    @property
    def tokens_per_step(self) -> int:
        """Tokens of the global batch: every dp replica, every micro-batch."""
        return self.batch_size * self.seq_length * self.gradient_accumulation_steps * self.dp_size

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.dp_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))
