"""Comparison of results files: one row per run, ratios to a baseline run, comparability.

Rows are listed in the order given, never sorted by speed: a ratio is shown only where the run
is comparable with the baseline (same model, sequence length, numeric contract and device type)
and completed; anything else is flagged with the reason, so a faster number from a different
workload, or from a run that diverged or stopped early, cannot pass for a faster
implementation. Reads results files of schema versions 1 and 2 (``SCHEMA_VERSIONS``).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from tp_bench.core.dims import ParallelDims
from tp_bench.core.errors import ConfigError

# 1: the first version; 2: impl-specific options null where they do not apply, the applied root
# and layer TP plans, statuses "diverged" and "interrupted", skipped steps apart, strict JSON.
SCHEMA_VERSIONS = (1, 2)

# Config keys every run label already shows (or that say nothing about the run).
_LABEL_KEYS = {"impl", "tp_size", "dp_size", "output_dir"}
# Environment keys worth naming when two runs differ in them (a torch upgrade, another GPU).
_ENV_KEYS = ("device_name", "torch", "deepspeed", "transformers", "tp_bench", "cuda", "nccl")
# Model dimensions that define the workload; the preset name alone could hide a --num_layers.
_MODEL_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class Run:
    """One results file and what the table needs from it."""

    index: int                      # 1-based, as shown in the table
    path: Path
    doc: dict[str, Any]
    differs: list[str] = field(default_factory=list)   # where it departs from the baseline

    @property
    def config(self) -> dict[str, Any]:
        return self.doc["config"]

    @property
    def summary(self) -> dict[str, Any]:
        return self.doc.get("summary") or {}

    @property
    def mesh(self) -> str:
        c = self.config
        return ParallelDims(c["dp_size"], c["tp_size"], c.get("dp_replicate") or 1).label

    @property
    def nodes(self) -> str:
        """nodes x ranks per node, from the topology the run recorded (``?`` before schema 2)."""
        topology = (self.doc.get("environment") or {}).get("topology")
        if not topology:
            return "?"
        per_node = set(topology["ranks_per_node"].values())
        ranks = per_node.pop() if len(per_node) == 1 else "mixed"
        return f"{topology['nodes']}x{ranks}"

    @property
    def short_label(self) -> str:
        return f"#{self.index} {self.config['impl']} {self.mesh}"


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; a directory stands for the results_*.json files in it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("results_*.json"))
            if not found:
                raise ConfigError(f"{p}: no results_*.json files in this directory")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such file")
    return out


def load_run(path: Path, index: int) -> Run:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read results ({exc})") from None
    if isinstance(doc, dict) and "benchmarks" in doc:
        raise ConfigError(f"{path}: a pytest-benchmark file, not tp_bench results; gate it with "
                          f"`tp-bench gate`")
    if not isinstance(doc, dict) or not {"config", "steps", "summary"} <= doc.keys():
        raise ConfigError(f"{path}: not a tp_bench results file (needs config, steps, summary)")
    version = doc.get("schema_version", 1)
    if version not in SCHEMA_VERSIONS:
        raise ConfigError(f"{path}: results schema {version} is newer than this tp_bench reads "
                          f"({', '.join(map(str, SCHEMA_VERSIONS))}); update tp_bench")
    return Run(index, path, doc)


def run_status(doc: dict[str, Any]) -> str:
    """The run's status; a "partial" file whose process is gone (same host) is "stale"."""
    status = doc.get("status", "complete")
    run = doc.get("run") or {}
    if status == "partial" and run.get("host") == socket.gethostname() and run.get("pid"):
        if not Path(f"/proc/{run['pid']}").exists():
            return "stale"
    return status


# ---------------------------------------------------------------------- comparability
def model_identity(doc: dict[str, Any]) -> tuple:
    model = doc.get("model")
    if model:
        return tuple(model.get(k) for k in _MODEL_KEYS)
    cfg = doc["config"]
    return (cfg["model_name"], cfg.get("num_layers", 0))


