"""torchtitan's own reference setup as a stack: its Qwen3 / Llama3 model, parallelized by its
own ``parallelize_qwen3`` / ``parallelize_llama``, trained by the shared TorchTrainer.

In order: torchtitan's model config from the HF config, with torchtitan's TP plan declared on it
(``torchtitan_model``) -> build on the meta device -> ``parallelize_*`` (TP with vocabulary/loss
and sequence parallelism, activation checkpointing, per-block ``torch.compile`` with async TP
where asked, FSDP2, in torchtitan's order and configuration) -> real storage -> RoPE caches ->
each rank writes its shards of exactly the initial values every stack starts from, mapped
through torchtitan's state-dict adapter, one layer at a time.

torchtitan is pinned to its "partial_dtensor" SPMD backend: its default backend ("spmd_types")
needs a newer FSDP than released torch has. Its meshes are its own (``ParallelDims``), with the
same layout as ours (TP groups are rows of consecutive ranks; checked at set-up). The loss is
HF's mean causal loss, computed by torchtitan's loss (sum over the sharded vocabulary / valid
tokens); FSDP sums gradients over dp (torchtitan sets ``gradient_divide_factor`` 1, because it
divides by the global token count), so each replica's loss enters backward divided by dp.

CPU only (gloo), two things torchtitan does not do by itself: it picks "cuda" for its meshes
when it finds no accelerator (set to the run's device), and gloo has no ``PREMUL_SUM``, which
FSDP uses with a divide factor of 1 (plain SUM instead, the same sum).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tp_bench.core.config import BenchConfig
from tp_bench.core.data import Batch
from tp_bench.core.dims import Mesh, ParallelDims
from tp_bench.core.errors import ConfigError
from tp_bench.core.precision import compute_policy
from tp_bench.models import get_model_builder
from tp_bench.models.base import BaseModelBuilder, canonical_param_name, write_full_value
from tp_bench.strategies.base import Parallelized, Strategy
from tp_bench.strategies.causal_loss import IGNORE_INDEX
from tp_bench.strategies.dtensor_steps import fsdp_precision
from tp_bench.strategies.torch_trainer import TorchTrainer
from tp_bench.strategies.torchtitan_compat import import_torchtitan, version
from tp_bench.strategies.torchtitan_model import TorchtitanModel, layer_groups, unsupported

SPMD_BACKEND = "partial_dtensor"


def check(cfg: BenchConfig, builder: BaseModelBuilder, device: torch.device) -> None:
    import_torchtitan()
    reason = unsupported(builder.hf_config_for(cfg.num_layers))
    if reason:
        raise ConfigError(reason)
    if cfg.attn_impl != "sdpa":
        raise ConfigError(f"--attn_impl {cfg.attn_impl} does not apply to --impl torchtitan "
                          f"(torchtitan's model uses its own SDPA attention)")
    if cfg.norm_impl != "fused":
        raise ConfigError(f"--norm_impl {cfg.norm_impl} does not apply to --impl torchtitan "
                          f"(torchtitan's model uses its own fused RMSNorm)")
    if compute_policy(cfg.dtype, cfg.autocast) == "cast" and cfg.dtype != "bfloat16":
        raise ConfigError(f"--impl torchtitan casts parameters to bfloat16 only "
                          f"(mixed_precision_param); use --autocast for --dtype {cfg.dtype}")
    if cfg.async_tp and not (device.type == "cuda" and cfg.compile and cfg.dims.tp > 1):
        raise ConfigError("--async_tp needs CUDA, --compile and tp_size > 1 (an inductor pass "
                          "over symmetric memory)")


def torchtitan_model(cfg: BenchConfig, builder: BaseModelBuilder) -> TorchtitanModel:
    import_torchtitan()
    return TorchtitanModel(builder.hf_config_for(cfg.num_layers), cfg.seq_length,
                           sequence_parallel=bool(cfg.sequence_parallel) and cfg.dims.tp > 1)


def build_model(cfg: BenchConfig, builder: BaseModelBuilder, mesh: Mesh,
                device: torch.device) -> nn.Module:
    return torchtitan_model(cfg, builder).build()


# ---------------------------------------------------------------------- meshes
_PARALLEL_DIMS: dict[tuple[ParallelDims, str], tuple[Any, Any]] = {}


def parallel_dims(dims: ParallelDims, device_type: str) -> Any:
    """torchtitan's ParallelDims for ``dims``, its meshes built once per process group."""
    import torch.distributed as dist
    import torchtitan.distributed.parallel_dims as tt_parallel_dims

    world = dist.group.WORLD
    cached = _PARALLEL_DIMS.get((dims, device_type))
    if cached is None or cached[0] is not world:
        # torchtitan takes its mesh device type from the accelerator it finds, else "cuda".
        tt_parallel_dims.device_type = device_type
        pd = tt_parallel_dims.ParallelDims(dp_replicate=dims.dp_replicate,
                                           dp_shard=dims.dp_shard, cp=1, tp=dims.tp, pp=1, ep=1,
                                           world_size=dims.world_size, spmd_backend=SPMD_BACKEND)
        pd.build_mesh()
        _PARALLEL_DIMS[(dims, device_type)] = cached = (world, pd)
    return cached[1]


