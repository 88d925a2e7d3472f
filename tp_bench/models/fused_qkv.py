"""``--fused_qkv`` (fsdp_dtensor): a HuggingFace attention's q, k and v projections as one GEMM.

Three projections are three GEMMs forward and six backward per layer, and three parameters
for FSDP and the optimizer where one would do. At batch 1 a GPU step is bound by the host
launching kernels, and those launches are a measurable part of it (docs/PERFORMANCE.md 0.8).
torchtitan's model fuses them (``FusedQKVLinear``); this is the same layout for HuggingFace's
model.

Layout: the rows are grouped by key-value head. For each kv head g: the query heads that
attend with it (heads g*hpg ... g*hpg + hpg - 1, hpg = heads per group, as HuggingFace's
``repeat_kv`` pairs them), then k_g, then v_g. A colwise TP split (``Shard(0)``) over tp ranks
that divide the kv heads therefore gives each rank whole groups: exactly the query, key and
value heads the three separate projections' splits give it.

The module keeps HuggingFace's attention otherwise (its RoPE, q/k norms, attention interface,
o_proj); only the projection and the split are new. Values cross the two layouts by name:
``join`` builds the fused value from the separate ones (initial values are drawn for the
separate names, so the weights are those of every other stack), ``split_fused_gradients`` gives
a fused gradient back under the separate names (the parity check compares those).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

import torch
from torch import nn

from tp_bench.core.errors import ConfigError
from tp_bench.models.retype import retype
from tp_bench.models.tp_plan import TPPlan

PARTS = ("q_proj", "k_proj", "v_proj")
FUSED = "qkv_proj"


class QKVProjection(nn.Linear):
    """One linear layer for q, k and v, its output rows grouped per kv head (module doc)."""

    def __init__(self, in_features: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool, device: Any = None, dtype: Optional[torch.dtype] = None):
        if num_heads % num_kv_heads:
            raise ConfigError(f"--fused_qkv needs num_attention_heads ({num_heads}) divisible "
                              f"by num_key_value_heads ({num_kv_heads})")
        super().__init__(in_features, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias,
                         device=device, dtype=dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.heads_per_group = num_heads // num_kv_heads

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., rows] (this rank's whole groups under TP) -> q, k, v as [..., heads, head_dim],
        each a copy of its own: a view would keep the whole projection output alive for
        backward (k_norm and attention save their inputs), 0.22 GB more eager at batch 1 on
        Qwen3-1.7B (docs/PERFORMANCE.md 0.9); torchtitan copies the three too."""
        hpg = self.heads_per_group
        grouped = out.unflatten(-1, (-1, hpg + 2, self.head_dim))
        return (grouped[..., :hpg, :].flatten(-3, -2).contiguous(),
                grouped[..., hpg, :].contiguous(), grouped[..., hpg + 1, :].contiguous())

    def part_shapes(self, leaf: str) -> list[tuple[int, ...]]:
        """The shapes of q_proj's, k_proj's and v_proj's ``leaf`` ("weight" or "bias")."""
        tail = (self.in_features,) if leaf == "weight" else ()
        return [(n * self.head_dim, *tail)
                for n in (self.num_heads, self.num_kv_heads, self.num_kv_heads)]

    def join(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fused value (weight or bias) from the separate projections' full values."""
        tail = q.shape[1:]
        groups = [q.reshape(self.num_kv_heads, self.heads_per_group, self.head_dim, *tail),
                  k.reshape(self.num_kv_heads, 1, self.head_dim, *tail),
                  v.reshape(self.num_kv_heads, 1, self.head_dim, *tail)]
        return torch.cat(groups, dim=1).reshape(-1, *tail)

    def unjoin(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inverse of ``join``: full values of q_proj, k_proj and v_proj."""
        tail = fused.shape[1:]
        grouped = fused.reshape(self.num_kv_heads, self.heads_per_group + 2, self.head_dim, *tail)
        hpg = self.heads_per_group
        return (grouped[:, :hpg].reshape(-1, *tail), grouped[:, hpg].reshape(-1, *tail),
                grouped[:, hpg + 1].reshape(-1, *tail))


def _fused_attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                             position_embeddings: tuple[torch.Tensor, torch.Tensor],
                             attention_mask: Optional[torch.Tensor] = None,
                             past_key_values: Any = None, cache: Any = None,
                             **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """HuggingFace's Llama/Qwen2/Qwen3 attention forward (transformers 5.x) with one projection;
    training only: no KV cache."""
    if past_key_values is not None or cache is not None:
        raise ValueError("fused q/k/v attention is for training: it keeps no KV cache")
    hf = self._hf_module
    input_shape = hidden_states.shape[:-1]
    query, key, value = self.qkv_proj.split(self.qkv_proj(hidden_states))
    if hasattr(self, "q_norm"):   # Qwen3: RMSNorm over head_dim, on this rank's heads
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cos, sin = position_embeddings
    query, key = hf.apply_rotary_pos_emb(query, key, cos, sin)
    attention = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                         hf.eager_attention_forward)
    if hasattr(self, "sliding_window"):
        kwargs["sliding_window"] = self.sliding_window
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def is_hf_attention(module: nn.Module) -> bool:
    """A HuggingFace Llama-style attention with separate q/k/v projections."""
    return (type(module).__name__.endswith("Attention")
            and all(isinstance(getattr(module, p, None), nn.Linear) for p in (*PARTS, "o_proj"))
            and hasattr(module, "head_dim"))


def fuse_qkv(model: nn.Module) -> int:
    """Replace every HuggingFace attention's q/k/v projections of ``model`` (plain, before any
    sharding; on the meta device or with values, which are kept) by one ``QKVProjection``;
    returns how many."""
    fused = 0
    for module in list(model.modules()):
        if not is_hf_attention(module):
            continue
        q, k, v = (getattr(module, p) for p in PARTS)
        cls = type(module)
        hf = sys.modules[cls.__module__]
        missing = [n for n in ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS",
                               "eager_attention_forward") if not hasattr(hf, n)]
        if missing:
            raise ConfigError(f"--fused_qkv: {cls.__name__}'s module lacks {', '.join(missing)}")
        projection = QKVProjection(q.in_features, q.out_features // module.head_dim,
                                   k.out_features // module.head_dim, module.head_dim,
                                   bias=q.bias is not None, device=q.weight.device,
                                   dtype=q.weight.dtype)
        with torch.no_grad():
            for leaf in ("weight", "bias"):
                if getattr(projection, leaf) is not None:
                    getattr(projection, leaf).copy_(projection.join(
                        *(getattr(p, leaf) for p in (q, k, v))))
        for p in PARTS:
            delattr(module, p)
        module.qkv_proj = projection
        retype(module, "FusedQKV", {"forward": _fused_attention_forward, "_hf_module": hf})
        fused += 1
    if not fused:
        raise ConfigError(f"--fused_qkv: {type(model).__name__} has no attention with separate "
                          "q_proj/k_proj/v_proj")
    return fused


def part_names(name: str) -> Optional[list[str]]:
    """``...self_attn.qkv_proj.weight`` -> the q/k/v parameter names it fuses; None otherwise."""
    module, _, leaf = name.rpartition(".")
    parent, _, child = module.rpartition(".")
    if child != FUSED:
        return None
    return [f"{parent}.{p}.{leaf}" if parent else f"{p}.{leaf}" for p in PARTS]


def split_fused_gradients(projections: dict[str, QKVProjection],
                          grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full gradients keyed by parameter name, each fused q/k/v one given back as the three
    separate projections' (the names every other stack and the reference have).
    ``projections``: the model's QKVProjection modules by name, named as ``grads`` is."""
    out: dict[str, torch.Tensor] = {}
    for name, grad in grads.items():
        parts = part_names(name)
        owner = projections.get(name.rpartition(".")[0]) if parts else None
        if owner is None:
            out[name] = grad
        else:
            out.update(zip(parts, owner.unjoin(grad)))
    return out


def fused_plan(plan: TPPlan) -> TPPlan:
    """``plan`` for a model whose attention ``fuse_qkv`` fused: q_proj's style (colwise) for
    qkv_proj, in its place, and no k_proj or v_proj entries."""
    layer: dict[str, Any] = {}
    for key, style in plan.layer.items():
        prefix, _, child = key.rpartition(".")
        if child == PARTS[0]:
            layer[f"{prefix}.{FUSED}" if prefix else FUSED] = style
        elif child not in PARTS:
            layer[key] = style
    return dataclasses.replace(plan, layer=layer)
