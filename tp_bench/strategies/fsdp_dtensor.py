"""PyTorch FSDP2 (``fully_shard``) over "dp" + DTensor tensor parallelism over "tp".

``parallelize`` composes the DTensor steps in torchtitan's order: fused q/k/v (``--fused_qkv``,
models.fused_qkv) -> TP plan (the model family's, as data) -> activation checkpointing ->
per-layer compile -> FSDP2. The engine builds the model
on the meta device first (``--meta_init``) and materializes this rank's shards afterwards.

- Vocabulary parallelism: embedding rowwise (vocab-sharded), lm_head colwise with logits left
  sharded, cross-entropy under ``loss_parallel`` (no rank ever holds the full logits).
- Sequence parallelism: norms and the residual stream sharded on the sequence dim; the blocks
  all-gather it and the row-parallel outputs reduce-scatter it back.
- FSDP2 over "dp" when dp > 1, and at dp = 1 only where it is the precision mechanism (the
  default "cast" policy: FSDP2's MixedPrecisionPolicy casts every parameter to ``--dtype`` for
  compute, as DeepSpeed's bf16 mode does); with ``--autocast`` or float32 it would only add
  copies there, unless ``--fsdp_at_dp1``.

Parameters and optimizer state stay float32 (master weights), gradients are reduced in float32.
Pure-bf16 parameters with AdamW at lr 1e-5 would silently stop learning (the updates round away),
so they are not offered. Training is the shared TorchTrainer.
"""

from __future__ import annotations

import torch
from torch import nn

from tp_bench.core.config import BenchConfig
from tp_bench.core.dims import Mesh, ParallelDims
from tp_bench.core.precision import compute_policy
from tp_bench.models.base import BaseModelBuilder
from tp_bench.models.fused_qkv import fuse_qkv, fused_plan
from tp_bench.strategies.base import Parallelized, Strategy
from tp_bench.strategies.causal_loss import causal_lm_loss
from tp_bench.strategies.memory import PER_PARAM, Held, MemoryLayout
from tp_bench.strategies.dtensor_steps import (apply_activation_checkpointing, apply_compile,
                                               apply_fsdp, apply_tp_plan, fsdp_precision,
                                               loss_parallel_context, mixed_precision_policy)
from tp_bench.strategies.torch_trainer import TorchTrainer


def uses_fsdp(cfg: BenchConfig, dims: ParallelDims) -> bool:
    return dims.dp > 1 or bool(cfg.fsdp_at_dp1) or compute_policy(cfg.dtype, cfg.autocast) == "cast"


def compiles_loss(cfg: BenchConfig, dims: ParallelDims) -> bool:
    """--compile compiles the loss too, but not over vocabulary-sharded logits: compiled under
    ``loss_parallel`` the cross-entropy comes out per shard (0.58 instead of 9.04 in the tp=2
    parity test, torch 2.13); the loss-parallel loss never holds whole logits anyway."""
    return bool(cfg.compile) and not (cfg.use_vocab_parallel and dims.tp > 1)


def parallelize(model: nn.Module, builder: BaseModelBuilder, mesh: Mesh, cfg: BenchConfig,
                device: torch.device) -> Parallelized:
    dims = mesh.dims
    vocab_parallel = cfg.use_vocab_parallel and dims.tp > 1
    sequence_parallel = cfg.sequence_parallel and dims.tp > 1
    use_fsdp = uses_fsdp(cfg, dims)
    compile_loss = compiles_loss(cfg, dims)
    layers = builder.get_transformer_layers(model)
    applied, plan = [], None
    if cfg.fused_qkv:
        fuse_qkv(model)
        applied.append("fused q/k/v")
    if dims.tp > 1:
        plan = builder.tp_plan(vocab_parallel, sequence_parallel)
        if cfg.fused_qkv:
            plan = fused_plan(plan)
        apply_tp_plan(model, plan, mesh.tp_mesh, builder)
        applied.append(f"TP {dims.tp}" + (" + vocab/loss parallel" if vocab_parallel else "")
                       + (" + sequence parallel" if sequence_parallel else ""))
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(layers)
        applied.append("activation checkpointing")
    if cfg.compile:
        apply_compile(layers)
        applied.append("per-layer torch.compile" + (" + compiled loss" if compile_loss else ""))
    if use_fsdp:
        apply_fsdp(model, layers, mesh.fsdp_mesh, mixed_precision_policy(cfg.dtype, cfg.autocast))
        applied.append(f"HSDP over dp {dims.dp_replicate} x {dims.dp_shard}" if dims.dp_replicate > 1
                       else f"FSDP2 over dp {dims.dp}")
    return Parallelized(
        model=model,
        plan=plan.describe() if plan else None,
        techniques=applied,
        settings={"vocab_parallel": vocab_parallel, "sequence_parallel": sequence_parallel,
                  "fsdp": (None if not use_fsdp else "fully_shard per layer + root over dp"
                           + (f" (HSDP: replicate {dims.dp_replicate} x shard {dims.dp_shard})"
                              if dims.dp_replicate > 1 else "")),
                  "activation_checkpointing": cfg.activation_checkpointing,
                  "compile": ("per transformer layer" + (" + loss" if compile_loss else ""))
                  if cfg.compile else None,
                  "meta_init": cfg.meta_init, "fused_qkv": cfg.fused_qkv},
        precision=fsdp_precision(cfg),
        forward_loss=causal_lm_loss(compiled=compile_loss),
        contexts=(loss_parallel_context,) if vocab_parallel else ())


def memory_layout(cfg: BenchConfig, dims: ParallelDims) -> MemoryLayout:
    """For the memory plan (engine.plan): float32 parameters, gradients and AdamW state, each
    parameter split over dp by FSDP2; the compute copies FSDP2 gathers (bf16 under "cast")."""
    split = PER_PARAM if uses_fsdp(cfg, dims) else None
    cast = compute_policy(cfg.dtype, cfg.autocast) == "cast"
    return MemoryLayout(
        params=Held(4, split), grads=Held(4, split), optimizer=Held(8, split),
        gathered=(2 if cast else 4) if split else 0,
        build="meta" if cfg.meta_init else "full",
        loss="compiled" if compiles_loss(cfg, dims) else "hf",
        sequence_parallel=bool(cfg.sequence_parallel) and dims.tp > 1,
        vocab_parallel=bool(cfg.use_vocab_parallel) and dims.tp > 1)


_TECHNIQUES = {
    "autocast": (False, True),
    "compile": (False, True),
    "activation_checkpointing": (False, True),
    "optimizer_impl": ("fused", "foreach"),
}

STRATEGY = Strategy(
    name="fsdp_dtensor",
    parallelize=parallelize,
    trainer=TorchTrainer,
    options={"use_vocab_parallel": (True, False), "sequence_parallel": (True, False),
             "meta_init": (True, False), "fsdp_at_dp1": (False, True),
             "fused_qkv": (True, False), **_TECHNIQUES},
    sweep=("autocast", "compile", "fused_qkv", "sequence_parallel", "use_vocab_parallel",
           "activation_checkpointing", "optimizer_impl"),
    takes=frozenset({"dp_replicate"}),
    memory=memory_layout,
)
