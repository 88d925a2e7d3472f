"""BenchConfig: every option of a run, declared once.

The command line and the pytest plugin are generated from these fields (frontends.arguments), so
a name, a default or a help text lives in exactly one place. ``validate`` checks everything that
can be checked without a model or a strategy and raises ConfigError with a one-line message.

Options a stack may or may not have (``IMPL_OPTIONS``) default to None, "the impl's own
default": each strategy declares which it takes and their values (strategies.base.Strategy
.options), and ``strategies.registry.resolve`` fills them in, or refuses a value the impl does
not take.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from tp_bench.core.dims import ParallelDims
from tp_bench.core.errors import ConfigError

DTYPES = ("bfloat16", "float16", "float32")
ATTN_IMPLS = ("sdpa", "flash_attention_2", "eager")
NORM_IMPLS = ("fused", "hf")
TIMING_MODES = ("events", "sync", "none")
OPTIMIZER_IMPLS = ("fused", "foreach")


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
    norm_impl: str = _opt("fused", "RMSNorm of the HuggingFace model: one fused kernel "
                          "(F.rms_norm, as torchtitan's model) or HuggingFace's own float32 "
                          "upcasting code (models.fused_norm)", MODEL, NORM_IMPLS)
    # Parallelism
    impl: str = _opt("autotp", "TP implementation", PARALLEL)
    tp_size: Optional[int] = _opt(None, "Tensor parallel degree (default: world_size / dp_size)",
                                  PARALLEL)
    dp_size: int = _opt(1, "Data parallel degree (every implementation)", PARALLEL)
    zero_stage: Optional[int] = _opt(None, "DeepSpeed ZeRO stage over dp (autotp only; "
                                     "default 1)", PARALLEL, (0, 1, 2, 3))
    use_vocab_parallel: Optional[bool] = _opt(
        None, "Vocabulary-parallel embedding, lm_head and loss: logits stay sharded over tp; "
        "--no_vocab_parallel disables (default: on where the impl offers it; no effect at tp 1)",
        PARALLEL)
    sequence_parallel: Optional[bool] = _opt(
        None, "Norms and the residual stream sharded on the sequence dim over tp (fsdp_dtensor; "
        "default on; no effect at tp 1)", PARALLEL)
    dp_replicate: int = _opt(1, "HSDP: replicate the parameter shards over this many groups of "
                             "the dp ranks (dp = replicate x shard; across nodes, shard within "
                             "them; fsdp_dtensor, torchtitan)", PARALLEL)
    allow_cross_node_tp: bool = _opt(False, "Allow TP groups that span nodes (refused otherwise: "
                                     "TP over the inter-node network is rarely wanted)",
                                     PARALLEL)
    fsdp_at_dp1: Optional[bool] = _opt(
        None, "fsdp_dtensor: wrap with FSDP2 even when dp_size is 1 with --autocast or float32, "
        "where it only adds copies (for study; default off)", PARALLEL)
    fused_qkv: Optional[bool] = _opt(
        None, "fsdp_dtensor: the attention's q, k and v projections as one GEMM, its rows "
        "grouped per key-value head so that TP keeps whole groups, as torchtitan's model "
        "(models.fused_qkv; default on)", PARALLEL)
    async_tp: Optional[bool] = _opt(
        None, "torchtitan: asynchronous TP, inductor's micro-pipeline pass overlapping TP "
        "collectives with matmuls over symmetric memory (needs CUDA, --compile and tp > 1; "
        "default off)", PARALLEL)
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
    meta_init: Optional[bool] = _opt(
        None, "Build the model on the meta device and materialize only this rank's shards, so "
        "no rank holds the full model (fsdp_dtensor; default on)", MEMORY)
    compile: bool = _opt(False, "torch.compile each transformer layer", MEMORY)
    force: bool = _opt(False, "Run even when the memory plan predicts the model will not fit "
                       "(see `tp-bench plan`)", MEMORY)
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
        """Check options that need neither a model nor a strategy; return a copy with tp_size
        resolved."""
        for name, allowed in (("dtype", DTYPES), ("attn_impl", ATTN_IMPLS),
                              ("norm_impl", NORM_IMPLS),
                              ("timing", TIMING_MODES), ("optimizer_impl", OPTIMIZER_IMPLS),
                              ("zero_stage", (None, 0, 1, 2, 3))):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"unknown --{name} {value!r}; choose from "
                                  f"{', '.join(str(a) for a in allowed if a is not None)}")
        for name in ("dp_size", "batch_size", "seq_length", "num_training_steps",
                     "gradient_accumulation_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("num_layers", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name} must be a finite number >= 0 (got {value})")
        if self.num_training_steps <= self.warmup_steps:
            raise ConfigError(f"--num_training_steps ({self.num_training_steps}) must exceed "
                              f"--warmup_steps ({self.warmup_steps}): no step would be measured")
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops)
                                                 and self.peak_tflops > 0):
            raise ConfigError(f"--peak_tflops must be a finite number > 0 (got "
                              f"{self.peak_tflops})")
        dims = ParallelDims.resolve(world_size, self.dp_size, self.tp_size, self.dp_replicate)
        if self.attn_impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("--attn_impl flash_attention_2 needs the flash_attn package, "
                              "which is not installed; use sdpa")
        return dataclasses.replace(self, tp_size=dims.tp)

    @property
    def dims(self) -> ParallelDims:
        """The parallel degrees of a validated config."""
        if self.tp_size is None:
            raise ValueError("tp_size is resolved by validate()")
        return ParallelDims(dp=self.dp_size, tp=self.tp_size, dp_replicate=self.dp_replicate)

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


# Options whose default depends on the impl (None until strategies.registry.resolve).
IMPL_OPTIONS = ("zero_stage", "use_vocab_parallel", "sequence_parallel", "fsdp_at_dp1",
                "meta_init", "fused_qkv", "async_tp")
# Options every impl takes with these values: how a stack trains, not which stack it is.
TECHNIQUE_OPTIONS = ("compile", "activation_checkpointing", "autocast", "optimizer_impl")
# Options only some impls take, with any value; the others must keep the default.
FREE_OPTIONS = ("dp_replicate",)
