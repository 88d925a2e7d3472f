"""Will the model fit in host memory? Refuse, before anything is built, a CPU run whose model
cannot fit, instead of dying of out-of-memory a minute later.

The estimate is a lower bound (model states only, sharded as far as any stack shards them;
activations not counted), so a refusal is certain, not a guess: 16 bytes per parameter (fp32
weight, gradient and two AdamW moments) over the ranks, plus the full fp32 model that AutoTP
builds in every rank before sharding it.
"""

from __future__ import annotations

from tp_bench.core.config import BenchConfig
from tp_bench.core.errors import ConfigError
from tp_bench.models.base import ModelConfig

GB = 1024**3
STATE_BYTES_PER_PARAM = 16       # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq


def available_host_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemAvailable not found in /proc/meminfo")


def host_bytes_needed(cfg: BenchConfig, model_config: ModelConfig, local_ranks: int) -> int:
    """Lower bound of the host memory the ranks on this machine need together."""
    params = model_config.num_parameters
    per_rank = STATE_BYTES_PER_PARAM * params / cfg.dims.world_size
    if not cfg.meta_init:            # the full float32 model exists in every rank at set-up
        per_rank += 4 * params
    return int(per_rank * local_ranks)


def check_host_fit(cfg: BenchConfig, model_config: ModelConfig, local_ranks: int) -> None:
    needed = host_bytes_needed(cfg, model_config, local_ranks)
    try:
        available = available_host_memory_bytes()
    except OSError:
        return
    if needed > available:
        raise ConfigError(
            f"{cfg.model_name} ({model_config.num_parameters / 1e9:.1f}B parameters) needs at "
            f"least {needed / GB:.0f} GB of host memory for {local_ranks} rank(s) without a GPU "
            f"(model states alone), but {available / GB:.0f} GB are available: pick a smaller "
            f"preset (--model_name tiny for a try; `tp-bench models` lists them) or pass --force "
            f"to try anyway")
