"""DeepSpeed AutoTP over "tp" + a DeepSpeed engine with ZeRO 0-2 over "dp".

API: the configuration route DeepSpeed documents for training since 0.16/0.17,
``deepspeed.initialize(config={"tensor_parallel": {"autotp_size": tp}, ...})``; AutoTP shards the
model inside ``initialize``. (``deepspeed.tp_model_init`` only records arguments for that same
path in current releases, so it is not called.) DeepSpeed builds its own (data_parallel,
tensor_parallel) groups with tp innermost, which is the layout of our ("dp", "tp") mesh: TP
groups are rows of consecutive ranks, DP groups are columns (checked by a test).

Set-up, in order: build the full model and initialize it (``builder.init_weights``, the same
values as every strategy) -> vocabulary parallelism (``--use_vocab_parallel``: our
``VocabParallelEmbedding`` and a vocab-sharded lm_head whose logits stay sharded, loss by
``vocab_parallel_causal_cross_entropy``) -> activation checkpointing (HuggingFace's per-layer
hook with ``deepspeed.checkpointing.checkpoint``) -> ``deepspeed.initialize`` (AutoTP sharding,
bf16/fp16 or torch_autocast, ZeRO, clipping, accumulation) -> per-layer ``torch.compile``.

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

from tp_bench.data import Batch
from tp_bench.models.base import BaseModelBuilder, canonical_param_name
from tp_bench.parallel.base import BaseTPStrategy, compute_policy, precision_record
from tp_bench.parallel.factory import register_strategy
from tp_bench.parallel.vocab_parallel import (VocabParallelEmbedding, VocabParallelLMHead,
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


def ds_config(cfg, tp: int) -> dict[str, Any]:
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


def restore_exact_master_weights(model: nn.Module, builder: BaseModelBuilder, cfg,
                                 tp_group, build_device: torch.device) -> int:
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
        if not hasattr(param, "_hp_mapping"):   # no master copy (e.g. float32 at ZeRO 0)
            continue
        module_name, _, leaf = name.rpartition(".")
        dim = AutoTPStrategy._shard_dim(model.get_submodule(module_name), leaf)
        full = builder.initial_value(unsharded, canonical_param_name(name), cfg.seed,
                                     build_device).to(param.device)
        shard = full if dim is None else torch.chunk(full, tp, dim=dim)[tp_rank]
        if shard.shape != param.shape or not torch.equal(shard.to(param.dtype), param.detach()):
            raise RuntimeError(f"autotp: cannot match {name} {tuple(param.shape)} to its initial "
                               f"value; DeepSpeed sharded it in an unexpected way")
        safe_set_full_fp32_param(param, shard)
        restored += 1
    return restored


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


def _build_device(builder: BaseModelBuilder, cfg, device: torch.device) -> torch.device:
    if device.type != "cuda":
        return device
    full_fp32_bytes = 4 * builder.model_config(cfg.num_layers).num_parameters
    free, _ = torch.cuda.mem_get_info(device)
    return device if full_fp32_bytes < free / 2 else torch.device("cpu")


@register_strategy("autotp")
class AutoTPStrategy(BaseTPStrategy):
    def setup(self) -> None:
        cfg, builder = self.cfg, self.builder
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        import deepspeed

        tp = self.mesh["tp"].size()
        self.tp_group = self.mesh["tp"].get_group()
        self.vocab_parallel = cfg.use_vocab_parallel and tp > 1
        self.build_device = _build_device(builder, cfg, self.device)
        model = builder.create_model(self.build_device, torch.float32, num_layers=cfg.num_layers,
                                     attn_impl=cfg.attn_impl)
        builder.init_weights(model, cfg.seed)
        applied = [f"AutoTP {tp}"]
        if self.vocab_parallel:
            apply_vocab_parallel(model, builder, self.tp_group)
            applied.append("vocab parallel (tp_bench VocabParallelEmbedding/LMHead)")
        if cfg.activation_checkpointing:
            model._set_gradient_checkpointing(
                enable=True, gradient_checkpointing_func=deepspeed.checkpointing.checkpoint)
            applied.append("activation checkpointing (deepspeed.checkpointing)")
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay,
                                      **{cfg.optimizer_impl: True})
        self.ds_config = ds_config(cfg, tp)
        _forget_deepspeed_groups()
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=self.ds_config)
        self.engine.train()
        self.model = self.engine.module
        if compute_policy(cfg.dtype, cfg.autocast) == "cast":
            restore_exact_master_weights(self.model, builder, cfg, self.tp_group,
                                         self.build_device)
        applied.append(f"ZeRO {cfg.zero_stage} over dp {self.mesh['dp'].size()}")
        if cfg.compile:
            for layer in builder.get_transformer_layers(self.model):
                layer.compile()
            applied.append("per-layer torch.compile")
        if self.vocab_parallel:
            self.vocab_start = builder.get_lm_head(self.model).vocab_start
        log.info("autotp: %s", ", ".join(applied))
        if (cfg.zero_stage == 0 and cfg.dtype == "bfloat16" and not cfg.autocast and tp > 1
                and cfg.max_grad_norm > 0):
            from tp_bench.distributed import rank0_print

            rank0_print("tp_bench: warning: DeepSpeed's bf16 optimizer at ZeRO 0 under AutoTP "
                        "reports a gradient norm below the true one (about 18% low in our parity "
                        "test), so clipping is weaker than --max_grad_norm asks; ZeRO 1 and 2 "
                        "are exact")

    def forward(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device)
        if not self.vocab_parallel:
            return self.engine(input_ids=batch.input_ids, labels=batch.labels,
                               use_cache=False).loss
        logits = self.engine(input_ids=batch.input_ids, use_cache=False).logits
        return vocab_parallel_causal_cross_entropy(logits, batch.labels, self.vocab_start,
                                                   self.tp_group)

    def backward(self, loss: torch.Tensor) -> None:
        # The engine scales by 1 / gradient_accumulation_steps itself.
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.cfg.gradient_accumulation_steps:
            # DeepSpeed counts micro-batches in step(); off the boundary it does no update.
            self.engine.step()

    def step(self) -> Optional[torch.Tensor]:
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Each parameter's gradient, assembled over dp (ZeRO) and then over tp."""
        from deepspeed.utils import safe_get_full_grad

        grads = {}
        for name, param in self.model.named_parameters():
            grad = safe_get_full_grad(param)
            if grad is None:
                continue
            module_name = name.rpartition(".")[0]
            dim = self._shard_dim(self.model.get_submodule(module_name), name.rpartition(".")[2])
            grad = grad.detach().float().clone()  # step() clips .grad in place
            if dim is not None:
                pieces: list = [None] * dist.get_world_size(self.tp_group)
                dist.all_gather_object(pieces, grad.cpu(), group=self.tp_group)
                grad = torch.cat(pieces, dim=dim)
            grads[canonical_param_name(name)] = grad
        return grads

    @staticmethod
    def _shard_dim(module: nn.Module, leaf: str) -> Optional[int]:
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

    def precision_policy(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.dtype == "float32":
            mechanism, module_dtype = "none", "float32"
        elif cfg.autocast:
            mechanism, module_dtype = "deepspeed torch_autocast", "float32"
        else:
            mechanism = "deepspeed bf16" if cfg.dtype == "bfloat16" else "deepspeed fp16"
            module_dtype = cfg.dtype
        return precision_record(cfg, module_dtype, mechanism, "dynamic" if cfg.dtype == "float16"
                                and not cfg.autocast else None)

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        sharded = sorted({type(m).__name__ for m in self.model.modules()
                          if self._shard_dim(m, "weight") is not None})
        return {
            "impl": self.name,
            "api": AUTOTP_API,
            "sharded_module_types": sharded,
            "vocab_parallel": self.vocab_parallel,
            "zero_stage": cfg.zero_stage,
            "optimizer": f"torch.optim.AdamW ({cfg.optimizer_impl}) under the DeepSpeed engine",
            "grad_clipping": "deepspeed gradient_clipping" if cfg.max_grad_norm > 0 else None,
            "activation_checkpointing": cfg.activation_checkpointing,
            "compile": "per transformer layer" if cfg.compile else None,
            "meta_init": False,
            "build_device": str(self.build_device),
            "deepspeed_config": self.ds_config,
        }

    def environment(self) -> dict[str, Any]:
        return {"autotp_api": AUTOTP_API}
