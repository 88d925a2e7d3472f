"""What a stack holds in memory, declared by the stack for the memory plan (engine.plan).

A stack's module defines ``memory_layout(cfg, dims) -> MemoryLayout`` and passes it to its
``Strategy`` (``memory=``): the bytes each training state takes per parameter of this rank's
tensor-parallel shard, and what is split over dp. The plan turns that into bytes per rank from
the model's parameter shapes; the activations, logits and communication follow from the flags.
Torch-free: the plan runs before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# How a state is split over the dp ranks.
PER_PARAM = "per_param"     # each parameter's dim 0, padded to a multiple of dp (FSDP2)
FLAT = "flat"               # one flat buffer of all parameters, padded and split (ZeRO)
FLAT_WHOLE = "flat_whole"   # that padded flat buffer, whole on every dp rank (ZeRO's module)
FLAT_TOUCHED = "flat_touched"   # the whole parameters that overlap a rank's flat partition


@dataclass(frozen=True)
class Held:
    """One kind of tensor a rank holds: bytes per parameter of its tp shard, and how it is held
    over dp (None: every dp rank holds all of it, parameter by parameter)."""

    bytes_per_param: float
    over_dp: Optional[str] = None


NONE = Held(0)


@dataclass(frozen=True)
class MemoryLayout:
    """A stack's memory behaviour for one configuration (``Strategy.memory``)."""

    params: Held                   # the module's parameters between steps
    grads: Held                    # gradients from the end of backward until the step
    optimizer: Held                # AdamW's exp_avg and exp_avg_sq
    master: Held = NONE            # a separate float32 copy that the optimizer updates
    step_extra: tuple[Held, ...] = ()    # copies that exist only during the optimizer step
    setup_extra: tuple[Held, ...] = ()   # copies that exist only while the optimizer is built
    backward_buffer: int = 0       # bytes allocated whole at every backward (a reduce bucket)
    # What is held while the gradients are reduced at the end of backward, beside that buffer
    # (in place of ``grads`` when larger).
    sync_extra: tuple[Held, ...] = ()
    # FSDP2: bytes per parameter of the copies all-gathered for compute, one layer at a time
    # (the root module's for the whole forward and backward); 0 for a stack without them.
    gathered: int = 0
    build: str = "meta"            # "meta": shards materialized; "full": full fp32 model first
    sequence_parallel: bool = False      # norms and the residual stream split over tp
    vocab_parallel: bool = False         # embedding, lm_head and logits split over tp
    # "hf": HuggingFace's cross-entropy, eager; "compiled": the same, compiled (--compile);
    # "fused": tp_bench's vocabulary-parallel loss (an in-place softmax)
    loss: str = "hf"
    lm_head_split: bool = False    # lm_head column-parallel without vocab parallelism (untied),
    logits_gathered: bool = False  # gathering the full logits on every rank
    dp_grad_sync: str = "reduce_scatter"  # or "all_reduce"
    grad_sync_per_micro_batch: bool = False   # reduce at every micro-batch (ZeRO 2)
    dp_param_gather: bool = False  # updated parameters all-gathered over dp after the step
