"""``--attn_impl sdpa`` without HuggingFace's per-forward mask building.

Called without an attention mask, transformers (5.x) looks for packed sequences in the position
ids before every forward (``masking_utils.find_packed_sequence_indices``), and that check reads
a tensor on the host: one device-to-host sync per forward. At batch 1 a GPU step is bound by the
host launching kernels, and the sync stalls the host until the GPU has drained the previous
step's backward and optimizer, which the host would otherwise overlap with launching the forward
(one H200, Qwen3-1.7B, seq 2048, batch 1: the forward phase's median 10-15 ms shorter without
it; docs/PERFORMANCE.md 0.8). tp_bench's batches are never packed nor padded, so every layer's
mask is plain causal, which SDPA computes from ``is_causal=True`` when given no mask.

The same SDPA function registered under a name of its own, with no mask function, is what
transformers offers for attention that needs no mask: it then hands every layer ``None`` and
SDPA is causal. Models with a sliding window (or other non-causal layer types) keep "sdpa" and
HuggingFace's masks.
"""

from __future__ import annotations

from typing import Any

CAUSAL_SDPA = "sdpa_causal_no_mask"


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)   # idempotent


def only_causal_layers(config: Any) -> bool:
    """True when no layer of ``config``'s model needs more than a causal mask."""
    types = getattr(config, "layer_types", None) or []
    windowed = getattr(config, "use_sliding_window", getattr(config, "sliding_window", None))
    return all(t == "full_attention" for t in types) and not windowed


def attn_implementation(config: Any, attn_impl: str) -> str:
    """The attention implementation to build ``config``'s model with: the mask-free causal
    SDPA for "sdpa" where every layer is plain causal, ``attn_impl`` otherwise."""
    if attn_impl != "sdpa" or not only_causal_layers(config):
        return attn_impl
    _register()
    return CAUSAL_SDPA
