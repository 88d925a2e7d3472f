"""``tp-bench plan``: per-rank memory and communication of every mesh and stack before anything
is launched, and ``--check RESULTS...``: the plan against measured peaks.

    tp-bench plan --model_name Qwen/Qwen3-32B --nproc 8 [--gpu_memory_gb 80] [run options]
    tp-bench plan --check results/ docs/plots/

The options are the run's (generated from BenchConfig), except that ``--impl`` and
``--zero_stage`` take several values and that without ``--dp_size`` / ``--tp_size`` every
factorization of ``--nproc`` is planned. The model is engine.plan; docs/plan.md explains it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from typing import Any, Optional, Sequence

from tp_bench.analysis.compare import expand_paths
from tp_bench.core.config import BenchConfig
from tp_bench.core.dims import ParallelDims
from tp_bench.core.errors import ConfigError
from tp_bench.core.results import load_result
from tp_bench.engine.fit import PROCESS_HOST_BYTES
from tp_bench.engine.plan import GIB, PlanRow, check_heads, layout_of, plan_row, resolve_for
from tp_bench.engine.shapes import ModelShapes, model_shapes
from tp_bench.frontends.arguments import ArgumentParser, add_config_arguments, config_from_args
from tp_bench.strategies import registry

MEMORY_COLUMNS = (("params", "params"), ("master", "master"), ("grads", "grads"),
                  ("optimizer", "optim"), ("activations", "activ"), ("logits", "logits"),
                  ("gathered", "gather"), ("transient", "transient"))
COMM_KINDS = (("tp", "all_reduce", "TP AR"), ("tp", "all_gather", "TP AG"),
              ("tp", "reduce_scatter", "TP RS"), ("dp", "all_reduce", "DP AR"),
              ("dp", "all_gather", "DP AG"), ("dp", "reduce_scatter", "DP RS"))
PHASE_NAMES = {"setup": "set-up", "forward_backward": "fwd/bwd", "backward_end": "bwd end",
               "optimizer_step": "opt step"}


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="tp-bench plan", description=(
        "Memory per rank (parameters, master weights, gradients, optimizer state, activations, "
        "logits, gathered copies, transients; the peak and its phase) and communication per "
        "step per rank, for every dp x tp factorization of --nproc and every stack, computed "
        "from the model's shapes without building it. GB are 2^30 bytes, as in results files."))
    plan = p.add_argument_group("Plan")
    plan.add_argument("--nproc", type=int, help="Number of GPUs (ranks) to plan for")
    plan.add_argument("--impl", nargs="+", metavar="IMPL",
                      help="Stacks to plan (default: every stack that declares its memory: "
                           f"{', '.join(_planned_impls())})")
    plan.add_argument("--zero_stage", type=int, nargs="+", choices=(0, 1, 2), metavar="N",
                      help="DeepSpeed ZeRO stages to plan (autotp; default: its default, 1)")
    plan.add_argument("--dp_size", type=int, help="Plan this dp only (default: every "
                      "factorization)")
    plan.add_argument("--tp_size", type=int, help="Plan this tp only (default: every "
                      "factorization)")
    plan.add_argument("--gpu_memory_gb", type=float, default=80.0,
                      help="Memory per GPU the peak must fit in, GB [80]")
    plan.add_argument("--format", choices=("table", "markdown", "json"), default="table",
                      help="terminal table, markdown or JSON [table]")
    plan.add_argument("--check", nargs="+", metavar="RESULTS",
                      help="Instead: compare the plan's peaks with the measured ones of these "
                           "results files (or directories of results_*.json)")
    add_config_arguments(p, exclude={"impl", "zero_stage", "dp_size", "tp_size"})
    return p


def _planned_impls() -> list[str]:
    return [name for name in registry.available() if registry.get(name).memory is not None]


# ---------------------------------------------------------------------- rows
@dataclasses.dataclass
class Plan:
    shapes: ModelShapes
    base: BenchConfig
    budget: int
    rows: list[PlanRow]
    skipped: list[tuple[str, str, str]]    # (impl, mesh, why)


def meshes(nproc: int, dp: Optional[int], tp: Optional[int]) -> list[ParallelDims]:
    if dp is None and tp is None:
        return ParallelDims.factorizations(nproc)
    if dp is None:
        if nproc % tp:
            raise ConfigError(f"--nproc {nproc} is not divisible by --tp_size {tp}")
        dp = nproc // tp
    return [ParallelDims.resolve(nproc, dp, tp)]


def make_plan(base: BenchConfig, nproc: int, impls: Sequence[str], zero_stages: Sequence[int],
              dims_list: Sequence[ParallelDims], budget: int) -> Plan:
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (got {nproc})")
    shapes = model_shapes(base.model_name, base.num_layers)
    rows, skipped = [], []
    for dims in dims_list:
        heads = check_heads(shapes, dims)
        for impl in impls:
            strategy = registry.get(impl)
            stages = zero_stages if zero_stages and "zero_stage" in strategy.options else [None]
            for zero in stages:
                if heads:
                    skipped.append((impl, dims.label, heads))
                    continue
                cfg = resolve_for(dataclasses.replace(base, zero_stage=zero), impl, dims)
                row = plan_row(cfg, shapes, budget=budget)
                if row is None:
                    skipped.append((impl, dims.label, "the stack declares no memory layout"))
                    continue
                toggled = dataclasses.replace(
                    cfg, activation_checkpointing=not cfg.activation_checkpointing)
                row.alternatives["activation_checkpointing"] = plan_row(toggled, shapes,
                                                                        budget=budget).peak
                rows.append(row)
    return Plan(shapes, base, budget, rows, skipped)


# ---------------------------------------------------------------------- rendering
def _gb(value: float, digits: int = 1) -> str:
    return f"{value / GIB:.{digits}f}"


def _zero(row: PlanRow) -> str:
    zero = row.options.get("zero_stage")
    return "-" if zero is None else str(zero)


def memory_cells(plan: Plan) -> tuple[list[str], list[list[str]]]:
    host = any(row.host_setup for row in plan.rows)
    toggled = "AC off" if plan.base.activation_checkpointing else "AC on"
    header = ["mesh", "impl", "ZeRO", *(label for _, label in MEMORY_COLUMNS), "peak GB",
              "at", "fits", f"peak {toggled}", *(["host GB"] if host else [])]
    body = []
    for row in plan.rows:
        fits = "yes" if row.fits else f"NO (+{_gb(row.peak - row.budget)})"
        other = row.alternatives.get("activation_checkpointing")
        body.append([row.mesh, row.impl, _zero(row),
                     *(_gb(row.memory[key]) for key, _ in MEMORY_COLUMNS),
                     _gb(row.peak), PHASE_NAMES[row.peak_phase], fits,
                     "-" if other is None else _gb(other),
                     *([_gb(row.host_setup) if row.host_setup else "-"] if host else [])])
    return header, body


def comm_cells(plan: Plan) -> tuple[list[str], list[list[str]]]:
    header = ["mesh", "impl", "ZeRO", *(label for _, _, label in COMM_KINDS), "total"]
    body = []
    for row in plan.rows:
        cells = []
        for group, kind, _ in COMM_KINDS:
            wire = sum(c.wire for c in row.comm if c.group == group and c.kind == kind)
            cells.append(_gb(wire, 2) if wire else "-")
        body.append([row.mesh, row.impl, _zero(row), *cells,
                     _gb(row.wire("tp") + row.wire("dp"), 2)])
    return header, body


def heading(plan: Plan) -> list[str]:
    c, cfg = plan.shapes.config, plan.base
    policy = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[cfg.dtype]
    fit = sum(1 for r in plan.rows if r.fits)
    return [
        f"{c.model_name}: {c.num_parameters / 1e9:.2f}B parameters, {c.num_layers} layers, "
        f"hidden {c.hidden_size}, vocab {c.vocab_size}; batch {cfg.batch_size} x seq "
        f"{cfg.seq_length}, accumulation {cfg.gradient_accumulation_steps}, {policy}"
        f"{' autocast' if cfg.autocast else ''}, activation checkpointing "
        f"{'on' if cfg.activation_checkpointing else 'off'}; {_gb(plan.budget)} GB per GPU",
        f"{fit} of {len(plan.rows)} configurations fit.",
    ]


FOOTNOTES = [
    "Memory per rank in GB (2^30 bytes), rank 0 (the largest shard when a split is uneven). "
    "params: the module's parameters; master: a separate float32 copy; grads: at the end of "
    "backward; activ: saved for backward, with the loss's saved softmax; logits: the loss's "
    "peak; gather: FSDP2's gathered compute copies; transient: the largest short-lived buffer "
    "(optimizer-step copies, reduce buckets, a recomputed layer). peak: the largest phase "
    "(set-up, forward/backward, end of backward, optimizer step). fits: peak <= the budget. "
    "peak AC on/off: the peak with activation checkpointing toggled.",
    "Communication: GB each rank sends per step (ring algorithms: an all-reduce of S sends "
    "2(n-1)/n S, an all-gather or reduce-scatter (n-1)/n S).",
]
HOST_NOTE = ("host GB: autotp builds the full float32 model in every rank before sharding it, "
             "in host memory when it takes more than half of the GPU: each rank on a machine "
             "needs this much host memory during set-up.")


def _numeric(column: list[str]) -> bool:
    return all(c in ("-", "") or c.lstrip("+-").replace(".", "", 1).rstrip("%").isdigit()
               for c in column)


def _text_table(header: list[str], body: list[list[str]]) -> str:
    columns = list(zip(*body)) if body else [[] for _ in header]
    right = [_numeric(list(c)) for c in columns]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if r else cell.ljust(w)
                       for cell, w, r in zip(row, widths, right)).rstrip()
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    columns = list(zip(*body)) if body else [[] for _ in header]
    align = ["---:" if _numeric(list(c)) else "---" for c in columns]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *body])


def render(plan: Plan, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(plan_json(plan), indent=1) + "\n"
    table = _markdown_table if fmt == "markdown" else _text_table
    parts = [*heading(plan), "", "Memory per rank (GB)", "",
             table(*memory_cells(plan)), "", "Communication per step per rank (GB sent)", "",
             table(*comm_cells(plan)), ""]
    parts += [f"not planned: {impl} {mesh}: {why}" for impl, mesh, why in plan.skipped]
    notes = FOOTNOTES + ([HOST_NOTE] if any(row.host_setup for row in plan.rows) else [])
    if fmt == "table":
        notes = [textwrap.fill(note, 100) for note in notes]
    parts += ["", *notes] if parts[-1] else notes
    return "\n".join(parts).rstrip() + "\n"


def plan_json(plan: Plan) -> dict[str, Any]:
    return {"model": plan.shapes.config.to_dict(), "config": plan.base.to_dict(),
            "budget_bytes": plan.budget, "rows": [r.to_dict() for r in plan.rows],
            "skipped": [{"impl": i, "mesh": m, "why": w} for i, m, w in plan.skipped]}


# ---------------------------------------------------------------------- --check
_FIELDS = {f.name for f in dataclasses.fields(BenchConfig)}


def predicted_vs_measured(doc: dict[str, Any]) -> dict[str, Any]:
    """The plan of a results file's configuration against what it measured."""
    config = {k: v for k, v in doc["config"].items() if k in _FIELDS}
    measurement = doc.get("measurement") or {}
    kind = measurement.get("memory")
    out: dict[str, Any] = {"impl": config.get("impl"), "model": config.get("model_name"),
                           "memory": kind}
    dims = ParallelDims(config.get("dp_size", 1), config.get("tp_size") or 1)
    out["mesh"] = dims.label
    if doc.get("status") != "complete":     # a peak cut short (an OOM, a stop) is no step's peak
        return {**out, "error": f"the run ended {doc.get('status')}, its peak is not compared"}
    try:
        # The attention kernel changes nothing here; flash_attn need not be installed. Files
        # written before --norm_impl existed ran HuggingFace's norm.
        cfg = BenchConfig(**{"norm_impl": "hf", **config, "attn_impl": "sdpa"})
        cfg = resolve_for(cfg, cfg.impl, dims)
        shapes = model_shapes(cfg.model_name, cfg.num_layers)
    except ConfigError as exc:
        return {**out, "error": str(exc)}
    strategy = doc.get("strategy") or {}
    build = strategy.get("build_device")
    layout = layout_of(cfg)
    if (layout is not None and layout.loss == "compiled"
            and "loss" not in str(strategy.get("compile"))):
        layout = dataclasses.replace(layout, loss="hf")   # compiled before the loss was
    row = plan_row(cfg, shapes, build_on_device=None if build is None else build != "cpu",
                   layout=layout)
    if row is None:
        return {**out, "error": f"{cfg.impl} declares no memory layout"}
    steps = max(v for k, v in row.phases.items() if k != "setup")
    measured = (doc.get("summary") or {}).get("peak_memory_gb")
    setup = (measurement.get("startup_rank0") or {}).get("setup_peak_gpu_gb")
    if kind == "process_rss":      # host RSS: the process's lifetime peak, with its own memory
        steps = max(steps, row.phases["setup"]) + PROCESS_HOST_BYTES
        setup = None
    out.update(label=row.label, batch_size=cfg.batch_size, seq_length=cfg.seq_length,
               activation_checkpointing=cfg.activation_checkpointing,
               layers=shapes.config.num_layers, compile=cfg.compile,
               predicted_gb=steps / GIB, measured_gb=measured,
               predicted_setup_gb=row.phases["setup"] / GIB if setup is not None else None,
               measured_setup_gb=setup, peak_phase=row.peak_phase)
    out["error"] = None
    out["error_pct"] = _pct(out["predicted_gb"], measured)
    out["setup_error_pct"] = _pct(out["predicted_setup_gb"], setup)
    return out


