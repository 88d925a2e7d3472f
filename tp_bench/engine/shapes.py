"""A model's parameters as one rank holds them: shapes from the meta device, split over tp as
the stack splits them, then over dp as FSDP2 or ZeRO splits them. Nothing is allocated.

Uneven splits follow ``torch.chunk`` (DTensor, AutoTP and our vocabulary shards all do): the
first ranks hold ceil(n / tp), so the counts here are rank 0's, the largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from tp_bench.models import get_model_builder
from tp_bench.models.base import BaseModelBuilder, ModelConfig

# DeepSpeed ZeRO pads its flat buffer to a multiple of 2 x dp elements
# (nccl_start_alignment_factor; parameter_alignment is off by default).
ZERO_ALIGNMENT_FACTOR = 2


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    layer: Optional[int]         # transformer layer index; None for the root (embedding, ...)
    role: str                    # "embedding", "lm_head", "linear:<path in layer>", "norm"


@dataclass(frozen=True)
class ModelShapes:
    """Every parameter of the model as built (tied weights once) and its dimensions."""

    config: ModelConfig
    params: tuple[Param, ...]
    layer_plan: tuple[tuple[str, str], ...]   # (path in a layer, "colwise" | "rowwise")

    @property
    def num_layers(self) -> int:
        return self.config.num_layers


def _style_kind(style: object) -> Optional[str]:
    name = type(style).__name__
    return {"ColwiseParallel": "colwise", "RowwiseParallel": "rowwise"}.get(name)


def shapes_of(builder: BaseModelBuilder, num_layers: int = 0) -> ModelShapes:
    import torch

    model = builder.create_model("meta", torch.float32, num_layers=num_layers)
    layers_prefix = builder.layers_path + "."
    embedding = builder.embedding_path + ".weight"
    lm_head = builder.lm_head_path + ".weight"
    params = []
    for name, p in model.named_parameters():          # tied weights appear once
        layer, role = None, "norm"
        if name.startswith(layers_prefix):
            index, _, inner = name[len(layers_prefix):].partition(".")
            layer, role = int(index), "linear:" + inner.rpartition(".")[0]
            if p.dim() == 1 and not inner.endswith("bias"):
                role = "norm"
            elif inner.endswith("bias"):
                role = "bias:" + inner.rpartition(".")[0]
        elif name == embedding:
            role = "embedding"
        elif name == lm_head:
            role = "lm_head"
        params.append(Param(name, tuple(p.shape), layer, role))
    plan = tuple((path, kind) for path, style in builder.get_tp_mapping().items()
                 if (kind := _style_kind(style)) is not None)
    return ModelShapes(builder.model_config(num_layers), tuple(params), plan)


@lru_cache(maxsize=32)
def model_shapes(model_name: str, num_layers: int = 0) -> ModelShapes:
    """The shapes of a model by name (preset, path or hub id), cached: built once on the meta
    device, then every configuration's plan reuses them."""
    return shapes_of(get_model_builder(model_name), num_layers)


def _chunk(n: int, parts: int) -> int:
    """Rank 0's share of ``n`` split as torch.chunk splits it."""
    return math.ceil(n / parts)


@dataclass(frozen=True)
class TPSplit:
    """How a stack splits the root over tp (the layers follow the model's TP plan)."""

    vocab_parallel: bool
    lm_head_split: bool = False     # column-parallel lm_head without vocabulary parallelism


def local_shape(param: Param, shapes: ModelShapes, tp: int, split: TPSplit) -> tuple[int, ...]:
    """Rank 0's shard of ``param`` at tensor-parallel degree ``tp``."""
    shape = list(param.shape)
    if tp == 1:
        return tuple(shape)
    dim = None
    tied = shapes.config.tie_word_embeddings
    if param.role == "embedding" and split.vocab_parallel:
        dim = 0
    elif param.role == "lm_head" and (split.vocab_parallel or split.lm_head_split and not tied):
        dim = 0
    elif param.role.startswith(("linear:", "bias:")):
        kind = dict(shapes.layer_plan).get(param.role.partition(":")[2])
        if kind == "colwise":
            dim = 0
        elif kind == "rowwise" and param.role.startswith("linear:"):
            dim = 1
    if dim is not None:
        shape[dim] = _chunk(shape[dim], tp)
    return tuple(shape)


