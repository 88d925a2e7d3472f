"""Qwen2 / Qwen2.5 and Qwen3 dense models.

Qwen2 has biases on q/k/v; ColwiseParallel shards them with the weight rows.

Qwen3 adds an RMSNorm over head_dim on q and k (q_norm / k_norm) that runs on each rank's local
heads. Left as a plain replicated module, each tp rank's gradient of its weight covers only its
own heads (a partial sum), so the replicas silently drift apart. As a replicated DTensor whose
input is marked sharded on the heads dim, DTensor all-reduces that gradient over tp.
"""

from typing import Any

from tp_bench.models.hf_causal_lm import HFCausalLMBuilder
from tp_bench.models.registry import register_model


@register_model("qwen2")
class Qwen2ModelBuilder(HFCausalLMBuilder):
    pass


@register_model("qwen3")
class Qwen3ModelBuilder(HFCausalLMBuilder):
    def get_tp_mapping(self) -> dict[str, Any]:
        from torch.distributed.tensor.parallel import SequenceParallel

        # Input is [batch, seq, local heads, head_dim] after q_proj/k_proj and the view.
        head_sharded_norm = dict(sequence_dim=2, use_local_output=True)
        return {
            **super().get_tp_mapping(),
            "self_attn.q_norm": SequenceParallel(**head_sharded_norm),
            "self_attn.k_norm": SequenceParallel(**head_sharded_norm),
        }
