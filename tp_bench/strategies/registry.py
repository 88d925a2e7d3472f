"""Strategy registry: name -> the module that defines ``STRATEGY`` (strategies.base.Strategy).

Modules are imported when their strategy is asked for: importing DeepSpeed takes seconds and
touches the accelerator. This module imports no torch: the pytest plugin reads it in every run.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import TYPE_CHECKING

from tp_bench.core.config import FREE_OPTIONS, IMPL_OPTIONS, TECHNIQUE_OPTIONS, BenchConfig
from tp_bench.core.errors import ConfigError

if TYPE_CHECKING:
    from tp_bench.strategies.base import Strategy

_MODULES = {
    "autotp": "tp_bench.strategies.autotp",
    "fsdp_dtensor": "tp_bench.strategies.fsdp_dtensor",
    "torchtitan": "tp_bench.strategies.torchtitan",
    "hf_native": "tp_bench.strategies.hf_native",
}
# Stacks whose framework is an optional extra: (package, how to install it). Without the package
# the stack is not available, and asking for it says what to install.
_EXTRAS = {
    "torchtitan": ("torchtitan", "bash scripts/install.sh, or pip install "
                   "'tp_bench[torchtitan]' and pip install --no-deps torchtitan==0.3.0"),
}


def register(name: str, module: str) -> None:
    """Make ``--impl name`` load ``module`` (which defines ``STRATEGY``)."""
    _MODULES[name] = module


def available() -> list[str]:
    """Registered strategies whose module, and optional framework, can be found (not yet
    imported)."""
    return sorted(n for n, module in _MODULES.items()
                  if importlib.util.find_spec(module) is not None and _missing(n) is None)


def _missing(name: str) -> "str | None":
    """What to install for a stack whose optional framework is absent, else None."""
    package, install = _EXTRAS.get(name, (None, None))
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return f"--impl {name} needs the {package} package, which is not installed: {install}"


def get(name: str) -> "Strategy":
    if name not in _MODULES:
        raise ConfigError(f"unknown --impl {name!r}; choose from {', '.join(available())}")
    missing = _missing(name)
    if missing:
        raise ConfigError(missing)
    strategy = importlib.import_module(_MODULES[name]).STRATEGY
    if strategy.name != name:
        raise ConfigError(f"--impl {name}: module {_MODULES[name]} defines {strategy.name!r}")
    return strategy


def resolve(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with the impl's own defaults filled in; ConfigError for an option the impl does
    not take, or a value it does not offer."""
    strategy = get(cfg.impl)
    defaults = BenchConfig()
    for name in FREE_OPTIONS:
        if getattr(cfg, name) != getattr(defaults, name) and name not in strategy.takes:
            raise ConfigError(f"--{name} does not apply to --impl {cfg.impl}")
    updates = {}
    for name in IMPL_OPTIONS + TECHNIQUE_OPTIONS:
        value = getattr(cfg, name)
        allowed = strategy.options.get(name)
        if allowed is None:
            if value is not None and name in IMPL_OPTIONS:
                raise ConfigError(f"--{name} does not apply to --impl {cfg.impl}")
            continue
        if value is None:
            updates[name] = allowed[0]
        elif value not in allowed:
            raise ConfigError(f"--{name} {_text(value)} is not offered by --impl {cfg.impl} "
                              f"(it takes {', '.join(map(_text, allowed))})")
    return dataclasses.replace(cfg, **updates)


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
