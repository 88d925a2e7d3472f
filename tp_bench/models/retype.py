"""A module given another forward by swapping its class for a subclass: the module itself stays
(parameter names, TP plans, FSDP units, hooks and ``isinstance`` checks are unchanged)."""

from __future__ import annotations

from typing import Any

from torch import nn

_SUBCLASSES: dict[tuple[type, str], type] = {}


def retype(module: nn.Module, prefix: str, namespace: dict[str, Any]) -> None:
    """Make ``module`` a ``<prefix><its class>``, a subclass with ``namespace`` (one per class
    and prefix, so every module of a class shares it)."""
    cls = type(module)
    if (cls, prefix) not in _SUBCLASSES:
        _SUBCLASSES[cls, prefix] = type(f"{prefix}{cls.__name__}", (cls,), namespace)
    module.__class__ = _SUBCLASSES[cls, prefix]


def is_retyped(module: nn.Module) -> bool:
    """Whether ``retype`` made this module's class."""
    return type(module) in _SUBCLASSES.values()
