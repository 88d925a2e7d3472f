"""Models: one builder per family (HF config -> random-init model, module layout and TP plan as
data), the registry by HF model_type, and the shipped config presets."""

from tp_bench.models import llama, qwen  # noqa: F401  (registration side effect)
from tp_bench.models.base import BaseModelBuilder, ModelConfig
from tp_bench.models.hf_causal_lm import HFCausalLMBuilder
from tp_bench.models.registry import get_model_builder, register_model, registered_model_types

__all__ = ["BaseModelBuilder", "HFCausalLMBuilder", "ModelConfig", "get_model_builder",
           "register_model", "registered_model_types"]
