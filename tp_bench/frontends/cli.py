"""Command line: ``tp-bench [run] [options]``, ``tp-bench models``, ``tp-bench compare``,
``tp-bench plan`` and the others in ``SUBCOMMANDS``.

``benchmark.py`` and ``tp-bench`` share this entry point; with no subcommand the options are a
benchmark run, exactly as the seed's ``benchmark.py`` takes them. Argument errors are reported
once (by rank 0) and every rank exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence

from tp_bench.core.dist import env_rank, from_rank0
from tp_bench.core.errors import ConfigError
from tp_bench.frontends.arguments import ArgumentParser, config_from_args, config_parser

RANK0_FIRST_S = 3.0
QUICK_TRY = ("torchrun --nproc_per_node=2 benchmark.py --impl fsdp_dtensor --model_name tiny "
             "--seq_length 256 --num_training_steps 30")


# ---------------------------------------------------------------------- subcommands
def cmd_run(argv: Sequence[str]) -> int:
    parser = config_parser("benchmark.py", "Benchmark one tensor-parallel training "
                           "configuration (launch with torchrun for several ranks). Other "
                           "commands: tp-bench {" + ",".join(c for c in SUBCOMMANDS if c != "run")
                           + "} --help.")
    cfg = config_from_args(parser.parse_args(argv))
    from tp_bench.core import dist
    from tp_bench.engine import run

    run.run(cfg)
    dist.teardown()
    return 0


def cmd_models(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="tp-bench models", description="List the shipped model presets.")
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


def parity_parser() -> ArgumentParser:
    parser = config_parser("tp-bench parity", "Train a few steps with one strategy and compare "
                           "losses, grad norms and step-0 gradients with a single-process "
                           "reference (rank 0). Exit status 1 when a tolerance is exceeded.")
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
    return parser


def run_parity(args: Any, ctx: Any) -> bool:
    """One parity check in an existing process group (``ctx``); True on every rank when it
    passed. The session is closed afterwards, so that another check can follow."""
    from tp_bench.core import results
    from tp_bench.engine import parity
    from tp_bench.engine.session import prepare

    session = prepare(config_from_args(args), ctx)
    session.setup()
    try:
        report = parity.check(session, args.parity_steps, capture_grads=not args.no_grads)
        ok = True
        if report is not None:
            tolerances = (parity.Tolerances(*args.tolerances) if args.tolerances
                          else parity.Tolerances.for_dtype(session.cfg.dtype))
            ok = report.ok(tolerances)
            print(parity.format_report(report, tolerances, session.cfg))
            if args.report:
                results.write_json_atomic(args.report, {
                    **report.to_dict(), "ok": ok, "tolerances": dataclasses.asdict(tolerances),
                    "config": session.cfg.to_dict()})
    finally:
        session.close()
    return from_rank0(ok)   # every rank ends with rank 0's verdict


def cmd_parity(argv: Sequence[str]) -> int:
    args = parity_parser().parse_args(argv)
    from tp_bench.core import dist

    ok = run_parity(args, dist.setup())
    dist.teardown()
    return 0 if ok else 1


def cmd_compare(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="tp-bench compare", description="Compare results files side by side: "
                     "one row per run, ratios to the first run (or --baseline). Runs with a "
                     "different model, sequence length, precision policy or device type are "
                     "flagged as not comparable instead of ranked. Where a configuration was "
                     "run more than once, a second table groups its runs: median tokens/s, "
                     "lowest and highest, and ratios to the first group (of the medians, and "
                     "per round: the k-th run of each group against the k-th of the first).")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="results JSON files, or directories holding results_*.json")
    parser.add_argument("--baseline", metavar="FILE",
                        help="the run the ratios refer to (shown first) [the first FILE]")
    parser.add_argument("--format", choices=("table", "markdown", "json"), default="table",
                        help="terminal table, markdown for a pull request, or JSON [table]")
    parser.add_argument("--plot", metavar="DIR",
                        help="also write PNG charts to DIR (needs matplotlib)")
    args = parser.parse_args(argv)
    from tp_bench.analysis import compare, repeats

    comparison = compare.compare(args.files, args.baseline)
    groups = repeats.group_runs(comparison, compare.expand_paths(args.files))
    written = []
    if args.plot:
        from tp_bench.analysis import plots

        written = plots.write_plots(comparison, args.plot)
    if args.format == "json":
        doc = comparison.to_dict()
        doc["repeats"] = repeats.rows(groups) if repeats.has_repeats(groups) else []
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(compare.FORMATS[args.format](comparison))
        if repeats.has_repeats(groups):
            sys.stdout.write(repeats.FORMATS[args.format](groups))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_gate(argv: Sequence[str]) -> int:
    from tp_bench.analysis import gate

    return gate.main(argv, prog="tp-bench gate")


def cmd_sweep(argv: Sequence[str]) -> int:
    from tp_bench.frontends import sweep

    return sweep.main(argv)


def cmd_plan(argv: Sequence[str]) -> int:
    from tp_bench.frontends import plan

    return plan.main(argv)


def cmd_selfcheck(argv: Sequence[str]) -> int:
    from tp_bench.frontends import selfcheck

    return selfcheck.main(argv)


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "run": cmd_run,
    "models": cmd_models,
    "parity": cmd_parity,
    "compare": cmd_compare,
    "gate": cmd_gate,
    "sweep": cmd_sweep,
    "plan": cmd_plan,
    "selfcheck": cmd_selfcheck,
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
            hint = (f"; with no arguments tp-bench runs the seed's default (Qwen/Qwen3-32B, "
                    f"autotp), made for GPUs: on this machine try `{QUICK_TRY}`"
                    if not argv and command is cmd_run else "")
            print(f"tp_bench: error: {exc}{hint}", file=sys.stderr, flush=True)
        else:
            # Every rank finds the same problem, rank 0 says it: the others leave a little later,
            # or torchrun could stop rank 0 (SIGTERM) before its line is out; stopped by torchrun
            # meanwhile, they still leave with this status.
            signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
            time.sleep(RANK0_FIRST_S)
        return 2


def entry() -> None:
    """Process entry point (console script, benchmark.py, python -m tp_bench). Once a process
    group may have existed, it leaves through ``core.dist.leave``."""
    code = main()
    if "torch.distributed" in sys.modules:
        from tp_bench.core.dist import leave

        leave(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