@dataclass(frozen=True)
class Counts:
    """Rank 0's parameter counts (elements) for one stack's tp split at one mesh."""

    tp_local: int                # all parameters, after the tp split
    root: int                    # the root module's (embedding, final norm, lm_head) share
    layer: int                   # one transformer layer's share (the largest layer)
    replicated: int              # parameters every tp rank holds whole (norms, ...)
    per_param_dp: int            # after FSDP2's split of each parameter's dim 0 over dp
    largest_full: int            # the largest parameter, unsplit
    largest_layer_full: int      # the largest parameter of a layer, unsplit
    vocab_local: int             # embedding and lm_head after the tp split
    init_transient: int          # the most one parameter's initialization holds (see counts)
    shard_shapes: tuple[tuple[int, ...], ...]   # every parameter's tp shard, in order

    def flat(self, dp: int) -> int:
        """ZeRO's flat buffer of all parameters, padded to a multiple of 2 x dp elements."""
        align = ZERO_ALIGNMENT_FACTOR * dp
        return math.ceil(self.tp_local / align) * align

    def flat_touched(self, dp: int) -> int:
        """The whole parameters overlapping rank 0's flat partition (ZeRO keeps their
        gradients whole: the partition's own plus the rest of the one across its edge)."""
        partition, start, total = self.flat(dp) // dp, 0, 0
        for shape in self.shard_shapes:
            if start >= partition:
                break
            size = math.prod(shape)
            total += size
            start += size
        return total

    def elements(self, how: Optional[str], dp: int) -> int:
        """Elements of a state held as ``how`` (strategies.memory: None, PER_PARAM, FLAT,
        FLAT_WHOLE)."""
        if how is None:
            return self.tp_local
        if how == "per_param":
            return self.per_param_dp
        if how == "flat":
            return self.flat(dp) // dp
        if how == "flat_whole":
            return self.flat(dp)
        if how == "flat_touched":
            return self.flat_touched(dp)
        raise ValueError(f"unknown split over dp: {how!r}")


def counts(shapes: ModelShapes, tp: int, dp: int, split: TPSplit) -> Counts:
    local = [local_shape(p, shapes, tp, split) for p in shapes.params]
    sizes = [math.prod(s) for s in local]
    per_layer: dict[int, int] = {}
    root = replicated = 0
    for p, shape, n in zip(shapes.params, local, sizes):
        if p.layer is None:
            root += n
        else:
            per_layer[p.layer] = per_layer.get(p.layer, 0) + n
        if shape == p.shape and tp > 1:
            replicated += n
    per_param_dp = sum(_chunk(s[0], dp) * math.prod(s[1:]) for s in local)
    return Counts(
        tp_local=sum(sizes), root=root, layer=max(per_layer.values(), default=0),
        replicated=replicated, per_param_dp=per_param_dp,
        largest_full=max(math.prod(p.shape) for p in shapes.params),
        largest_layer_full=max((math.prod(p.shape) for p in shapes.params
                                if p.layer is not None), default=0),
        vocab_local=sum(n for p, n in zip(shapes.params, sizes)
                        if p.role in ("embedding", "lm_head")),
        init_transient=max(_init_transient(math.prod(p.shape), n) for p, n in zip(shapes.params,
                                                                                  sizes)),
        shard_shapes=tuple(local))


def _init_transient(full: int, local: int) -> int:
    """Materializing a parameter draws its full value and copies it into the parameter;
    distributing it to a tp-split DTensor has been measured to hold three full-size copies at
    once (docs/plan.md)."""
    return 3 * full if local < full else 2 * full