def _check_layout(pd: Any, mesh: Mesh) -> None:
    """torchtitan's tp and batch groups are our rows and columns."""
    dims, rank = mesh.dims, mesh.rank
    got = {"tp": pd.get_mesh("tp").mesh.flatten().tolist() if dims.tp > 1 else [rank],
           "dp": pd.get_mesh("batch").mesh.flatten().tolist() if dims.dp > 1 else [rank]}
    want = {"tp": dims.tp_ranks(rank), "dp": dims.dp_ranks(rank)}
    if got != want:
        raise RuntimeError(f"torchtitan's mesh groups {got} differ from tp_bench's {want} "
                           f"on rank {rank}")


# ---------------------------------------------------------------------- parallelize
def torchtitan_configs(cfg: BenchConfig, dims: ParallelDims) -> dict[str, Any]:
    """Our options as the keyword arguments of torchtitan's ``parallelize_*``."""
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed.activation_checkpoint import FullAC

    cast = compute_policy(cfg.dtype, cfg.autocast) == "cast"
    return dict(
        parallelism=ParallelismConfig(
            tensor_parallel_degree=dims.tp, data_parallel_replicate_degree=dims.dp_replicate,
            data_parallel_shard_degree=dims.dp_shard,
            enable_sequence_parallel=bool(cfg.sequence_parallel) and dims.tp > 1,
            spmd_backend=SPMD_BACKEND),
        # "cast": FSDP2 casts parameters to bf16 for compute; gradients reduced in float32
        training=TrainingConfig(mixed_precision_param=cfg.dtype if cast else "float32",
                                mixed_precision_reduce="float32"),
        compile_config=CompileConfig(enable=cfg.compile, components=["model", "loss"],
                                     enable_async_tensor_parallel=bool(cfg.async_tp)),
        ac_config=FullAC.Config() if cfg.activation_checkpointing else None,
        dump_folder=cfg.output_dir)


