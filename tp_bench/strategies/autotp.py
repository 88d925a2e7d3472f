"""DeepSpeed AutoTP over "tp" + a DeepSpeed engine with ZeRO 0-3 over "dp".

API: the configuration route DeepSpeed documents for training since 0.16/0.17,
``deepspeed.initialize(config={"tensor_parallel": {"autotp_size": tp}, ...})``; AutoTP shards the
model inside ``initialize``. (``deepspeed.tp_model_init`` only records arguments for that same
path in current releases, so it is not called.) DeepSpeed builds its own (data_parallel,
tensor_parallel) groups with tp innermost, which is the layout of our ("dp", "tp") mesh: TP
groups are rows of consecutive ranks, DP groups are columns (checked by a test).

``parallelize``, in order: vocabulary parallelism (``--use_vocab_parallel``: our
``VocabParallelEmbedding`` and a vocab-sharded lm_head whose logits stay sharded, loss by
``vocab_parallel_causal_cross_entropy``) -> activation checkpointing (HuggingFace's per-layer
hook with ``deepspeed.checkpointing.checkpoint``) -> ``deepspeed.initialize`` (AutoTP sharding,
bf16/fp16 or torch_autocast, ZeRO, clipping, accumulation) -> per-layer ``torch.compile``.
DeepSpeed's engine is the trainer (``DeepSpeedTrainer``).

AutoTP shards by slicing real weights, so the model cannot be built on the meta device: it is
built where it fits (the GPU if the full float32 model takes under half of its memory, else host
memory) and each rank keeps only its shards after ``initialize``.

Precision (the default matches fsdp_dtensor's): DeepSpeed's ``bf16`` (or ``fp16``) mode keeps
float32 master weights and optimizer state in the optimizer and bf16 weights in the module; with
``--autocast`` the module stays float32 under DeepSpeed's ``torch_autocast``. Gradients are
reduced over dp in float32 (``communication_data_type``), as FSDP2's reduce_dtype does.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from tp_bench.core.config import BenchConfig
from tp_bench.core.data import Batch
from tp_bench.core.dims import Mesh, ParallelDims
from tp_bench.core.dist import rank0_print
from tp_bench.core.precision import compute_policy, precision_record
from tp_bench.models.base import BaseModelBuilder, canonical_param_name
from tp_bench.strategies.base import Parallelized, StepStats, Strategy, Trainer
from tp_bench.strategies.causal_loss import causal_lm_loss
from tp_bench.strategies.memory import FLAT, FLAT_TOUCHED, FLAT_WHOLE, Held, MemoryLayout
from tp_bench.strategies.vocab_parallel import (VocabParallelEmbedding, VocabParallelLMHead,
                                                vocab_parallel_causal_cross_entropy)

log = logging.getLogger(__name__)
AUTOTP_API = "deepspeed.initialize(config={'tensor_parallel': {'autotp_size': tp}})"


def apply_vocab_parallel(model: nn.Module, builder: BaseModelBuilder, tp_group) -> None:
    """Swap the embedding and lm_head for vocabulary-sharded ones (one shared shard if tied)."""
    embedding, lm_head = builder.get_embedding_module(model), builder.get_lm_head(model)
    tied = embedding.weight is lm_head.weight
    new_embedding = VocabParallelEmbedding.from_embedding(embedding, tp_group)
    builder.replace_embedding_module(model, new_embedding)
    if tied:
        head = VocabParallelLMHead(new_embedding.weight, new_embedding.vocab_size,
                                   new_embedding.vocab_start, tp_group)
    else:
        head = VocabParallelLMHead.from_linear(lm_head, tp_group)
    builder.replace_lm_head(model, head)
    for module in (new_embedding, head):
        # DeepSpeed's own "already partitioned" mark: AutoTP matches the HF plan by name and
        # would otherwise wrap our lm_head as a gathering column-parallel layer.
        module.replaced = True
        # Counted on every tp rank in DeepSpeed's gradient norm (a replicated parameter counts
        # on tp rank 0 only); without it the norm, and so the clipping, miss the other shards.
        module.weight.tensor_model_parallel = True


def ds_config(cfg: BenchConfig, tp: int) -> dict[str, Any]:
    """The DeepSpeed configuration of a run (recorded in the result)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        # Vocabulary parallelism is ours (--use_vocab_parallel); DeepSpeed would otherwise shard
        # a tied embedding + lm_head by vocabulary on its own, even with --no_vocab_parallel.
        "tensor_parallel": {"autotp_size": tp, "vocab_parallel_lm_head": False},
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.dtype != "float32":
        short = {"bfloat16": "bfloat16", "float16": "float16"}[cfg.dtype]
        if cfg.autocast:
            config["torch_autocast"] = {"enabled": True, "dtype": short}
        elif cfg.dtype == "bfloat16":
            config["bf16"] = {"enabled": True}
        else:
            config["fp16"] = {"enabled": True, "loss_scale": 0}   # 0 = dynamic
    return config


