"""Shared builder for HuggingFace decoder-only models laid out as model.layers / embed_tokens /
norm / lm_head with Llama-style attention and MLP projections (Llama, Qwen2, Qwen3, ...)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tp_bench.models.base import BaseModelBuilder
from tp_bench.models.fused_norm import use_fused_rms_norm


class HFCausalLMBuilder(BaseModelBuilder):
    def create_model(self, device: torch.device | str, dtype: torch.dtype, num_layers: int = 0,
                     attn_impl: str = "sdpa", norm_impl: str = "fused") -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = self.hf_config_for(num_layers, attn_impl)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=config._attn_implementation)
        if norm_impl == "fused":
            use_fused_rms_norm(model)
        return model

    def get_tp_mapping(self) -> dict[str, Any]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }

    def get_sequence_parallel_mapping(self) -> dict[str, Any]:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (PrepareModuleInput, RowwiseParallel,
                                                       SequenceParallel)

        return {
            "input_layernorm": SequenceParallel(),
            # The decoder layer passes hidden_states to self_attn by keyword, to mlp by position.
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        }
