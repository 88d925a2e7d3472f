"""PyTorch FSDP2 (``fully_shard``) over "dp" + DTensor tensor parallelism over "tp".

``parallelize`` composes small steps in a fixed order, as torchtitan does:
TP plan -> activation checkpointing -> FSDP (per transformer layer, then the root).

Precision (the default matches AutoTP's): parameters and optimizer state in float32 (master
weights); FSDP2's MixedPrecisionPolicy casts the all-gathered parameters to ``--dtype`` for
compute and reduces gradients in float32. Pure-bf16 parameters with AdamW at lr 1e-5 would
silently stop learning (the updates round away), so they are not offered.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from tp_bench.data import Batch
from tp_bench.models.base import canonical_param_name
from tp_bench.parallel.base import BaseTPStrategy
from tp_bench.parallel.factory import register_strategy
from tp_bench.parallel.grad_norm import clip_grad_norm_

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def apply_tp(layers: nn.ModuleList, tp_mesh, plan: dict[str, Any]) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    for layer in layers:
        parallelize_module(layer, tp_mesh, plan)


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, layer in enumerate(layers):
        # Wrap before FSDP so FSDP's all-gather hooks sit outside the recomputed region.
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_fsdp(model: nn.Module, layers: nn.ModuleList, dp_mesh, mp_policy) -> None:
    from torch.distributed.fsdp import fully_shard

    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again first in backward: keep them gathered.
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy)


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
        cfg = self.cfg
        self.compute_dtype = DTYPES[cfg.dtype]
        model = self.builder.create_model(self.device, torch.float32, num_layers=cfg.num_layers,
                                          attn_impl=cfg.attn_impl)
        self.builder.init_weights(model, cfg.seed)
        layers = self.builder.get_transformer_layers(model)
        if self.mesh["tp"].size() > 1:
            apply_tp(layers, self.mesh["tp"], self.builder.get_tp_mapping())
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(layers)
        apply_fsdp(model, layers, self.mesh["dp"], self._mp_policy())
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay,
                                           foreach=self.device.type == "cuda")
        self.scaler = DynamicLossScaler() if self._fp16_scaling else None

    @property
    def _fp16_scaling(self) -> bool:
        return self.cfg.dtype == "float16"

    def _mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.cfg.dtype == "float32" or self.cfg.autocast:
            return MixedPrecisionPolicy(reduce_dtype=torch.float32)
        return MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)

    def _autocast(self):
        if self.cfg.autocast and self.cfg.dtype != "float32":
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.cfg.gradient_accumulation_steps > 1:
            # Reduce-scatter gradients only once per accumulation cycle.
            self.model.set_requires_gradient_sync(self.is_last_micro)
        batch = batch.to(self.device)
        with self._autocast():
            out = self.model(input_ids=batch.input_ids, labels=batch.labels, use_cache=False)
        return out.loss

    def backward(self, loss: torch.Tensor) -> None:
        scale = self.scaler.scale if self.scaler else 1.0
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
        elif cfg.autocast:
            mechanism = "torch.autocast"
        else:
            mechanism = "fsdp2_mixed_precision"
        return {
            "param_dtype": "float32",
            "master_weights": "float32",
            "optimizer_state_dtype": "float32",
            "compute_dtype": cfg.dtype,
            "grad_reduce_dtype": "float32",
            "mechanism": mechanism,
            "loss_scaling": "dynamic" if self._fp16_scaling else None,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "impl": self.name,
            "tp_plan": {k: type(v).__name__ for k, v in self.builder.get_tp_mapping().items()},
            "fsdp": "fully_shard per layer + root over dp",
            "optimizer": "torch.optim.AdamW",
            "grad_clipping": "per-mesh norm groups" if self.cfg.max_grad_norm > 0 else None,
            "activation_checkpointing": self.cfg.activation_checkpointing,
        }
