"""Hugging Face transformers' own tensor parallelism over "tp" and its FSDP2 over "dp".

transformers builds and shards the model (``build_model``), the way its documentation says to
train with it: ``from_pretrained(..., distributed_config=DistributedConfig(tp_size, fsdp_size))``.
With no checkpoint: the concrete class, ``None`` for the path, the config and an empty state
dict, so every weight is a "missing key" that transformers allocates (only this rank's shard)
and initializes; ``builder.init_weights`` then writes our initial values into the shards.
``from_config`` takes no ``distributed_config``, and ``AutoModelForCausalLM.from_pretrained(None)``
fails, hence the concrete class.

The TP plan is the model family's ``base_model_tp_plan`` (transformers' styles: q/k/v and
gate/up ``colwise``, o and down ``rowwise``, Qwen3's q/k norms ``replicated_with_grad_allreduce``,
lm_head ``colwise_gather_output``; 5.24, not 5.17, adds a vocab-sharded ``embedding_rowwise``).
FSDP2 follows the family's ``fsdp_plan`` (layers reshard after forward, final norm and lm_head
kept).

Versions (the installed transformers decides; ``check`` refuses older ones):
- 5.24-style (``transformers.distributed.utils.initialize_distributed_mesh`` exists): one call
  builds transformers' own ("pp", "dp_replicate", "fsdp", "tp") mesh, tp innermost, applies TP
  and then FSDP2. A user mesh is ignored; its TP groups are our rows (checked after the build).
- 5.17-style: ``from_pretrained`` applies TP or else FSDP2 (``if tp: ... elif fsdp: ...``) and,
  without a mesh, builds a 1-D TP mesh of the first tp ranks; so it gets our ("dp", "tp") mesh
  (it uses ``mesh["tp"]``) and, at tp > 1, FSDP2 comes from transformers'
  ``apply_fully_sharded_data_parallelism`` over ``mesh["dp"]``: the same plan and policy.

The model code every HuggingFace-model stack shares: the norms per ``--norm_impl`` (fused by
default, models.fused_norm) and the loss computed from the logits (strategies.causal_loss,
compiled under --compile). What transformers does not offer is recorded, not added: no
vocabulary-parallel loss (lm_head gathers full logits on every tp rank), no sequence parallelism
(``enable_sequence_parallel`` is reserved, not wired). Precision: float32 master weights and
AdamW state always. The "cast" policy at dp > 1 is transformers' ``fsdp_mixed_precision``
(FSDP2 MixedPrecisionPolicy: bf16 parameters for compute, float32 reduce-scatter; bf16 only, so
float16 takes --autocast). At dp = 1 transformers applies no FSDP and so no policy: FSDP2 with
the same policy is applied over the size-1 dp mesh, as fsdp_dtensor does (recorded). Training
is the shared TorchTrainer (per-mesh clipping: ``clip_grad_norm_`` fails on the mix of meshes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from tp_bench.core.config import BenchConfig
from tp_bench.core.dims import Mesh
from tp_bench.core.errors import ConfigError
from tp_bench.core.precision import compute_policy, precision_record
from tp_bench.models.base import BaseModelBuilder
from tp_bench.models.fused_norm import use_fused_rms_norm
from tp_bench.strategies.base import Parallelized, Strategy
from tp_bench.strategies.causal_loss import causal_lm_loss
from tp_bench.strategies.dtensor_steps import apply_compile, apply_fsdp, mixed_precision_policy
from tp_bench.strategies.torch_trainer import TorchTrainer

MIN_TRANSFORMERS = "5.17"
GRAD_ALLREDUCE = "replicated_with_grad_allreduce"   # a TP style that breaks accumulation
API = ("Model.from_pretrained(None, config=..., state_dict={}, "
       "distributed_config=DistributedConfig(tp_size=tp, fsdp_size=dp))")
NOT_OFFERED = ("transformers offers no vocabulary-parallel loss (its lm_head gathers the full "
               "logits on every tp rank, and the loss is the model's own) and no sequence "
               "parallelism (DistributedConfig.enable_sequence_parallel is reserved, not wired)")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def builds_its_own_mesh() -> bool:
    """5.24-style: one (pp, dp_replicate, fsdp, tp) mesh and TP + FSDP2 inside from_pretrained;
    else 5.17-style (TP only inside from_pretrained, on the mesh it is given)."""
    from transformers.distributed import utils

    return hasattr(utils, "initialize_distributed_mesh")


def check(cfg: BenchConfig, builder: BaseModelBuilder, device: torch.device) -> None:
    from packaging.version import Version

    version = _transformers_version()
    if Version(version).release < Version(MIN_TRANSFORMERS).release:
        raise ConfigError(f"--impl hf_native needs transformers >= {MIN_TRANSFORMERS} (training "
                          f"with DistributedConfig tensor parallelism + FSDP2); installed: "
                          f"{version}")
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError("--impl hf_native needs the accelerate package (transformers' "
                          "distributed loading requires it): pip install accelerate")
    text_config = builder.hf_config.get_text_config()
    dims = cfg.dims
    if dims.tp > 1 and not getattr(text_config, "base_model_tp_plan", None):
        raise ConfigError(f"{cfg.model_name}: transformers {version} has no tensor-parallel plan "
                          f"for model_type {text_config.model_type!r} (its config's "
                          f"base_model_tp_plan is empty), so --impl hf_native cannot shard it "
                          f"over tp {dims.tp}; use --impl fsdp_dtensor or autotp")
    styles = set((getattr(text_config, "base_model_tp_plan", None) or {}).values())
    if dims.tp > 1 and cfg.gradient_accumulation_steps > 1 and GRAD_ALLREDUCE in styles:
        # Measured at tp 2, 2 micro-batches: the q_norm gradient 72% off the reference.
        raise ConfigError(f"--impl hf_native cannot accumulate gradients at tp {dims.tp} on "
                          f"{cfg.model_name}: transformers' {GRAD_ALLREDUCE} (its q/k norms) "
                          f"all-reduces the whole accumulated gradient after every micro-batch, "
                          f"so earlier micro-batches count tp times; use "
                          f"--gradient_accumulation_steps 1")
    if (dims.dp > 1 and dims.tp > 1 and getattr(builder.hf_config, "tie_word_embeddings", False)
            and not builds_its_own_mesh()):
        raise ConfigError(f"--impl hf_native with transformers {version}: its from_pretrained "
                          f"applies TP or FSDP2, not both, and FSDP2 applied after loading splits "
                          f"{cfg.model_name}'s tied embedding and lm_head into two parameters; "
                          f"use dp 1 or tp 1 here, or transformers 5.24")
    if dims.dp > 1 and not getattr(text_config, "base_model_fsdp_plan", None):
        raise ConfigError(f"{cfg.model_name}: transformers {version} has no FSDP plan for "
                          f"model_type {text_config.model_type!r} (base_model_fsdp_plan), so "
                          f"--impl hf_native cannot shard it over dp {dims.dp}")
    if compute_policy(cfg.dtype, cfg.autocast) == "cast" and cfg.dtype != "bfloat16":
        raise ConfigError(f"--impl hf_native: transformers' FSDP2 mixed precision is bfloat16 "
                          f"only; use --dtype bfloat16, or --dtype {cfg.dtype} with --autocast")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report or progress bar: every weight is "missing" on purpose, and its random
    init (on DTensor shards, which warns on CPU) is overwritten with our values after."""
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="DTensor random operators")
            yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def build_model(cfg: BenchConfig, builder: BaseModelBuilder, mesh: Mesh,
                device: torch.device) -> nn.Module:
    """transformers builds and shards the model (TP, then FSDP2 over dp); our initial values are
    then written into every shard."""
    from transformers.distributed import DistributedConfig

    dims = mesh.dims
    config = builder.hf_config_for(cfg.num_layers, cfg.attn_impl)
    reference = builder.create_model("meta", torch.float32, num_layers=cfg.num_layers,
                                     attn_impl=cfg.attn_impl)
    model_cls = type(reference)   # the concrete class: AutoModel*.from_pretrained(None) fails
    cast_over_dp = dims.dp > 1 and compute_policy(cfg.dtype, cfg.autocast) == "cast"
    distributed = DistributedConfig(tp_size=dims.tp, fsdp_size=dims.dp,
                                    fsdp_mixed_precision=cast_over_dp)
    kwargs: dict[str, Any] = dict(config=config, state_dict={}, distributed_config=distributed,
                                  dtype=torch.float32,
                                  attn_implementation=config._attn_implementation)
    if dims.world_size == 1:
        kwargs["device_map"] = device   # transformers places nothing without a mesh
    own_mesh = builds_its_own_mesh()
    if not own_mesh:
        kwargs["device_mesh"] = mesh.device_mesh   # 5.17 uses its "tp" dim
    with _quiet_transformers():
        model = model_cls.from_pretrained(None, **kwargs)
        if not own_mesh and dims.dp > 1 and dims.tp > 1:
            # 5.17 applies FSDP2 itself only without TP (then on a dp mesh of its own)
            from transformers.distributed.fsdp import apply_fully_sharded_data_parallelism

            model = apply_fully_sharded_data_parallelism(model, mesh.dp_mesh)
    model.train()   # from_pretrained returns eval mode
    names = [n for n, _ in model.named_parameters()]
    expected = [n for n, _ in reference.named_parameters()]
    if sorted(names) != sorted(expected):
        raise RuntimeError(f"hf_native: transformers' model has parameters "
                           f"{sorted(set(names) ^ set(expected))[:4]} that differ from "
                           f"{model_cls.__name__}'s own names")
    check_layout(model, mesh)
    if cfg.norm_impl == "fused":
        use_fused_rms_norm(model)
    builder.init_weights(model, cfg.seed)
    return model