def restore_exact_master_weights(model: nn.Module, builder: BaseModelBuilder, cfg: BenchConfig,
                                 tp_group: Any, init_device: torch.device) -> int:
    """Give DeepSpeed's float32 master weights the exact initial values.

    DeepSpeed casts the module to bf16/fp16 before its optimizer copies the weights into float32
    masters, so the masters start on the low-precision grid: every update smaller than half a
    grid step then rounds back to the same compute weight, and at lr 1e-5 the model trains
    visibly slower for tens of steps than the same model started from its float32 values (as
    fsdp_dtensor and the parity reference are). Each rank regenerates its parameters' initial
    values, takes its tp shard, checks that the module holds exactly that shard rounded, and
    writes it into the master. Returns the number of parameters restored.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    unsharded = builder.create_model("meta", torch.float32, num_layers=cfg.num_layers,
                                     attn_impl=cfg.attn_impl)
    tp_rank, tp = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    restored = 0
    for name, param in model.named_parameters():
        zero3 = hasattr(param, "ds_id")          # ZeRO-3: partitioned over dp, shape (0,) here
        if not zero3 and not hasattr(param, "_hp_mapping"):   # no master (float32 at ZeRO 0)
            continue
        module_name, _, leaf = name.rpartition(".")
        dim = shard_dim(model.get_submodule(module_name), leaf)
        full = builder.initial_value(unsharded, canonical_param_name(name), cfg.seed,
                                     init_device).to(param.device)
        shard = full if dim is None else torch.chunk(full, tp, dim=dim)[tp_rank]
        shape = tuple(param.ds_shape) if zero3 else tuple(param.shape)
        same = False
        if tuple(shard.shape) == shape:
            # ZeRO-3: gathering is a collective over dp, taken by every rank in the same order
            with _gathered(param, zero3):
                same = torch.equal(shard.to(param.dtype), param.detach())
        if not same:
            raise RuntimeError(f"autotp: cannot match {name} {shape} to its initial value; "
                               f"DeepSpeed sharded it in an unexpected way")
        safe_set_full_fp32_param(param, shard)
        restored += 1
    return restored


def _gathered(param: nn.Parameter, zero3: bool) -> Any:
    import contextlib

    import deepspeed

    return deepspeed.zero.GatheredParameters([param]) if zero3 else contextlib.nullcontext()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps its (data_parallel, tensor_parallel) groups in module globals, set by the
    first engine of a process and read by every later one. A process that builds engines on
    different meshes (the benchmark suite does) must let each engine build its own."""
    from deepspeed.utils import groups

    groups.mpu = None
    groups.mesh_device = None
    for name in ("_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", "_MPU_TENSOR_MODEL_PARALLEL_RANK"):
        setattr(groups, name, None)


def build_device(cfg: BenchConfig, builder: BaseModelBuilder,
                 device: torch.device) -> torch.device:
    """Where the full model is built: the GPU if its float32 weights take under half of the free
    memory, else host memory."""
    if device.type != "cuda":
        return device
    full_fp32_bytes = 4 * builder.model_config(cfg.num_layers).num_parameters
    free, _ = torch.cuda.mem_get_info(device)
    return device if full_fp32_bytes < free / 2 else torch.device("cpu")


def shard_dim(module: nn.Module, leaf: str) -> Optional[int]:
    """The dimension along which AutoTP (or our vocab modules) split this parameter."""
    from deepspeed.module_inject import layers

    if isinstance(module, (VocabParallelEmbedding, VocabParallelLMHead,
                           layers.VocabParallelEmbedding)):
        return 0
    if isinstance(module, layers.LinearAllreduce):       # row-parallel: input features split
        return 1 if leaf == "weight" else None
    if isinstance(module, layers.LinearLayer):           # column-parallel: output features split
        return 0
    return None


def applied_plan(model: nn.Module) -> dict[str, dict[str, str]]:
    """What AutoTP (and our vocab parallelism) did, per module path; one entry stands for every
    layer (``model.layers.*.``)."""
    import re

    def kind(module: nn.Module) -> Optional[str]:
        dim = shard_dim(module, "weight")
        if dim is None:
            return None
        split = "vocab rows" if isinstance(module, (VocabParallelEmbedding, VocabParallelLMHead)) \
            else "input features (row-parallel)" if dim == 1 else "output features (column-parallel)"
        return f"{type(module).__name__}: {split} split over tp"

    root, layer = {}, {}
    for name, module in model.named_modules():
        text = kind(module)
        if text is None:
            continue
        generic = re.sub(r"\.layers\.\d+\.", ".layers.*.", name)
        (layer if generic != name else root)[generic] = text
    return {"root": root, "layer": layer}


