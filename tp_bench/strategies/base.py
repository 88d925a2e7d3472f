"""What a strategy is: a ``parallelize`` that shards a model and says what it applied, a trainer
that trains the result, and the options the stack takes (as data: the sweep explores them).

The engine owns the step loop, timing and records; a strategy owns everything framework-specific.
Nothing outside a strategy branches on ``impl``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import nn

from tp_bench.core.config import BenchConfig
from tp_bench.core.data import Batch
from tp_bench.core.dims import Mesh, ParallelDims
from tp_bench.models.base import BaseModelBuilder
from tp_bench.strategies.causal_loss import ForwardLoss, eager_causal_lm_loss
from tp_bench.strategies.memory import MemoryLayout

Number = Union[torch.Tensor, float, None]


@dataclass
class Parallelized:
    """A sharded model and what was done to it."""

    model: nn.Module
    plan: Optional[dict[str, Any]]      # the TP plan as applied (recorded in the results)
    techniques: list[str]               # what was applied, in order (one log line)
    settings: dict[str, Any]            # the results' "strategy" block
    precision: dict[str, Any]           # the results' "precision" block, but loss scaling
    forward_loss: ForwardLoss = eager_causal_lm_loss   # strategies.causal_loss
    contexts: tuple[Callable[[], ContextManager], ...] = ()   # around forward and backward
    engine: Any = None                  # a framework engine that trains the model (DeepSpeed's)


@dataclass(frozen=True)
class StepStats:
    """What an optimizer step reports; nothing here has been read from the device."""

    grad_norm: Number                   # pre-clip global norm; None when the stack has none
    skipped: Optional[bool]             # True: no update (overflow); None: not known here


class Trainer(ABC):
    """Trains a Parallelized model: loss, backward, clipping, the optimizer, loss scaling."""

    model: nn.Module
    loss_scaling: Optional[str] = None  # "dynamic" with float16 loss scaling

    @abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean causal-LM loss of this rank's micro-batch (unscaled by accumulation)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch, scaled for gradient accumulation."""

    @abstractmethod
    def step(self) -> StepStats:
        """Clip, optimizer step (or a skip), zero grads."""

    def full_gradients(self) -> Optional[dict[str, torch.Tensor]]:
        """For parity checks: the unsharded gradient of every parameter, keyed by canonical
        name (``models.base.canonical_param_name``), after backward and before ``step``, in the
        loss's scale. A collective. None when the trainer cannot provide them."""
        return None

    def describe(self) -> dict[str, Any]:
        """Optimizer and clipping, merged into the results' "strategy" block."""
        return {}


def _on_device(cfg: BenchConfig, builder: BaseModelBuilder,
               device: torch.device) -> Union[torch.device, str]:
    return "meta" if cfg.meta_init else device


def _no_check(cfg: BenchConfig, builder: BaseModelBuilder, device: torch.device) -> None:
    return None


@dataclass(frozen=True)
class Strategy:
    """A stack, registered under ``name`` (strategies.registry)."""

    name: str
    parallelize: Callable[[nn.Module, BaseModelBuilder, Mesh, BenchConfig, torch.device],
                          Parallelized]
    trainer: Callable[[Parallelized, BenchConfig, Mesh, torch.device], Trainer]
    # The options this stack takes, each with the values it supports, its default first
    # (core.config.IMPL_OPTIONS and TECHNIQUE_OPTIONS).
    options: dict[str, tuple]
    # The options a sweep explores for the fastest configuration (a subset of ``options``).
    sweep: tuple[str, ...] = ()
    # Options it takes whatever their value (core.config.FREE_OPTIONS, e.g. dp_replicate).
    takes: frozenset[str] = frozenset()
    # Where the model is built: "meta" (sharded, then materialized by the engine) or a device.
    build_device: Callable[[BenchConfig, BaseModelBuilder, torch.device],
                           Union[torch.device, str]] = _on_device
    environment: Callable[[], dict[str, Any]] = field(default=dict)
    # What a rank holds, for the memory plan (engine.plan, `tp-bench plan`); None: the plan
    # shows the stack without numbers and never refuses its runs.
    memory: Optional[Callable[[BenchConfig, ParallelDims], MemoryLayout]] = None
    # What this stack cannot run, beyond its options (a model family, a device, a framework
    # version): raises ConfigError before any model is built (engine.session.prepare).
    check: Callable[[BenchConfig, BaseModelBuilder, torch.device], None] = _no_check
    # A stack whose framework defines or builds the model itself (torchtitan's model code,
    # transformers' from_pretrained with a DistributedConfig) instead of the builder's
    # HuggingFace model: returns it, and ``parallelize`` gets it. The stack then owns storage
    # and initial values: it must hold exactly the values every stack starts from
    # (``BaseModelBuilder.init_weights`` / ``initial_value``) once ``parallelize`` returns, and
    # the engine neither initializes nor materializes it. None: the builder's model.
    build_model: Optional[Callable[[BenchConfig, BaseModelBuilder, Mesh, torch.device],
                                   nn.Module]] = None