def check_layout(model: nn.Module, mesh: Mesh) -> None:
    """Every sharded parameter's tp dim spans this rank's row of consecutive ranks and its
    other dim (fsdp / dp) this rank's column: the layout every impl shares."""
    from torch.distributed.tensor import DTensor

    dims, rank = mesh.dims, mesh.rank
    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            continue
        device_mesh = param.device_mesh
        for dim_name in device_mesh.mesh_dim_names or ():
            ranks = sorted(device_mesh[dim_name].mesh.flatten().tolist())
            expected = dims.tp_ranks(rank) if dim_name == "tp" else dims.dp_ranks(rank)
            if ranks != expected:
                raise RuntimeError(f"hf_native: {name} is sharded over {dim_name} ranks {ranks}, "
                                   f"not {expected}: transformers changed its mesh layout")


def applied_plan(model: nn.Module) -> dict[str, dict[str, str]]:
    """transformers' TP plan as applied (its style names; entries that name a module of this
    model), split like fsdp_dtensor's: entries inside the layers (``model.layers.*.``), the
    rest at the root."""
    layer_index = re.compile(r"(?<=\.layers\.)\d+(?=\.)")
    modules = {layer_index.sub("*", name) for name, _ in model.named_modules()}
    root, layer = {}, {}
    for key, style in (getattr(model, "tp_plan", None) or {}).items():
        generic = layer_index.sub("*", key)
        if generic in modules:
            (layer if ".layers.*." in generic else root)[generic] = f"transformers {style}"
    return {"root": root, "layer": layer}