def _vocab_parallel_loss(vocab_start: int, tp_group: Any):
    def forward_loss(engine: Any, batch: Batch) -> torch.Tensor:
        logits = engine(input_ids=batch.input_ids, use_cache=False).logits
        return vocab_parallel_causal_cross_entropy(logits, batch.labels, vocab_start, tp_group)

    return forward_loss


def parallelize(model: nn.Module, builder: BaseModelBuilder, mesh: Mesh, cfg: BenchConfig,
                device: torch.device) -> Parallelized:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    tp, tp_group = mesh.dims.tp, mesh.tp_group
    init_device = next(model.parameters()).device   # the exact initial values are drawn here
    vocab_parallel = cfg.use_vocab_parallel and tp > 1
    applied = [f"AutoTP {tp}"]
    if vocab_parallel:
        apply_vocab_parallel(model, builder, tp_group)
        applied.append("vocab parallel (tp_bench VocabParallelEmbedding/LMHead)")
    if cfg.activation_checkpointing:
        model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=deepspeed.checkpointing.checkpoint)
        applied.append("activation checkpointing (deepspeed.checkpointing)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, **{cfg.optimizer_impl: True})
    config = ds_config(cfg, tp)
    _forget_deepspeed_groups()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    model = engine.module
    if compute_policy(cfg.dtype, cfg.autocast) == "cast":
        restore_exact_master_weights(model, builder, cfg, tp_group, init_device)
    applied.append(f"ZeRO {cfg.zero_stage} over dp {mesh.dims.dp}")
    if cfg.compile:
        for layer in builder.get_transformer_layers(model):
            layer.compile()
        # tp_bench's vocabulary-parallel loss is not compiled (its collectives are explicit).
        applied.append("per-layer torch.compile" + ("" if vocab_parallel else " + compiled loss"))
    if (cfg.zero_stage == 0 and cfg.dtype != "float32" and not cfg.autocast and tp > 1
            and cfg.max_grad_norm > 0):
        rank0_print(f"tp_bench: warning: DeepSpeed's {cfg.dtype} optimizer at ZeRO 0 under "
                    f"AutoTP reports a gradient norm below the true one (it counts tp rank 0's "
                    f"gradients only; about 18% low in our parity test), so clipping is weaker "
                    f"than --max_grad_norm asks; ZeRO 1, 2 and 3 are exact")
    forward_loss = (_vocab_parallel_loss(builder.get_lm_head(model).vocab_start, tp_group)
                    if vocab_parallel else causal_lm_loss(compiled=cfg.compile))
    return Parallelized(
        model=model,
        plan=applied_plan(model) if tp > 1 else None,
        techniques=applied,
        settings={"api": AUTOTP_API, "vocab_parallel": vocab_parallel,
                  "zero_stage": cfg.zero_stage,
                  "activation_checkpointing": cfg.activation_checkpointing,
                  "compile": ("per transformer layer" + ("" if vocab_parallel else " + loss"))
                  if cfg.compile else None,
                  "meta_init": False, "build_device": str(init_device),
                  "deepspeed_config": config},
        precision=precision_record(cfg.dtype, cfg.autocast, *_module_precision(cfg), None),
        engine=engine,
        forward_loss=forward_loss)


def _module_precision(cfg: BenchConfig) -> tuple[str, str]:
    """(dtype the module's parameters are stored in, the mechanism)."""
    if cfg.dtype == "float32":
        return "float32", "none"
    if cfg.autocast:
        return "float32", "deepspeed torch_autocast"
    return cfg.dtype, "deepspeed bf16" if cfg.dtype == "bfloat16" else "deepspeed fp16"


class DeepSpeedTrainer(Trainer):
    """DeepSpeed's engine trains: clipping, ZeRO, loss scaling, accumulation are its own."""

    def __init__(self, parallelized: Parallelized, cfg: BenchConfig, mesh: Mesh,
                 device: torch.device):
        self.engine = parallelized.engine
        self.model = parallelized.model
        self.forward_loss = parallelized.forward_loss
        self.cfg = cfg
        self.mesh = mesh
        self.device = device
        self.loss_scaling = ("dynamic" if cfg.dtype == "float16" and not cfg.autocast
                             else None)
        self._micro = 0

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forward_loss(self.engine, batch.to(self.device))

    def backward(self, loss: torch.Tensor) -> None:
        # The engine scales by 1 / gradient_accumulation_steps itself.
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.cfg.gradient_accumulation_steps:
            # DeepSpeed counts micro-batches in step(); off the boundary it does no update.
            self.engine.step()

    def step(self) -> StepStats:
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        # The engine knows whether its optimizer skipped the update (an overflow).
        return StepStats(None if norm is None else float(norm),
                         not self.engine.was_step_applied())

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Each parameter's gradient, assembled over dp (ZeRO) and then over tp."""
        from deepspeed.utils import safe_get_full_grad

        tp_group = self.mesh.tp_group
        grads = {}
        for name, param in self.model.named_parameters():
            grad = safe_get_full_grad(param)
            if grad is None:
                continue
            module_name, _, leaf = name.rpartition(".")
            dim = shard_dim(self.model.get_submodule(module_name), leaf)
            grad = grad.detach().float().clone()  # step() clips .grad in place
            if dim is not None:
                pieces: list = [None] * dist.get_world_size(tp_group)
                dist.all_gather_object(pieces, grad.cpu(), group=tp_group)
                grad = torch.cat(pieces, dim=dim)
            grads[canonical_param_name(name)] = grad
        return grads

    def describe(self) -> dict[str, Any]:
        return {"optimizer": f"torch.optim.AdamW ({self.cfg.optimizer_impl}) under the "
                             f"DeepSpeed engine",
                "grad_clipping": ("deepspeed gradient_clipping" if self.cfg.max_grad_norm > 0
                                  else None)}


# zero_optimization.reduce_bucket_size, DeepSpeed's default: ZeRO 1 and 2 allocate a bucket of
# this many gradient elements at every backward, whatever the model's size.
REDUCE_BUCKET_ELEMENTS = 500_000_000


def memory_layout(cfg: BenchConfig, dims: ParallelDims) -> MemoryLayout:
    """For the memory plan (engine.plan), as DeepSpeed 0.19 holds it (measured, docs/plan.md).

    The module holds its tp shard in the compute dtype ("cast": bf16/fp16) or float32. ZeRO 0
    with a low-precision module is DeepSpeed's FP16_UnfusedOptimizer: whole float32 masters and
    AdamW state, float32 gradients made at the step. ZeRO 1/2 keep the module in one flat
    buffer, float32 master and AdamW state split over dp, the gradients of the parameters in
    this rank's partition (all of them at ZeRO 1 until the reduction, then the partition's),
    and at the step a flat copy of them and its float32 conversion.
    """
    low = 2 if compute_policy(cfg.dtype, cfg.autocast) == "cast" else 4
    vocab_parallel = bool(cfg.use_vocab_parallel) and dims.tp > 1
    common = dict(build="full", vocab_parallel=vocab_parallel,
                  loss="fused" if vocab_parallel else "compiled" if cfg.compile else "hf",
                  lm_head_split=True,
                  logits_gathered=not vocab_parallel)
    if cfg.zero_stage == 0:
        if low == 4:        # the client AdamW on float32 parameters, gradients all-reduced
            return MemoryLayout(params=Held(4), grads=Held(4), optimizer=Held(8),
                                dp_grad_sync="all_reduce", **common)
        # Set-up initializes AdamW's state through float32 (and low-precision) gradients.
        # At the end of backward the gradients are flattened and converted to float32 to be
        # all-reduced (at dp 1 too).
        return MemoryLayout(params=Held(low), grads=Held(low), optimizer=Held(8),
                            master=Held(4), step_extra=(Held(4),),
                            setup_extra=(Held(8), Held(4), Held(low)),
                            sync_extra=(Held(low), Held(low), Held(4)),
                            dp_grad_sync="all_reduce", **common)
    grads = Held(low, FLAT_TOUCHED)
    # The step flattens this rank's gradients and converts the copy to float32 (one copy when
    # they are float32 already).
    step_extra = (Held(low, FLAT), Held(4, FLAT)) if low < 4 else (Held(4, FLAT),)
    return MemoryLayout(
        params=Held(low, FLAT_WHOLE), grads=grads, optimizer=Held(8, FLAT),
        master=Held(4, FLAT), step_extra=step_extra,
        setup_extra=(Held(4, FLAT),),          # zero gradients to initialize AdamW's state
        backward_buffer=REDUCE_BUCKET_ELEMENTS * low,
        sync_extra=(Held(4, FLAT_TOUCHED),),   # the gradients staged in float32
        dp_grad_sync="reduce_scatter", grad_sync_per_micro_batch=cfg.zero_stage == 2,
        dp_param_gather=True, **common)


STRATEGY = Strategy(
    name="autotp",
    parallelize=parallelize,
    trainer=DeepSpeedTrainer,
    options={"zero_stage": (1, 0, 2, 3), "use_vocab_parallel": (True, False),
             "autocast": (False, True), "compile": (False, True),
             "activation_checkpointing": (False, True), "optimizer_impl": ("fused", "foreach")},
    sweep=("compile", "zero_stage", "use_vocab_parallel", "autocast", "optimizer_impl",
           "activation_checkpointing"),
    build_device=build_device,
    environment=lambda: {"autotp_api": AUTOTP_API},
    memory=memory_layout,
)