def model_label(doc: dict[str, Any]) -> str:
    """Preset or hub name as given; a local path shortened to its directory name."""
    cfg, model = doc["config"], doc.get("model") or {}
    name = str(cfg["model_name"])
    if name.startswith((".", "/", "~")):
        path = Path(name)
        name = path.parent.name if path.suffix == ".json" else path.name
    layers = model.get("num_layers") or cfg.get("num_layers")
    return f"{name} ({layers}L)" if layers else name


def precision_key(doc: dict[str, Any]) -> tuple:
    """The numeric contract: what is computed, kept and reduced in which dtype. How a stack
    gets there (FSDP2's casts, DeepSpeed's bf16 module copy, autocast) is its business: it is
    shown, and the loss curves say whether the runs train alike."""
    p = doc.get("precision")
    if not p:
        return (doc["config"].get("dtype"), None, None, None)
    return (p.get("compute_dtype"), p.get("master_weights"), p.get("optimizer_state_dtype"),
            p.get("grad_reduce_dtype"))


def precision_label(doc: dict[str, Any]) -> str:
    """compute/master/reduce, e.g. ``bf16/fp32/fp32``; optimizer state added when it differs,
    ``autocast`` when that is the policy."""
    dtypes = precision_key(doc)
    policy = (doc.get("precision") or {}).get("policy")
    compute, master, opt_state, reduce = (_SHORT_DTYPE.get(d, d or "?") for d in dtypes)
    label = f"{compute}/{master}/{reduce}"
    if opt_state not in (master, "?"):
        label += f" opt {opt_state}"
    return f"{label} autocast" if policy == "autocast" else label