def _dp_mesh(model: nn.Module, mesh: Mesh) -> Any:
    """The size-1 dp mesh for FSDP2 at dp 1: FSDP2 needs the same root mesh as the TP
    parameters, which is transformers' own where it builds one."""
    manager = getattr(model, "_mesh_manager", None)
    return manager.get_mesh("fsdp") if manager is not None else mesh.dp_mesh


def parallelize(model: nn.Module, builder: BaseModelBuilder, mesh: Mesh, cfg: BenchConfig,
                device: torch.device) -> Parallelized:
    dims = mesh.dims
    policy = compute_policy(cfg.dtype, cfg.autocast)
    layers = builder.get_transformer_layers(model)
    applied = []
    if dims.tp > 1:
        applied.append(f"transformers TP {dims.tp} (base_model_tp_plan)")
    if dims.dp > 1:
        applied.append(f"transformers FSDP2 over dp {dims.dp} (fsdp_plan)")
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        applied.append("activation checkpointing (transformers gradient_checkpointing_enable)")
    if cfg.compile:
        # In place, per layer; at dp > 1 after transformers' FSDP2, whose hooks dynamo skips.
        apply_compile(layers)
        applied.append("per-layer torch.compile + compiled loss")
    mechanism = {"none": "none", "autocast": "torch.autocast"}.get(policy)
    if policy == "cast" and dims.dp > 1:
        mechanism = "transformers FSDP2 mixed precision (DistributedConfig.fsdp_mixed_precision)"
    elif policy == "cast":
        # transformers applies no precision policy without FSDP: the one fsdp_dtensor uses.
        apply_fsdp(model, layers, _dp_mesh(model, mesh),
                   mixed_precision_policy(cfg.dtype, cfg.autocast))
        applied.append("FSDP2 at dp 1 as the bf16 cast (tp_bench: transformers has none)")
        mechanism = "fsdp2_mixed_precision (tp_bench's fully_shard at dp 1)"
    return Parallelized(
        model=model,
        plan=applied_plan(model) if dims.tp > 1 else None,
        techniques=applied,
        settings={"api": API, "transformers_mesh": ("own (pp, dp_replicate, fsdp, tp)"
                                                    if builds_its_own_mesh() else "tp_bench's"),
                  "vocab_parallel": False, "sequence_parallel": False,
                  "not_offered": NOT_OFFERED,
                  "fsdp": "transformers FSDP2 (its fsdp_plan) over dp" if dims.dp > 1 else
                          ("fully_shard per layer + root at dp 1" if policy == "cast" else None),
                  "activation_checkpointing": cfg.activation_checkpointing,
                  "compile": "per transformer layer + loss" if cfg.compile else None,
                  "meta_init": True},   # from_pretrained builds on meta
        precision=precision_record(cfg.dtype, cfg.autocast, "float32", mechanism, None),
        forward_loss=causal_lm_loss(compiled=cfg.compile))


def environment() -> dict[str, Any]:
    import accelerate

    return {"transformers_api": API, "accelerate": accelerate.__version__}


STRATEGY = Strategy(
    name="hf_native",
    parallelize=parallelize,
    trainer=TorchTrainer,
    options={"use_vocab_parallel": (False,), "sequence_parallel": (False,),
             "autocast": (False, True), "compile": (False, True),
             "activation_checkpointing": (False, True), "optimizer_impl": ("fused", "foreach")},
    sweep=("compile", "autocast", "optimizer_impl", "activation_checkpointing"),
    build_model=build_model,
    check=check,
    environment=environment,
)
