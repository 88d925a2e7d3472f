"""PyTorch FSDP2 (``fully_shard``) over "dp" + DTensor tensor parallelism over "tp".

``setup`` composes small steps in a fixed order, as torchtitan does:
build (meta device) -> TP plan -> activation checkpointing -> per-layer compile -> FSDP ->
materialize this rank's shards and initialize them.

Techniques, each an option recorded in the result:
- TP plan per layer from the model builder (q/k/v and gate/up colwise, o and down rowwise, plus
  whatever else the model needs, e.g. Qwen3's q/k norms).
- Vocabulary parallelism (``--use_vocab_parallel``): embedding rowwise (vocab-sharded), lm_head
  colwise with logits left sharded, cross-entropy under ``loss_parallel`` (no rank ever holds the
  full [tokens, vocab] logits).
- Sequence parallelism (``--sequence_parallel``): norms and the residual stream sharded on the
  sequence dim; the blocks all-gather it and the row-parallel outputs reduce-scatter it back.
- FSDP2 over "dp" when dp > 1, and at dp = 1 only where it is the precision mechanism (the
  default bf16/fp16 policy below); with ``--autocast`` or float32 it would only add copies
  there, unless ``--fsdp_at_dp1``.

Precision (``parallel.base.compute_policy``; the default is AutoTP's): parameters and
optimizer state in float32 (master weights), gradients reduced in float32. Default ("cast"):
FSDP2's MixedPrecisionPolicy casts every parameter to ``--dtype`` for compute, as DeepSpeed's
bf16 mode does; ``--autocast``: torch.autocast on float32 parameters. Pure-bf16 parameters
with AdamW at lr 1e-5 would silently stop learning (the updates round away), so they are not
offered.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch
from torch import nn

from tp_bench.data import Batch
from tp_bench.models.base import BaseModelBuilder, canonical_param_name
from tp_bench.parallel.base import BaseTPStrategy, precision_record
from tp_bench.parallel.factory import register_strategy
from tp_bench.parallel.grad_norm import clip_grad_norm_

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
log = logging.getLogger(__name__)


def apply_tp(model: nn.Module, builder: BaseModelBuilder, tp_mesh, vocab_parallel: bool,
             sequence_parallel: bool) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    layer_plan = builder.get_tp_mapping()
    if sequence_parallel:
        layer_plan.update(builder.get_sequence_parallel_mapping())
    for layer in builder.get_transformer_layers(model):
        parallelize_module(layer, tp_mesh, layer_plan)

    # The residual stream outside the layers: sharded on the sequence dim with SP, else replicated.
    stream = Shard(1) if sequence_parallel else Replicate()
    embedding, lm_head = builder.get_embedding_module(model), builder.get_lm_head(model)
    tied = embedding.weight is lm_head.weight
    if vocab_parallel:
        parallelize_module(embedding, tp_mesh, RowwiseParallel(
            input_layouts=Replicate(), output_layouts=stream, use_local_output=not sequence_parallel))
    elif sequence_parallel:
        # Replicated embedding; each rank keeps its own sequence shard of the output.
        parallelize_module(embedding, tp_mesh, PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=False))
    if sequence_parallel:
        parallelize_module(builder.get_final_norm(model), tp_mesh, SequenceParallel())
    if vocab_parallel:
        parallelize_module(lm_head, tp_mesh, ColwiseParallel(
            input_layouts=stream, output_layouts=Shard(-1), use_local_output=False))
    elif sequence_parallel:
        # Full logits on every rank from a replicated lm_head: gather the sequence first.
        parallelize_module(lm_head, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    if tied and vocab_parallel:
        # parallelize_module swapped in a new parameter on each module: tie them again
        # (both are sharded on the vocab dim, Shard(0), so one parameter serves both).
        lm_head.weight = embedding.weight


def retie_embeddings(model: nn.Module, builder: BaseModelBuilder, tied: bool) -> None:
    """``to_empty`` gives every module its own new parameter, so a meta-built model with tied
    embeddings comes out with an lm_head that no longer shares the embedding's weight (a
    different, larger model, silently). Tie them again."""
    embedding, lm_head = builder.get_embedding_module(model), builder.get_lm_head(model)
    if tied and lm_head.weight is not embedding.weight:
        lm_head.weight = embedding.weight


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, layer in enumerate(layers):
        # Wrap before FSDP so FSDP's all-gather hooks sit outside the recomputed region.
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_compile(layers: nn.ModuleList) -> None:
    # Per block, in place (parameter names unchanged), before FSDP so its hooks stay outside
    # the compiled graph. All layers share one graph: module parameters are graph inputs.
    for layer in layers:
        layer.compile()


def apply_fsdp(model: nn.Module, layers: nn.ModuleList, dp_mesh, mp_policy) -> None:
    from torch.distributed.fsdp import fully_shard

    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again first in backward: keep them gathered.
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy)


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DTensor and plain parameters in separate groups: the fused and foreach kernels take one
    kind per call, and without FSDP a TP model holds both (replicated norms stay plain)."""
    from torch.distributed.tensor import DTensor

    groups: dict[bool, list] = {}
    for p in model.parameters():
        groups.setdefault(isinstance(p, DTensor), []).append(p)
    return [{"params": params} for params in groups.values()]


