"""Llama 3.x dense models (rope_type llama3 comes from the config)."""

from tp_bench.models.hf_causal_lm import HFCausalLMBuilder
from tp_bench.models.registry import register_model


@register_model("llama")
class LlamaModelBuilder(HFCausalLMBuilder):
    pass