def parallelize(model: nn.Module, builder: BaseModelBuilder, mesh: Mesh, cfg: BenchConfig,
                device: torch.device) -> Parallelized:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.distributed import utils as tt_utils

    dims = mesh.dims
    tt = torchtitan_model(cfg, builder)
    configs = torchtitan_configs(cfg, dims)
    tt_utils.set_spmd_backend(SPMD_BACKEND)   # module-global in torchtitan (its trainer sets it)
    pd = parallel_dims(dims, device.type)
    _check_layout(pd, mesh)
    if tt.family == "qwen3":
        from torchtitan.models.qwen3 import parallelize_qwen3 as parallelize_fn
    else:
        from torchtitan.models.llama3 import parallelize_llama as parallelize_fn
    model = parallelize_fn(model, parallel_dims=pd, **configs)
    if dist.get_backend() == "gloo":
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=None)   # RoPE caches; parameters are written next
        write_initial_values(model, tt, builder, cfg, device)
    loss_fn = CrossEntropyLoss(CrossEntropyLoss.Config(global_vocab_size=tt.config.vocab_size),
                               compile_config=configs["compile_config"])
    sequence_parallel = configs["parallelism"].enable_sequence_parallel
    return Parallelized(
        model=model,
        plan=applied_plan(model) if dims.tp > 1 else None,
        techniques=_techniques(tt, cfg, dims, sequence_parallel),
        settings={"model": f"torchtitan {tt.name} (fused wqkv, SDPA)",
                  "parallelize": f"{parallelize_fn.__module__}.{parallelize_fn.__name__} "
                                 f"(TP, activation checkpointing, compile, FSDP2)",
                  "spmd_backend": SPMD_BACKEND,
                  "vocab_parallel": dims.tp > 1, "sequence_parallel": sequence_parallel,
                  "fsdp": fsdp_units(tt) + (f" over dp {dims.dp}" if dims.dp_replicate == 1
                                            else f" (HSDP: replicate {dims.dp_replicate} x shard "
                                                 f"{dims.dp_shard})") + ", sum reduction",
                  "mixed_precision_param": configs["training"].mixed_precision_param,
                  "activation_checkpointing": "FullAC" if cfg.activation_checkpointing
                  else False,
                  "compile": "per transformer block (fullgraph) + loss" if cfg.compile
                  else None,
                  "async_tp": bool(cfg.async_tp), "meta_init": True},
        precision=fsdp_precision(cfg),
        forward_loss=lambda m, batch: causal_lm_loss(loss_fn, m, batch))


def _techniques(tt: TorchtitanModel, cfg: BenchConfig, dims: ParallelDims,
                sequence_parallel: bool) -> list[str]:
    applied = [f"torchtitan {tt.name}"]
    if dims.tp > 1:
        applied.append(f"TP {dims.tp} + vocab/loss parallel"
                       + (" + sequence parallel" if sequence_parallel else ""))
    if cfg.activation_checkpointing:
        applied.append("activation checkpointing (FullAC)")
    if cfg.compile:
        applied.append("per-block torch.compile" + (" + async TP" if cfg.async_tp else ""))
    applied += [f"HSDP over dp {dims.dp_replicate} x {dims.dp_shard}" if dims.dp_replicate > 1
                else f"FSDP2 over dp {dims.dp}", "meta-device init"]
    return applied


def fsdp_units(tt: TorchtitanModel) -> str:
    """torchtitan's FSDP2 wrapping (``apply_fsdp_to_decoder``), applied even at dp 1."""
    if tt.tied:
        return "fully_shard [tok_embeddings, norm, lm_head], each block, root"
    return "fully_shard tok_embeddings, [norm, lm_head], each block, root"


@torch.no_grad()
def write_initial_values(model: nn.Module, tt: TorchtitanModel, builder: BaseModelBuilder,
                         cfg: BenchConfig, device: torch.device) -> None:
    """Each rank writes its shard of every parameter's shared initial value, generated for the
    HF model and mapped to torchtitan's names and layout one layer at a time."""
    hf_meta = builder.create_model("meta", torch.float32, num_layers=cfg.num_layers)
    params = {canonical_param_name(n): p for n, p in model.named_parameters()}
    written = set()
    for group in layer_groups([n for n, _ in hf_meta.named_parameters()]):
        values = {n: builder.initial_value(hf_meta, n, cfg.seed, device) for n in group}
        for name, full in tt.from_hf(values).items():
            if name in params:
                write_full_value(params[name], full.to(params[name].dtype))
                written.add(name)
    missing = sorted(set(params) - written)
    if missing:
        raise RuntimeError(f"torchtitan: no initial value for {len(missing)} parameters, "
                           f"e.g. {missing[:3]}")


def causal_lm_loss(loss_fn: Any, model: nn.Module, batch: Batch) -> torch.Tensor:
    """HF's mean causal-LM loss (position t predicts label t+1) by torchtitan's loss: the
    labels shifted with the last position ignored, summed, over the count of valid labels."""
    logits = model(batch.input_ids)
    labels = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss, _ = loss_fn(logits, labels, (labels != IGNORE_INDEX).sum())
    return loss


