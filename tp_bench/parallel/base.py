"""The strategy interface: everything framework-specific about one TP implementation.

The runner owns timing and records; a strategy owns wrapping, the optimizer, precision,
clipping, gradient accumulation and the loss. Nothing outside a strategy branches on ``impl``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import nn

from tp_bench.config import BenchConfig
from tp_bench.data import Batch
from tp_bench.models.base import BaseModelBuilder


def compute_policy(dtype: str, autocast: bool) -> str:
    """How ``--dtype`` is applied; every strategy (and the parity reference) implements the same:

    "cast"      every parameter, norms and embeddings too, is used in ``dtype`` for compute (a
                copy of the float32 master weights that the optimizer updates); the residual
                stream is in ``dtype``. DeepSpeed's bf16 mode, FSDP2's MixedPrecisionPolicy.
    "autocast"  float32 parameters; torch.autocast casts matmul inputs, while norms, embedding
                lookups and the residual stream stay float32.
    "none"      float32 throughout.

    The two mixed policies compute different things (a bf16 norm weight of 1.0 moves only once
    its fp32 master has drifted half a bf16 step), so runs of different policies are never
    ranked against each other.
    """
    if dtype == "float32":
        return "none"
    return "autocast" if autocast else "cast"


def precision_record(cfg: BenchConfig, param_dtype: str, mechanism: str,
                     loss_scaling: Optional[str]) -> dict[str, Any]:
    """The result's ``precision`` block, the same keys for every strategy: master weights,
    AdamW state and gradient reduction are float32 in every policy."""
    return {
        "param_dtype": param_dtype,           # what the module's parameters are stored as
        "master_weights": "float32",
        "optimizer_state_dtype": "float32",
        "compute_dtype": cfg.dtype,
        "grad_reduce_dtype": "float32",
        "policy": compute_policy(cfg.dtype, cfg.autocast),
        "mechanism": mechanism,
        "loss_scaling": loss_scaling,
    }


class BaseTPStrategy(ABC):
    name: str = ""

    def __init__(self, cfg: BenchConfig, builder: BaseModelBuilder, mesh, device: torch.device):
        self.cfg = cfg
        self.builder = builder
        self.mesh = mesh              # DeviceMesh ("dp", "tp")
        self.device = device
        self.model: Optional[nn.Module] = None
        self._micro = 0               # micro-batches since the last optimizer step

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")

    @property
    def is_last_micro(self) -> bool:
        """True while running the micro-batch that completes a gradient accumulation cycle."""
        return self._micro == self.cfg.gradient_accumulation_steps - 1

    @abstractmethod
    def setup(self) -> None:
        """Build the model (random init, ``builder.init_weights``), shard it, make the optimizer."""

    @abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean causal-LM loss of this rank's micro-batch (unscaled by accumulation)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch, scaled for gradient accumulation."""

    @abstractmethod
    def step(self) -> Optional[torch.Tensor]:
        """Clip, optimizer step, zero grads; return the pre-clip global grad norm (a device
        tensor, not read here) or None when the strategy does not compute it."""

    def full_gradients(self) -> Optional[dict[str, torch.Tensor]]:
        """For parity checks: the unsharded gradient of every parameter, keyed by canonical
        name (``models.base.canonical_param_name``), after backward and before ``step``, in the
        loss's scale. A collective. None when the strategy cannot provide them."""
        return None

    @abstractmethod
    def precision_policy(self) -> dict[str, Any]:
        """What is stored, computed and reduced in which dtype; recorded in the result."""

    def describe(self) -> dict[str, Any]:
        """Strategy settings that define this run (recorded in the result)."""
        return {"impl": self.name}

    def environment(self) -> dict[str, Any]:
        """Framework versions and APIs used, merged into the result's environment block."""
        return {}
