"""The steps a DTensor stack composes, in torchtitan's order: TP plan -> activation
checkpointing -> per-layer compile -> FSDP2. Each is one small function."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tp_bench.core.config import BenchConfig
from tp_bench.core.precision import TORCH_DTYPES, compute_policy, precision_record
from tp_bench.models.base import BaseModelBuilder
from tp_bench.models.tp_plan import TPPlan


def apply_tp_plan(model: nn.Module, plan: TPPlan, tp_mesh: Any, builder: BaseModelBuilder) -> None:
    """Two calls: the root plan on the model, the layer plan on every layer."""
    from torch.distributed.tensor.parallel import parallelize_module

    embedding, lm_head = builder.get_embedding_module(model), builder.get_lm_head(model)
    tied = embedding.weight is lm_head.weight
    parallelize_module(model, tp_mesh, plan.root)
    for layer in builder.get_transformer_layers(model):
        parallelize_module(layer, tp_mesh, plan.layer)
    embedding, lm_head = builder.get_embedding_module(model), builder.get_lm_head(model)
    if tied and lm_head.weight is not embedding.weight:
        # parallelize_module swapped in a new parameter on each module: tie them again (both
        # are sharded on the vocab dim, Shard(0), so one parameter serves both).
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


def mixed_precision_policy(dtype: str, autocast: bool) -> Any:
    """FSDP2's policy: parameters cast to the compute dtype under the "cast" policy; gradients
    reduced in float32 always."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_policy(dtype, autocast) == "cast":
        return MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[dtype], reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(reduce_dtype=torch.float32)


def fsdp_precision(cfg: BenchConfig) -> dict[str, Any]:
    """The precision record of a stack whose parameters stay float32 and whose "cast" policy is
    FSDP2's MixedPrecisionPolicy (``mixed_precision_policy``)."""
    mechanism = {"none": "none", "autocast": "torch.autocast",
                 "cast": "fsdp2_mixed_precision"}[compute_policy(cfg.dtype, cfg.autocast)]
    return precision_record(cfg.dtype, cfg.autocast, "float32", mechanism, None)


def apply_fsdp(model: nn.Module, layers: nn.ModuleList, dp_mesh: Any, mp_policy: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again first in backward: keep them gathered.
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy)


def loss_parallel_context() -> Any:
    """Cross-entropy over vocabulary-sharded DTensor logits, without gathering them."""
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
