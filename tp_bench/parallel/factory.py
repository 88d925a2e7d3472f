"""Strategy registry: ``@register_strategy("name")`` and ``create_strategy``.

Strategy modules are imported lazily: importing DeepSpeed takes seconds and touches the
accelerator, so it happens only when that strategy is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, TypeVar

from tp_bench.config import ConfigError

# name -> module that registers it
_STRATEGY_MODULES = {
    "autotp": "tp_bench.parallel.autotp",
    "fsdp_dtensor": "tp_bench.parallel.fsdp_dtensor",
}
_STRATEGIES: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_strategy(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return decorate


def available_strategies() -> list[str]:
    return sorted(n for n, module in _STRATEGY_MODULES.items()
                  if importlib.util.find_spec(module) is not None)


def get_strategy_class(name: str) -> type:
    if name not in _STRATEGY_MODULES:
        raise ConfigError(f"unknown --impl {name!r}; choose from {', '.join(available_strategies())}")
    if name not in _STRATEGIES:
        importlib.import_module(_STRATEGY_MODULES[name])
    return _STRATEGIES[name]


def create_strategy(cfg, builder, mesh, device):
    return get_strategy_class(cfg.impl)(cfg, builder, mesh, device)
