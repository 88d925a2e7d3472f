"""Tensor-parallel plans as data: a root plan (embedding, final norm, lm_head, keyed by module
path from the model root) and a layer plan (keyed by module path inside one transformer layer),
each a dict of DTensor ParallelStyles. Applying one is two calls (strategies.dtensor_steps);
``TPPlan.describe`` is what the results file records: exactly the plan applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TPPlan:
    root: dict[str, Any]       # module path from the model root -> ParallelStyle
    layer: dict[str, Any]      # module path inside one layer -> ParallelStyle
    layers_path: str           # where the layers live, e.g. "model.layers"

    def describe(self) -> dict[str, dict[str, str]]:
        return {"root": {k: style_text(v) for k, v in self.root.items()},
                "layer": {f"{self.layers_path}.*.{k}": style_text(v)
                          for k, v in self.layer.items()}}


def style_text(style: Any) -> str:
    """``ColwiseParallel(input_layouts=(Shard(dim=1),), ...)``: a ParallelStyle and its layouts."""
    fields = ", ".join(f"{k}={_layout_text(v)}" for k, v in sorted(vars(style).items())
                       if not k.startswith("_") and v is not None)
    return f"{type(style).__name__}({fields})"


def _layout_text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_layout_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_layout_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def root_plan(embedding: str, final_norm: str, lm_head: str, vocab_parallel: bool,
              sequence_parallel: bool) -> dict[str, Any]:
    """The plan outside the layers, for the usual decoder layout (torchtitan's).

    Between the layers the residual stream is sharded on the sequence dim with sequence
    parallelism, else replicated. Vocabulary parallelism: embedding rowwise (vocab-sharded
    rows), lm_head colwise with its logits left sharded for a loss-parallel cross-entropy.
    Without it, a replicated embedding keeps its own sequence shard (SP), and a replicated
    lm_head first gathers the sequence (SP) to produce full logits on every rank.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel)

    stream = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, Any] = {}
    if vocab_parallel:
        plan[embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                          use_local_output=not sequence_parallel)
    elif sequence_parallel:
        plan[embedding] = PrepareModuleOutput(output_layouts=Replicate(),
                                              desired_output_layouts=Shard(1),
                                              use_local_output=False)
    if sequence_parallel:
        plan[final_norm] = SequenceParallel()
    if vocab_parallel:
        plan[lm_head] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1),
                                        use_local_output=False)
    elif sequence_parallel:
        plan[lm_head] = PrepareModuleInput(input_layouts=(Shard(1),),
                                           desired_input_layouts=(Replicate(),),
                                           use_local_output=True)
    return plan
