"""Will the run fit? Refuse, before anything is built, a configuration that the memory plan
(engine.plan) predicts to exceed the GPU's memory, or without a GPU the host's, by more than
``plan.REFUSAL_MARGIN``, instead of dying of out-of-memory minutes later. The message carries
the plan's row; ``--force`` runs it anyway.

The plan errs by a few percent on the measured GPU rows (docs/plan.md), so only a clear
excess is refused. A stack that declares no memory layout is checked against a lower bound
on CPU only: 16 bytes per parameter (float32 weight, gradient and two AdamW moments) over the
ranks.
"""

from __future__ import annotations

from typing import Optional

from tp_bench.core.config import BenchConfig
from tp_bench.core.errors import ConfigError
from tp_bench.engine.plan import GIB, REFUSAL_MARGIN, PlanRow, plan_row
from tp_bench.engine.shapes import model_shapes

STATE_BYTES_PER_PARAM = 16       # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
# What a process holds besides its tensors (interpreter, torch, transformers, DeepSpeed):
# about 1.4 GB of host memory measured at start-up (docs/PERFORMANCE.md).
PROCESS_HOST_BYTES = int(1.4 * GIB)
HINT = ("`tp-bench plan --model_name M --nproc N` shows what fits; pass --force to try anyway")


def available_host_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemAvailable not found in /proc/meminfo")


def _host_memory() -> Optional[int]:
    try:
        return available_host_memory_bytes()
    except OSError:
        return None


def _params_text(cfg: BenchConfig, num_parameters: int) -> str:
    return f"{cfg.model_name} ({num_parameters / 1e9:.1f}B parameters)"


def check_fit(cfg: BenchConfig, device_type: str, local_ranks: int) -> Optional[PlanRow]:
    """ConfigError when ``cfg`` clearly does not fit this machine; else the plan's row (None
    for a stack without a memory layout)."""
    if device_type == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return check_gpu_fit(cfg, props.total_memory, props.name, local_ranks)
    return check_host_fit(cfg, local_ranks)


def check_host_fit(cfg: BenchConfig, local_ranks: int) -> Optional[PlanRow]:
    """Without a GPU: every rank on this machine holds its peak in host memory."""
    shapes = model_shapes(cfg.model_name, cfg.num_layers)
    row = plan_row(cfg, shapes)
    if row is not None:
        per_rank = row.peak + PROCESS_HOST_BYTES
        why = f"plan: {row.summary()} per rank"
    else:
        per_rank = STATE_BYTES_PER_PARAM * shapes.config.num_parameters / cfg.dims.world_size
        why = "model states alone"
    needed = per_rank * local_ranks
    available = _host_memory()
    if available is not None and needed > REFUSAL_MARGIN * available:
        raise ConfigError(
            f"{_params_text(cfg, shapes.config.num_parameters)} needs at least "
            f"{needed / REFUSAL_MARGIN / GIB:.0f} GB of host memory for {local_ranks} rank(s) "
            f"without a GPU ({why}; refused above {REFUSAL_MARGIN}x the memory), but "
            f"{available / GIB:.0f} GB are available: pick a smaller preset (--model_name tiny "
            f"for a try; `tp-bench models` lists them) or a larger mesh; {HINT}")
    return row


def check_gpu_fit(cfg: BenchConfig, device_memory: int, device_name: str,
                  local_ranks: int) -> Optional[PlanRow]:
    """On a GPU: the plan's peak per rank against the device's memory, and the host memory a
    full-model build there needs (autotp builds in host memory what does not fit the GPU)."""
    shapes = model_shapes(cfg.model_name, cfg.num_layers)
    row = plan_row(cfg, shapes, budget=device_memory)
    if row is None:
        return None
    if row.peak > REFUSAL_MARGIN * device_memory:
        raise ConfigError(
            f"{_params_text(cfg, shapes.config.num_parameters)} needs about "
            f"{row.peak / GIB:.0f} GB per GPU (plan: {row.summary()}), more than "
            f"{REFUSAL_MARGIN}x the {device_memory / GIB:.0f} GB of the {device_name}: a larger "
            f"tp or dp, --activation_checkpointing or a smaller --batch_size needs less; {HINT}")
    available = _host_memory()
    needed = row.host_setup * local_ranks
    if needed and available is not None and needed > REFUSAL_MARGIN * available:
        raise ConfigError(
            f"{_params_text(cfg, shapes.config.num_parameters)}: {cfg.impl} builds the full "
            f"float32 model in host memory in each of the {local_ranks} rank(s) on this machine "
            f"({needed / GIB:.0f} GB together), but {available / GIB:.0f} GB are available; "
            f"{HINT}")
    return row
