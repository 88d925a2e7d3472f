"""Command line: ``tp-bench [run] [options]``, ``tp-bench models``, ``tp-bench compare``.

``benchmark.py`` and ``tp-bench`` share this entry point; with no subcommand the options are a
benchmark run, exactly as the seed's ``benchmark.py`` takes them. Argument errors are reported
once (by rank 0) and every rank exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Optional, Sequence

from tp_bench.config import BenchConfig, ConfigError
from tp_bench.distributed import env_rank


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing, so only rank 0 reports the error."""

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


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("auto", "none") else int(text)


def _optional_float(text: str) -> Optional[float]:
    return None if text.lower() in ("auto", "none") else float(text)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per BenchConfig field, grouped as the seed's tables."""
    from tp_bench.parallel.factory import available_strategies

    groups: dict[str, Any] = {}
    for f in BenchConfig.option_fields():
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        choices = meta["choices"] or (tuple(available_strategies()) if f.name == "impl" else None)
        help_text = meta["help"]
        if choices:
            help_text += f" ({', '.join(map(str, choices))})"
        default_text = "auto" if f.default is None else str(f.default).lower() \
            if isinstance(f.default, bool) else str(f.default)
        help_text += f" [default: {default_text}]"
        flag = f"--{f.name}"
        if f.type in ("bool", bool):
            # `--autocast` and `--autocast true|false` both work.
            group.add_argument(flag, type=parse_bool, nargs="?", const=True, default=f.default,
                               metavar="BOOL", help=help_text)
            if f.name == "use_vocab_parallel":
                group.add_argument("--no_vocab_parallel", dest="use_vocab_parallel",
                                   action="store_false",
                                   help="Disable vocabulary-parallel embeddings (AutoTP only)")
            continue
        kind = {"int": int, "float": float, "str": str, "Optional[int]": _optional_int,
                "Optional[float]": _optional_float}[str(f.type)]
        group.add_argument(flag, type=kind, default=f.default, help=help_text,
                           metavar=meta["metavar"] or f.name.upper())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in vars(args).items() if k in names})


# ---------------------------------------------------------------------- subcommands
def cmd_run(argv: Sequence[str]) -> int:
    parser = _Parser(prog="benchmark.py", description="Benchmark one tensor-parallel training "
                     "configuration (launch with torchrun for several ranks). Other commands: "
                     f"tp-bench {{{','.join(c for c in SUBCOMMANDS if c != 'run')}}} --help.")
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    from tp_bench import runner

    runner.run(cfg)
    from tp_bench import distributed

    distributed.teardown()
    return 0


def cmd_models(argv: Sequence[str]) -> int:
    parser = _Parser(prog="tp-bench models", description="List the shipped model presets.")
    parser.parse_args(argv)
    from tp_bench.models import get_model_builder
    from tp_bench.models.resolve import list_presets

    print(f"{'name':28} {'preset':22} {'type':7} {'layers':>6} {'hidden':>6} {'heads':>5} "
          f"{'kv':>3} {'vocab':>7} {'params':>9}")
    for preset in list_presets():
        mc = get_model_builder(preset.name).get_config()
        print(f"{preset.name:28} {preset.key:22} {mc.model_type:7} {mc.num_layers:>6} "
              f"{mc.hidden_size:>6} {mc.num_attention_heads:>5} {mc.num_key_value_heads:>3} "
              f"{mc.vocab_size:>7} {mc.num_parameters / 1e9:>8.3f}B")
    print("\nAlso accepted: a local directory with config.json, or a path to a config .json.")
    return 0


def cmd_parity(argv: Sequence[str]) -> int:
    parser = _Parser(prog="tp-bench parity", description="Train a few steps with one strategy "
                     "and compare losses, grad norms and step-0 gradients with a single-process "
                     "reference (rank 0). Exit status 1 when a tolerance is exceeded.")
    add_config_arguments(parser)
    checks = parser.add_argument_group("Parity")
    checks.add_argument("--parity_steps", type=int, default=5, help="Steps to compare [5]")
    checks.add_argument("--no_grads", action="store_true",
                        help="Skip the per-parameter step-0 gradient comparison")
    checks.add_argument("--tolerances", type=float, nargs=4,
                        metavar=("STEP0", "LOSS", "GRAD_NORM", "GRAD"),
                        help="Step-0 loss and any-step loss (absolute), grad-norm and per-"
                             "parameter gradient (relative) tolerances "
                             "[float32: 1e-5 1e-3 1e-3 1e-4; bf16/fp16: 5e-2 each]")
    checks.add_argument("--report", help="Write the report as JSON to this path (rank 0)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    from tp_bench import distributed, parity, results, runner

    ctx = distributed.setup()
    session = runner.prepare(cfg, ctx)
    session.setup()
    report = parity.check(session, args.parity_steps, capture_grads=not args.no_grads)
    ok = True
    if report is not None:
        tolerances = (parity.Tolerances(*args.tolerances) if args.tolerances
                      else parity.Tolerances.for_dtype(session.cfg.dtype))
        ok = report.ok(tolerances)
        print(parity.format_report(report, tolerances, session.cfg))
        if args.report:
            results.write_json_atomic(args.report, {**report.to_dict(), "ok": ok,
                                                    "tolerances": dataclasses.asdict(tolerances),
                                                    "config": session.cfg.to_dict()})
    verdict = torch_broadcast_flag(ok)
    distributed.teardown()
    return 0 if verdict else 1


def cmd_compare(argv: Sequence[str]) -> int:
    parser = _Parser(prog="tp-bench compare", description="Compare results files side by side: "
                     "one row per run, ratios to the first run (or --baseline). Runs with a "
                     "different model, sequence length, precision policy or device type are "
                     "flagged as not comparable instead of ranked.")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="results JSON files, or directories holding results_*.json")
    parser.add_argument("--baseline", metavar="FILE",
                        help="the run the ratios refer to (shown first) [the first FILE]")
    parser.add_argument("--format", choices=("table", "markdown", "json"), default="table",
                        help="terminal table, markdown for a pull request, or JSON [table]")
    parser.add_argument("--plot", metavar="DIR",
                        help="also write PNG charts to DIR (needs matplotlib)")
    args = parser.parse_args(argv)
    from tp_bench import report

    comparison = report.compare(args.files, args.baseline)
    written = []
    if args.plot:
        from tp_bench import plots

        written = plots.write_plots(comparison, args.plot)
    sys.stdout.write(report.FORMATS[args.format](comparison))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_gate(argv: Sequence[str]) -> int:
    from tp_bench import ci_gate

    return ci_gate.main(argv, prog="tp-bench gate")


def torch_broadcast_flag(flag: bool) -> bool:
    """Rank 0's verdict, on every rank (so every rank exits with the same status)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "run": cmd_run,
    "models": cmd_models,
    "parity": cmd_parity,
    "compare": cmd_compare,
    "gate": cmd_gate,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = SUBCOMMANDS[argv[0]], argv[1:]
    else:
        command = cmd_run
    try:
        return command(argv)
    except ConfigError as exc:
        if env_rank() == 0:
            print(f"tp_bench: error: {exc}", file=sys.stderr, flush=True)
        return 2


def entry() -> None:
    """Process entry point (console script, benchmark.py, python -m tp_bench).

    Leaves with ``os._exit`` once a process group has existed: gloo's worker threads can still
    hold tensors at interpreter shutdown and abort the process ("terminate called without an
    active exception", pytorch/pytorch#190489) after the run has already succeeded.
    """
    import os

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if "torch.distributed" in sys.modules:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
