"""torchtitan's own Qwen3 / Llama3 model configured from the HuggingFace config, and the
HuggingFace parameters in its layout (both ways: initial values in, gradients out).

The model config is built here rather than taken from torchtitan's flavour registry, whose
flavours fix the norm epsilon, the RoPE cache length, the attention backend and weight tying:
everything comes from the HF config, with torchtitan's SDPA attention (maskless, causal) and
its default fused q/k/v projection. The names map through torchtitan's own state-dict adapter
(which also undoes the Llama q/k rotary permutation); the fused ``wqkv`` rows are grouped per
kv head, ``(n_kv, q heads per kv + 2, head_dim)``, as torchtitan's ``FusedQKVLinear`` lays them
out (``tests/test_torchtitan_model.py`` checks both against torchtitan's own load hooks).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import torch

FAMILIES = {"qwen3": "Qwen3", "llama": "Llama3"}
_QKV = ("wq", "wk", "wv")


def unsupported(hf_config: Any) -> Optional[str]:
    """Why torchtitan's model would not be this HF model, or None."""
    kind = hf_config.model_type
    if kind not in FAMILIES:
        return (f"--impl torchtitan trains torchtitan's own Qwen3 and Llama3 models; "
                f"{kind!r} is neither")
    rope = _rope_parameters(hf_config)
    allowed = {"qwen3": ("default",), "llama": ("default", "llama3")}[kind]
    if rope.get("rope_type", "default") not in allowed:
        return f"--impl torchtitan: {kind} RoPE type {rope['rope_type']!r} is not mapped"
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if getattr(hf_config, flag, False):
            return f"--impl torchtitan: {kind} with {flag} is not torchtitan's model"
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        return f"--impl torchtitan: hidden_act {hf_config.hidden_act!r} (torchtitan: SiLU)"
    heads = hf_config.num_attention_heads
    if heads % (getattr(hf_config, "num_key_value_heads", None) or heads):
        return "--impl torchtitan: the fused q/k/v needs heads divisible by kv heads"
    return None


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    rope = dict(getattr(hf_config, "rope_parameters", None)
                or getattr(hf_config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


class TorchtitanModel:
    """One HF config as torchtitan's model: its config, and the parameter mapping."""

    def __init__(self, hf_config: Any, seq_length: int, sequence_parallel: bool):
        from torchtitan.models.common.param_init import skip_param_init

        self.family = hf_config.model_type
        self.name = FAMILIES[self.family]
        c = hf_config
        self.n_heads = c.num_attention_heads
        self.n_kv = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.n_heads
        self.tied = bool(getattr(c, "tie_word_embeddings", False))
        # Every parameter is overwritten with the shared initial values, so none is drawn.
        skip = {"weight": skip_param_init, "bias": skip_param_init}
        self.config = (self._qwen3 if self.family == "qwen3" else self._llama3)(c, seq_length,
                                                                                skip)
        self._set_sharding(sequence_parallel)
        self.adapter = self._adapter(self.config)
        # With tying on, the adapter wants the embedding in every dict it maps; one layer's
        # parameters map the same either way.
        self._layer_adapter = self._adapter(dataclasses.replace(self.config,
                                                                enable_weight_tying=False))

    # ------------------------------------------------------------------ the model
    def _norm(self, dim: int, eps: float, skip: dict) -> Any:
        from torchtitan.models.common import RMSNorm

        return RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=skip)

    def _decoder(self, model_cls: Any, block_cls: Any, c: Any, rope: Any, skip: dict,
                 qk_norm: bool) -> Any:
        from torchtitan.models.common import Embedding, Linear, ScaledDotProductAttention
        from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config

        eps = c.rms_norm_eps
        extra = {"qk_norm": self._norm(self.head_dim, eps, skip)} if qk_norm else {}
        layers = [
            block_cls.Config(
                attention_norm=self._norm(c.hidden_size, eps, skip),
                ffn_norm=self._norm(c.hidden_size, eps, skip),
                attention=make_gqa_config(
                    dim=c.hidden_size, n_heads=self.n_heads, n_kv_heads=self.n_kv,
                    # head_dim sets the SDPA scale to head_dim ** -0.5, as HF's
                    head_dim=self.head_dim, wqkv_param_init=skip, wo_param_init=skip,
                    inner_attention=ScaledDotProductAttention.Config(), fuse_qkv=True,
                    rope=rope, **extra),
                feed_forward=make_ffn_config(dim=c.hidden_size, hidden_dim=c.intermediate_size,
                                             w1_param_init=skip, w2w3_param_init=skip))
            for _ in range(c.num_hidden_layers)]
        return model_cls.Config(
            vocab_size=c.vocab_size, dim=c.hidden_size, norm=self._norm(c.hidden_size, eps, skip),
            enable_weight_tying=self.tied,
            tok_embeddings=Embedding.Config(num_embeddings=c.vocab_size,
                                            embedding_dim=c.hidden_size, param_init=skip),
            lm_head=Linear.Config(in_features=c.hidden_size, out_features=c.vocab_size,
                                  param_init=skip),
            layers=layers)

    def _qwen3(self, c: Any, seq_length: int, skip: dict) -> Any:
        from torchtitan.models.common import CosSinRoPE
        from torchtitan.models.qwen3.model import Qwen3Model, Qwen3TransformerBlock

        # The RoPE cache is sized to the training sequence, as torchtitan's trainer sizes it.
        rope = CosSinRoPE.Config(dim=self.head_dim, max_seq_len=seq_length,
                                 theta=float(_rope_parameters(c)["rope_theta"]))
        return self._decoder(Qwen3Model, Qwen3TransformerBlock, c, rope, skip, qk_norm=True)

    def _llama3(self, c: Any, seq_length: int, skip: dict) -> Any:
        from torchtitan.models.common import ComplexRoPE
        from torchtitan.models.llama3.model import Llama3Model, Llama3TransformerBlock

        rope = _rope_parameters(c)
        scaling = {}
        if rope["rope_type"] == "llama3":
            scaling = dict(scaling="llama", scaling_factor=rope["factor"],
                           low_freq_factor=rope["low_freq_factor"],
                           high_freq_factor=rope["high_freq_factor"],
                           original_max_position_embeddings=rope[
                               "original_max_position_embeddings"])
        rope_cfg = ComplexRoPE.Config(dim=self.head_dim, max_seq_len=seq_length,
                                      theta=float(rope["rope_theta"]), **scaling)
        return self._decoder(Llama3Model, Llama3TransformerBlock, c, rope_cfg, skip,
                             qk_norm=False)

    def _set_sharding(self, sequence_parallel: bool) -> None:
        """torchtitan's TP plan, declared on the config before ``build`` (what
        ``update_from_config`` does, without importing torchtitan's trainer and its data and
        logging dependencies). Applied only where a tp mesh exists."""
        if self.family == "qwen3":
            from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

            set_qwen3_sharding_config(self.config, enable_sp=sequence_parallel, enable_ep=False)
        else:
            from torchtitan.models.llama3.sharding import set_llama3_sharding_config

            set_llama3_sharding_config(self.config, enable_sp=sequence_parallel)

    def _adapter(self, config: Any) -> Any:
        if self.family == "qwen3":
            from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

            return Qwen3StateDictAdapter(config, None)
        from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

        return Llama3StateDictAdapter(config, None)

    def build(self) -> torch.nn.Module:
        """The model on the meta device."""
        with torch.device("meta"):
            return self.config.build()

    # ------------------------------------------------------------------ the parameters
    def from_hf(self, hf_values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF-named full values (one layer's, or the ones outside the layers) -> torchtitan's
        names and layout (fused wqkv)."""
        adapter = (self.adapter if "model.embed_tokens.weight" in hf_values
                   else self._layer_adapter)
        values = adapter.from_hf(dict(hf_values))
        for key in [k for k in values if k.endswith(".qkv_linear.wq.weight")]:
            prefix = key[:-len("wq.weight")]
            wq, wk, wv = (values.pop(f"{prefix}{w}.weight") for w in _QKV)
            values[f"{prefix}wqkv.weight"] = self.fuse_qkv(wq, wk, wv)
        return values

    def to_hf(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchtitan-named full tensors (parameters or their gradients: every mapping is a
        row selection) -> HF names and layout."""
        values = dict(values)
        for key in [k for k in values if k.endswith(".qkv_linear.wqkv.weight")]:
            prefix = key[:-len("wqkv.weight")]
            for w, part in zip(_QKV, self.split_qkv(values.pop(key))):
                values[f"{prefix}{w}.weight"] = part
        if self.tied and "lm_head.weight" in values:
            # The adapter drops a tied lm_head; its one tensor is the embedding's.
            values.setdefault("tok_embeddings.weight", values.pop("lm_head.weight"))
        return self.adapter.to_hf(values)

    def fuse_qkv(self, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
        per_kv = self.n_heads // self.n_kv
        d = wq.shape[-1]
        q = wq.reshape(self.n_kv, per_kv, self.head_dim, d)
        k = wk.reshape(self.n_kv, 1, self.head_dim, d)
        v = wv.reshape(self.n_kv, 1, self.head_dim, d)
        return torch.cat([q, k, v], dim=1).reshape(-1, d)

    def split_qkv(self, wqkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per_kv = self.n_heads // self.n_kv
        w = wqkv.reshape(self.n_kv, per_kv + 2, self.head_dim, wqkv.shape[-1])
        return tuple(part.reshape(-1, wqkv.shape[-1]).contiguous()
                     for part in torch.split(w, [per_kv, 1, 1], dim=1))


def layer_groups(hf_names: list[str]) -> list[list[str]]:
    """HF parameter names grouped by transformer layer (the rest first): the unit in which
    initial values are generated and mapped, so no rank holds more than one layer of full
    values at a time."""
    groups: dict[Optional[int], list[str]] = {}
    for name in hf_names:
        match = re.search(r"\.layers\.(\d+)\.", name)
        groups.setdefault(int(match.group(1)) if match else None, []).append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: -1 if k is None else k)]