class DynamicLossScaler:
    """float16 loss scaling. The overflow check reads the grad norm on the host once a step,
    which is the price of float16 here; bfloat16 needs no scaling."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 1000):
        self.scale = init_scale
        self.growth_interval = growth_interval
        self._good_steps = 0

    def update(self, grad_norm: torch.Tensor) -> bool:
        """Return True if the step may proceed; adjust the scale."""
        if not torch.isfinite(grad_norm).item():
            self.scale /= 2.0
            self._good_steps = 0
            return False
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0:
            self.scale *= 2.0
        return True


@register_strategy("fsdp_dtensor")
class FSDPDTensorStrategy(BaseTPStrategy):
    def setup(self) -> None:
        cfg, builder = self.cfg, self.builder
        self.compute_dtype = DTYPES[cfg.dtype]
        tp = self.mesh["tp"].size()
        self.vocab_parallel = cfg.use_vocab_parallel and tp > 1
        self.sequence_parallel = cfg.sequence_parallel and tp > 1
        # FSDP2 is the mechanism that casts parameters to the compute dtype (the default
        # policy), so it stays on at dp 1 then; with autocast or float32 it would only copy.
        casts_params = cfg.dtype != "float32" and not cfg.autocast
        self.use_fsdp = self.mesh["dp"].size() > 1 or cfg.fsdp_at_dp1 or casts_params

        model = builder.create_model("meta" if cfg.meta_init else self.device, torch.float32,
                                     num_layers=cfg.num_layers, attn_impl=cfg.attn_impl)
        if not cfg.meta_init:
            builder.init_weights(model, cfg.seed)   # full values first, then sharded copies
        layers = builder.get_transformer_layers(model)
        tied = builder.get_embedding_module(model).weight is builder.get_lm_head(model).weight
        applied = []
        if tp > 1:
            apply_tp(model, builder, self.mesh["tp"], self.vocab_parallel, self.sequence_parallel)
            applied.append(f"TP {tp}" + (" + vocab/loss parallel" if self.vocab_parallel else "")
                           + (" + sequence parallel" if self.sequence_parallel else ""))
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(layers)
            applied.append("activation checkpointing")
        if cfg.compile:
            apply_compile(layers)
            applied.append("per-layer torch.compile")
        if self.use_fsdp:
            apply_fsdp(model, layers, self.mesh["dp"], self._mp_policy())
            applied.append(f"FSDP2 over dp {self.mesh['dp'].size()}")
        if cfg.meta_init:
            model.to_empty(device=self.device)
            retie_embeddings(model, builder, tied)
            builder.init_weights(model, cfg.seed)  # each rank fills only its own shards
            applied.append("meta-device init")
        log.info("fsdp_dtensor: %s", ", ".join(applied) or "plain model")
        self.model = model
        self.optimizer = torch.optim.AdamW(_param_groups(model), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay,
                                           **{cfg.optimizer_impl: True})
        self.scaler = DynamicLossScaler() if cfg.dtype == "float16" else None

    def _mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self._uses_autocast or self.cfg.dtype == "float32":
            return MixedPrecisionPolicy(reduce_dtype=torch.float32)
        return MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)

    @property
    def _uses_autocast(self) -> bool:
        return self.cfg.dtype != "float32" and self.cfg.autocast

    def _context(self):
        """Forward and backward run inside this: autocast and/or loss parallelism."""
        stack = contextlib.ExitStack()
        if self._uses_autocast:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.compute_dtype))
        if self.vocab_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            stack.enter_context(loss_parallel())
        return stack

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.use_fsdp and self.cfg.gradient_accumulation_steps > 1:
            # Reduce-scatter gradients only once per accumulation cycle.
            self.model.set_requires_gradient_sync(self.is_last_micro)
        batch = batch.to(self.device)
        with self._context():
            loss = self.model(input_ids=batch.input_ids, labels=batch.labels, use_cache=False).loss
        # With sharded logits the loss is a replicated DTensor; every rank holds the value.
        return loss.to_local() if hasattr(loss, "to_local") else loss

    def backward(self, loss: torch.Tensor) -> None:
        scale = self.scaler.scale if self.scaler else 1.0
        with self._context():
            (loss * (scale / self.cfg.gradient_accumulation_steps)).backward()
        self._micro += 1

    def step(self) -> Optional[torch.Tensor]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler:
            torch._foreach_mul_([p.grad for p in params], 1.0 / self.scaler.scale)
        grad_norm = clip_grad_norm_(params, self.cfg.max_grad_norm)
        if self.scaler is None or self.scaler.update(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        return grad_norm

    def full_gradients(self) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        scale = self.scaler.scale if self.scaler else 1.0
        return {canonical_param_name(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor)
                                          else p.grad) / scale
                for n, p in self.model.named_parameters() if p.grad is not None}

    def precision_policy(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.dtype == "float32":
            mechanism = "none"
        elif self._uses_autocast:
            mechanism = "torch.autocast"
        else:
            mechanism = "fsdp2_mixed_precision"
        return precision_record(cfg, "float32", mechanism,
                                "dynamic" if self.scaler else None)

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "impl": self.name,
            "tp_plan": ({k: type(v).__name__ for k, v in self.builder.get_tp_mapping().items()}
                        if self.mesh["tp"].size() > 1 else None),
            "vocab_parallel": self.vocab_parallel,
            "sequence_parallel": self.sequence_parallel,
            "fsdp": "fully_shard per layer + root over dp" if self.use_fsdp else None,
            "optimizer": f"torch.optim.AdamW ({cfg.optimizer_impl})",
            "grad_clipping": "per-mesh norm groups" if cfg.max_grad_norm > 0 else None,
            "activation_checkpointing": cfg.activation_checkpointing,
            "compile": "per transformer layer" if cfg.compile else None,
            "meta_init": cfg.meta_init,
        }