# ---------------------------------------------------------------------- the applied plan
def applied_plan(model: nn.Module) -> dict[str, dict[str, str]]:
    """torchtitan's TP plan as applied: each module's declared placements on the tp mesh axis,
    in the {"root": ..., "layer": ...} shape of fsdp_dtensor's (layer 0 stands for every
    layer)."""
    plan: dict[str, dict[str, str]] = {"root": {}, "layer": {}}
    for name, module in model.named_modules():
        config = getattr(module, "_sharding_config", None)
        name = canonical_param_name(name + ".").rstrip(".")
        first_layer = name == "layers.0" or name.startswith("layers.0.")
        if config is None or (name.startswith("layers.") and not first_layer):
            continue
        held = {n for n, _ in module.named_parameters(recurse=False)}
        held |= {n for n, _ in module.named_buffers(recurse=False)}
        if first_layer:
            plan["layer"]["layers.*" + name[len("layers.0"):]] = _sharding_text(config, held)
        else:
            plan["root"][name] = _sharding_text(config, held)
    return plan


def _sharding_text(config: Any, held: set[str]) -> str:
    """``params weight S(0); in input R; out P -> S(1); local_map`` (the tp axis; the
    parameters and buffers the module holds)."""
    parts = []
    states = [(n, layout) for n, layout in config.state_shardings.items() if n in held]
    if states:
        parts.append("params " + ", ".join(f"{n} {_tp(layout)}" for n, layout in states))
    ins = {**(config.in_src_shardings or {})}
    for arg, dst in (config.in_dst_shardings or {}).items():
        src = ins.get(arg)
        ins[arg] = dst if src is None else (src, dst)
    if ins:
        parts.append("in " + ", ".join(f"{arg} {_pair(v)}" for arg, v in ins.items()))
    if config.out_src_shardings is not None or config.out_dst_shardings is not None:
        src = config.out_src_shardings
        if isinstance(src, tuple):
            src = src[0]
        parts.append("out " + _pair((src, config.out_dst_shardings)))
    if config.local_map is not None:
        parts.append("local_map")
    return "; ".join(parts)


def _pair(value: Any) -> str:
    if not isinstance(value, tuple):
        return _tp(value)
    src, dst = value
    if src is None:
        return "-> " + _tp(dst)
    if dst is None or _tp(src) == _tp(dst):
        return _tp(src)
    return f"{_tp(src)} -> {_tp(dst)}"


def _tp(layout: Any) -> str:
    from torchtitan.distributed.parallel_dims import MeshAxisName

    return repr(layout.per_axis_spmd_types().get(MeshAxisName.TP, "-"))


# ---------------------------------------------------------------------- trainer
class TorchtitanTrainer(TorchTrainer):
    """The shared TorchTrainer with torchtitan's gradient reduction (a sum over dp: the loss is
    divided by dp for backward) and gradients reported in HF names and layout."""

    def __init__(self, parallelized: Parallelized, cfg: BenchConfig, mesh: Mesh,
                 device: torch.device):
        super().__init__(parallelized, cfg, mesh, device)
        self.dp = mesh.dims.dp
        self.mapping = torchtitan_model(cfg, get_model_builder(cfg.model_name))

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss / self.dp)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        return self.mapping.to_hf(super().full_gradients())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                "loss": "torchtitan CrossEntropyLoss (sum / valid tokens; loss parallel over tp)",
                "grad_reduction": "FSDP2 sum over dp (torchtitan's gradient_divide_factor 1), "
                                  "loss / dp"}


STRATEGY = Strategy(
    name="torchtitan",
    parallelize=parallelize,
    trainer=TorchtitanTrainer,
    # torchtitan's lm_head is always vocabulary-sharded under TP; FSDP2 is always applied (the
    # mixed-precision mechanism even at dp 1); the model is always built on the meta device.
    options={"use_vocab_parallel": (True,), "sequence_parallel": (True, False),
             "async_tp": (False, True), "autocast": (False, True), "compile": (False, True),
             "activation_checkpointing": (False, True), "optimizer_impl": ("fused", "foreach")},
    sweep=("compile", "async_tp", "sequence_parallel", "autocast", "optimizer_impl",
           "activation_checkpointing"),
    takes=frozenset({"dp_replicate"}),
    environment=lambda: {"torchtitan": version()},
    check=check,
    build_model=build_model,
)
