"""Model builders. Importing a builder module registers it (``@register_model``)."""

from tp_bench.models import llama, qwen  # noqa: F401  (registration side effect)
from tp_bench.models.base import BaseModelBuilder, ModelConfig
from tp_bench.models.registry import get_model_builder, register_model, registered_model_types

__all__ = ["BaseModelBuilder", "ModelConfig", "get_model_builder", "register_model",
           "registered_model_types"]
