"""Model registry: builders register under a HuggingFace ``model_type``."""

from __future__ import annotations

from typing import Callable, TypeVar

from tp_bench.core.errors import ConfigError

_BUILDERS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_model(model_type: str) -> Callable[[T], T]:
    """Class decorator: ``@register_model("llama")`` makes the builder serve that model_type."""

    def decorate(cls: T) -> T:
        _BUILDERS[model_type] = cls
        return cls

    return decorate


def registered_model_types() -> list[str]:
    return sorted(_BUILDERS)


def get_model_builder(model_name: str):
    """Resolve ``model_name`` (preset, local path or hub name) to a ready builder instance."""
    from tp_bench.models.resolve import load_hf_config

    model_type = load_hf_config(model_name).model_type
    if model_type not in _BUILDERS:
        raise ConfigError(f"model {model_name!r} has model_type {model_type!r}, which no builder "
                          f"serves (registered: {', '.join(registered_model_types())})")
    return _BUILDERS[model_type](model_name)
