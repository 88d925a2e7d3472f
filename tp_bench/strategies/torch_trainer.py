"""The torch-native trainer every DTensor stack shares: AdamW (fused or foreach), clipping over
parameters on different meshes, float16 loss scaling, the autocast policy and gradient
accumulation (with FSDP2's gradient sync only on the last micro-batch)."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from tp_bench.core.config import BenchConfig
from tp_bench.core.data import Batch
from tp_bench.core.dims import Mesh
from tp_bench.core.precision import TORCH_DTYPES, compute_policy
from tp_bench.models.base import canonical_param_name
from tp_bench.models.fused_qkv import QKVProjection, split_fused_gradients
from tp_bench.strategies.base import Parallelized, StepStats, Trainer
from tp_bench.strategies.grad_norm import clip_grad_norm_


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
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


class TorchTrainer(Trainer):
    def __init__(self, parallelized: Parallelized, cfg: BenchConfig, mesh: Mesh,
                 device: torch.device):
        from torch.distributed.fsdp import FSDPModule

        self.model = parallelized.model
        self.cfg = cfg
        self.device = device
        self.forward_loss = parallelized.forward_loss
        self.contexts = list(parallelized.contexts)
        if compute_policy(cfg.dtype, cfg.autocast) == "autocast":
            self.contexts.append(lambda: torch.autocast(device.type,
                                                        dtype=TORCH_DTYPES[cfg.dtype]))
        self.fsdp = isinstance(self.model, FSDPModule)
        self.optimizer = torch.optim.AdamW(param_groups(self.model), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay,
                                           **{cfg.optimizer_impl: True})
        self.scaler = DynamicLossScaler() if cfg.dtype == "float16" else None
        self.loss_scaling = "dynamic" if self.scaler else None
        self._micro = 0               # micro-batches since the last optimizer step

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for make in self.contexts:
            stack.enter_context(make())
        return stack

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.fsdp and self.cfg.gradient_accumulation_steps > 1:
            # Reduce-scatter gradients only once per accumulation cycle.
            last = self._micro == self.cfg.gradient_accumulation_steps - 1
            self.model.set_requires_gradient_sync(last)
        batch = batch.to(self.device)
        with self._context():
            loss = self.forward_loss(self.model, batch)
        # With sharded logits the loss is a replicated DTensor; every rank holds the value.
        return loss.to_local() if hasattr(loss, "to_local") else loss

    def backward(self, loss: torch.Tensor) -> None:
        scale = self.scaler.scale if self.scaler else 1.0
        with self._context():
            (loss * (scale / self.cfg.gradient_accumulation_steps)).backward()
        self._micro += 1

    def step(self) -> StepStats:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler:
            torch._foreach_mul_([p.grad for p in params], 1.0 / self.scaler.scale)
        grad_norm = clip_grad_norm_(params, self.cfg.max_grad_norm)
        skipped: Optional[bool] = None
        if self.scaler is not None:
            skipped = not self.scaler.update(grad_norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        return StepStats(grad_norm, skipped)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        scale = self.scaler.scale if self.scaler else 1.0
        grads = {canonical_param_name(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor)
                                           else p.grad) / scale
                 for n, p in self.model.named_parameters() if p.grad is not None}
        fused = {canonical_param_name(n): m for n, m in self.model.named_modules()
                 if isinstance(m, QKVProjection)}
        return split_fused_gradients(fused, grads) if fused else grads

    def describe(self) -> dict[str, Any]:
        return {"optimizer": f"torch.optim.AdamW ({self.cfg.optimizer_impl})",
                "grad_clipping": "per-mesh norm groups" if self.cfg.max_grad_norm > 0 else None}