def comparability_reasons(base: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Why ``other`` cannot be ranked against ``base`` (empty when it can)."""
    reasons = []
    status = run_status(other)
    if status != "complete":
        reasons.append(f"status {status}")
    if model_identity(base) != model_identity(other):
        reasons.append(f"model {model_label(other)} vs {model_label(base)}")
    if base["config"]["seq_length"] != other["config"]["seq_length"]:
        reasons.append(f"seq {other['config']['seq_length']} vs {base['config']['seq_length']}")
    if precision_key(base) != precision_key(other):
        reasons.append(f"precision {precision_label(other)} vs {precision_label(base)}")
    dev_b = (base.get("environment") or {}).get("device_type")
    dev_o = (other.get("environment") or {}).get("device_type")
    if dev_b != dev_o:
        reasons.append(f"device {dev_o} vs {dev_b}")
    return reasons


def run_settings(run: Run) -> dict[str, Any]:
    """The options (but the impl, mesh and output directory) and versions of one run."""
    env = run.doc.get("environment") or {}
    out = {k: v for k, v in run.config.items() if k not in _LABEL_KEYS}
    out.update({k: env.get(k) for k in _ENV_KEYS})
    return out


def _differing_settings(runs: Sequence[Run]) -> None:
    """Fill each run's ``differs``: the options and versions in which it departs from the
    baseline (the first run), so two rows of the same impl and mesh can be told apart."""
    base = run_settings(runs[0])
    for run in runs[1:]:
        mine = run_settings(run)
        run.differs = [f"{k}={_setting_text(mine.get(k))}" for k in sorted(mine.keys() | base.keys())
                       if json.dumps(mine.get(k)) != json.dumps(base.get(k))]


def _setting_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


# ---------------------------------------------------------------------- rows
def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or not base:
        return None
    return value / base


def run_row(run: Run, baseline: Run) -> dict[str, Any]:
    """Everything one table row shows, as plain data (the JSON format is this)."""
    s, cfg, doc = run.summary, run.config, run.doc
    median = s.get("median_step_time_ms")
    breakdown = s.get("timing_breakdown") or {}
    reasons = [] if run is baseline else comparability_reasons(baseline.doc, doc)
    row = {
        "run": run.index,
        "file": str(run.path),
        "status": run_status(doc),
        "impl": cfg["impl"],
        "mesh": run.mesh,
        "nodes": run.nodes,
        "model": model_label(doc),
        "seq_length": cfg["seq_length"],
        "batch_size": cfg["batch_size"],
        "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps", 1),
        "precision": precision_label(doc),
        "device": (doc.get("environment") or {}).get("device_name"),
        "num_steps": s.get("num_steps", 0),
        "tokens_per_sec": s.get("avg_tokens_per_sec"),
        "tokens_per_sec_per_gpu": s.get("avg_tokens_per_sec_per_gpu"),
        "step_ms_median": median,
        "step_ms_iqr": s.get("iqr_step_time_ms"),
        "step_spread_pct": (100 * s["iqr_step_time_ms"] / median
                            if median and s.get("iqr_step_time_ms") is not None else None),
        "forward_pct": breakdown.get("forward_pct"),
        "backward_pct": breakdown.get("backward_pct"),
        "optimizer_pct": breakdown.get("optimizer_pct"),
        "other_pct": breakdown.get("other_pct"),
        "peak_memory_gb": s.get("peak_memory_gb"),
        "memory_kind": (doc.get("measurement") or {}).get("memory"),
        "mfu": s.get("mfu"),
        "final_loss": s.get("final_loss"),
        "differs": run.differs,
        "baseline": baseline.index,
        "comparable": not reasons,
        "not_comparable": reasons,
    }
    b = baseline.summary
    row["ratio"] = None if reasons else {
        "tokens_per_sec": _ratio(row["tokens_per_sec"], b.get("avg_tokens_per_sec")),
        "tokens_per_sec_per_gpu": _ratio(row["tokens_per_sec_per_gpu"],
                                         b.get("avg_tokens_per_sec_per_gpu")),
        "step_ms_median": _ratio(median, b.get("median_step_time_ms")),
        "peak_memory_gb": _ratio(row["peak_memory_gb"], b.get("peak_memory_gb")),
    }
    return row


@dataclass
class Comparison:
    runs: list[Run]
    baseline: Run
    rows: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.index, "runs": self.rows, "notes": notes(self)}


def compare(paths: Sequence[str | os.PathLike],
            baseline: Optional[str | os.PathLike] = None) -> Comparison:
    """Load the runs (the baseline first, once) and build the rows."""
    files = expand_paths(paths)
    if baseline is not None:
        base_path = expand_paths([baseline])
        if len(base_path) != 1:
            raise ConfigError(f"--baseline must be one results file, {baseline} holds "
                              f"{len(base_path)}")
        files = base_path + [f for f in files if f.resolve() != base_path[0].resolve()]
    if not files:
        raise ConfigError("no results files given")
    docs = [load_run(path, 0) for path in files]
    complete = [i for i, run in enumerate(docs) if run_status(run.doc) == "complete"]
    if baseline is not None and 0 not in complete:
        raise ConfigError(f"--baseline {baseline}: status {run_status(docs[0].doc)}, not a valid "
                          f"baseline")
    if not complete:
        raise ConfigError("no complete run among the files: nothing to compare against")
    order = [complete[0]] + [i for i in range(len(docs)) if i != complete[0]]
    runs = [Run(n, docs[i].path, docs[i].doc) for n, i in enumerate(order, start=1)]
    _differing_settings(runs)
    rows = [run_row(r, runs[0]) for r in runs]
    return Comparison(runs, runs[0], rows)


def notes(comparison: Comparison) -> list[str]:
    """Footnotes: what sets runs apart, what is not comparable, what is incomplete."""
    out = []
    base = comparison.baseline.index
    for run in comparison.runs:
        extra = (f" (vs #{base}: {', '.join(run.differs)})" if run.differs
                 else " (baseline)" if run is comparison.baseline else "")
        out.append(f"#{run.index}: {run.path}{extra}")
    for run, row in zip(comparison.runs, comparison.rows):
        if row["not_comparable"]:
            out.append(f"#{row['run']}: not comparable with #{row['baseline']}: "
                       f"{'; '.join(row['not_comparable'])}")
        if row["status"] != "complete":
            error = run.doc.get("error")
            out.append(f"#{row['run']}: status {row['status']} ({row['num_steps']} measured steps)"
                       + (f": {error}" if error else ""))
        elif not row["num_steps"]:
            out.append(f"#{row['run']}: no measured steps")
    kinds = {row["memory_kind"] for row in comparison.rows}
    if "process_rss" in kinds:
        out.append("peak GB on CPU is the process's peak RSS, not allocator memory")
    return out


# ---------------------------------------------------------------------- formatting
def _num(value: Optional[float]) -> str:
    """Three significant-ish figures without scientific notation: 12,345 / 678.9 / 5.43."""
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _phases(row: dict[str, Any]) -> str:
    parts = (row["forward_pct"], row["backward_pct"], row["optimizer_pct"])
    return "n/a" if any(p is None for p in parts) else "/".join(f"{p:.0f}" for p in parts)


def _ratio_text(row: dict[str, Any], key: str) -> str:
    if row["ratio"] is None:
        return "n/c"
    return _fmt(row["ratio"][key], ".2f", "x")


def table_cells(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    base = comparison.baseline.index
    header = ["#", "impl", "mesh", "nodes x ranks", "model", "seq", "batch", "precision c/m/r", "tok/s",
              "tok/s/GPU", "step ms (median)", "IQR", "fwd/bwd/opt %", "peak GB", "MFU",
              "final loss", f"tok/s vs #{base}", f"mem vs #{base}"]
    body = []
    for row in comparison.rows:
        batch = str(row["batch_size"])
        if row["gradient_accumulation_steps"] > 1:
            batch += f"x{row['gradient_accumulation_steps']}"
        status = "" if row["status"] == "complete" else f" ({row['status']})"
        body.append([
            f"{row['run']}{status}", row["impl"], row["mesh"], row["nodes"], row["model"],
            str(row["seq_length"]), batch, row["precision"], _num(row["tokens_per_sec"]),
            _num(row["tokens_per_sec_per_gpu"]), _fmt(row["step_ms_median"], ".1f"),
            _fmt(row["step_spread_pct"], ".0f", "%"), _phases(row),
            _fmt(row["peak_memory_gb"], ".2f"), _fmt(row["mfu"] and 100 * row["mfu"], ".1f", "%"),
            _fmt(row["final_loss"], ".4f"), _ratio_text(row, "tokens_per_sec"),
            _ratio_text(row, "peak_memory_gb"),
        ])
    return header, body


# Columns that hold numbers are right-aligned.
_LEFT_COLUMNS = 8


def format_table(comparison: Comparison) -> str:
    header, body = table_cells(comparison)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < _LEFT_COLUMNS else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in body]
    lines += [""] + notes(comparison) + [_legend(comparison)]
    return "\n".join(lines) + "\n"


def format_markdown(comparison: Comparison) -> str:
    header, body = table_cells(comparison)
    align = ["---" if i < _LEFT_COLUMNS else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, align, *body)]
    lines.append("")
    lines += [f"- {n}" for n in notes(comparison)]
    lines.append(f"- {_legend(comparison)}")
    return "\n".join(lines) + "\n"


def _legend(comparison: Comparison) -> str:
    return (f"tok/s: global tokens per second (total tokens / total time); step ms: median over "
            f"measured steps, IQR as % of it; precision: compute/master/grad-reduce dtypes; "
            f"ratios to #{comparison.baseline.index}, n/c = not comparable.")


def format_json(comparison: Comparison) -> str:
    return json.dumps(comparison.to_dict(), indent=2) + "\n"


FORMATS = {"table": format_table, "markdown": format_markdown, "json": format_json}