def _pct(predicted: Optional[float], measured: Optional[float]) -> Optional[float]:
    if predicted is None or not measured:
        return None
    return 100 * (predicted - measured) / measured


def check(paths: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for path in expand_paths(paths):
        row = predicted_vs_measured(load_result(path))
        rows.append({"file": str(path), **row})
    return rows


def _num(value: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_check(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    header = ["file", "run", "model", "batch x seq", "AC", "measured GB", "predicted GB",
              "error", "setup measured", "setup predicted", "setup error"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["file"], f"{r['impl']} {r['mesh']}", str(r["model"]), "-", "-",
                         f"not planned: {r['error']}", "", "", "", "", ""])
            continue
        body.append([r["file"], r["label"] + (" compile" if r["compile"] else ""),
                     f"{r['model']} ({r['layers']}L)", f"{r['batch_size']} x {r['seq_length']}",
                     "on" if r["activation_checkpointing"] else "off",
                     _num(r["measured_gb"]) + (" (RSS)" if r["memory"] == "process_rss" else ""),
                     _num(r["predicted_gb"]), _num(r["error_pct"], "+.1f", "%"),
                     _num(r["measured_setup_gb"]), _num(r["predicted_setup_gb"]),
                     _num(r["setup_error_pct"], "+.1f", "%")])
    table = _markdown_table if fmt == "markdown" else _text_table
    lines = [table(header, body), ""]
    gpu = [r for r in rows if not r.get("error") and r["memory"] == "cuda_allocator"
           and r["error_pct"] is not None]
    if gpu:
        worst = max(gpu, key=lambda r: abs(r["error_pct"]))
        lines.append(f"worst GPU row: {worst['file']} ({worst['label']}): predicted "
                     f"{worst['predicted_gb']:.2f} GB, measured {worst['measured_gb']:.2f} GB, "
                     f"{worst['error_pct']:+.1f}%")
    lines.append("measured: summary.peak_memory_gb (the largest step peak over ranks; CUDA "
                 "allocator, or the process's RSS on CPU: the lifetime peak with its own "
                 f"~{PROCESS_HOST_BYTES / GIB:.1f} GB, predicted likewise); set-up: "
                 "measurement.startup_rank0.setup_peak_gpu_gb against the plan's set-up phase.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- entry
def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    if args.check:
        sys.stdout.write(render_check(check(args.check), args.format))
        return 0
    if args.nproc is None:
        raise ConfigError("tp-bench plan needs --nproc N (the number of GPUs), or --check "
                          "RESULTS...")
    impls = args.impl or _planned_impls()
    for impl in impls:
        registry.get(impl)                     # an unknown name: one ConfigError line
    own = {"impl", "zero_stage", "dp_size", "tp_size"}
    base = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                  if k not in own}))
    budget = int(args.gpu_memory_gb * GIB)
    if budget <= 0:
        raise ConfigError(f"--gpu_memory_gb must be > 0 (got {args.gpu_memory_gb})")
    plan = make_plan(base, args.nproc, impls, args.zero_stage or [],
                     meshes(args.nproc, args.dp_size, args.tp_size), budget)
    sys.stdout.write(render(plan, args.format))
    return 0
