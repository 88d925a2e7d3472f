"""The command line's options, generated from BenchConfig's fields: one option per field,
grouped as the seed's tables, help and defaults taken from the field."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional, Sequence

from tp_bench.core.config import BenchConfig
from tp_bench.core.dist import env_rank
from tp_bench.core.errors import ConfigError
from tp_bench.strategies import registry


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing, so only rank 0 reports it."""

    def error(self, message: str):
        raise ConfigError(message)

    def print_help(self, file=None):
        if env_rank() == 0:
            super().print_help(file)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind: type):
    def parse(text: str) -> Any:
        return None if text.lower() in ("auto", "none", "default") else kind(text)

    parse.__name__ = kind.__name__
    return parse


_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": _optional(int),
          "Optional[float]": _optional(float)}


def _default_text(value: Any) -> str:
    if value is None:
        return "auto"
    return str(value).lower() if isinstance(value, bool) else str(value)


def add_config_arguments(parser: argparse.ArgumentParser,
                         exclude: frozenset[str] = frozenset()) -> None:
    """One option per BenchConfig field (but those in ``exclude``)."""
    groups: dict[str, Any] = {}
    for f in BenchConfig.option_fields():
        if f.name in exclude:
            continue
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        choices = meta["choices"] or (tuple(registry.available()) if f.name == "impl" else None)
        help_text = meta["help"]
        if choices:
            help_text += f" ({', '.join(map(str, choices))})"
        help_text += f" [default: {_default_text(f.default)}]"
        flag = f"--{f.name}"
        if str(f.type) in ("bool", "Optional[bool]"):
            # `--autocast` and `--autocast true|false` both work.
            group.add_argument(flag, type=parse_bool, nargs="?", const=True, default=f.default,
                               metavar="BOOL", help=help_text)
            if f.name == "use_vocab_parallel":
                group.add_argument("--no_vocab_parallel", dest="use_vocab_parallel",
                                   action="store_false", help="Disable vocabulary parallelism")
            continue
        group.add_argument(flag, type=_TYPES[str(f.type)], default=f.default, help=help_text,
                           metavar=meta["metavar"] or f.name.upper())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in vars(args).items() if k in names})


def config_to_argv(cfg: BenchConfig) -> list[str]:
    """The command-line options that make ``cfg`` (those that differ from the defaults): the
    inverse of ``parse_config``."""
    argv = []
    for f in BenchConfig.option_fields():
        value = getattr(cfg, f.name)
        if value == f.default or value is None:
            continue
        argv += [f"--{f.name}", _default_text(value)]
    return argv


def parse_value(name: str, text: str) -> Any:
    """One option's value from text, as the command line would parse it (ConfigError if bad)."""
    fields = {f.name: f for f in BenchConfig.option_fields()}
    if name not in fields:
        raise ConfigError(f"unknown option {name!r}")
    kind = str(fields[name].type)
    try:
        if kind in ("bool", "Optional[bool]"):
            return parse_bool(text)
        return _TYPES[kind](text)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"--{name} {text!r}: {exc}") from None


def config_parser(prog: str, description: Optional[str] = None) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser)
    return parser


def parse_config(argv: Sequence[str], prog: str = "benchmark.py") -> BenchConfig:
    """Benchmark options, as the command line takes them, to a BenchConfig."""
    return config_from_args(config_parser(prog).parse_args(list(argv)))
