"""PNG charts of a comparison (``tp-bench compare --plot DIR``); matplotlib is optional.

Four charts, one question each: who is faster (throughput), who needs more memory (memory),
where the step time goes (phases), and whether the runs train the same model (loss).
Horizontal bars, so run labels of any length stay readable.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional

from tp_bench.core.errors import ConfigError
from tp_bench.analysis.compare import Comparison, Run
from tp_bench.core.stats import quantile

_PHASES = (("forward", "#4c72b0"), ("backward", "#dd8452"), ("optimizer", "#55a868"),
           ("other", "#b0b0b0"))
_NOT_COMPARABLE = "#c44e52"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'tp_bench[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display on a CI runner or a GPU node
    import matplotlib.pyplot as plt

    return plt


def run_label(run: Run) -> str:
    """``#2 fsdp_dtensor dp1xtp2`` plus what sets the run apart, wrapped to fit a chart margin."""
    label = run.short_label
    if run.differs:
        label += "\n" + textwrap.fill(", ".join(run.differs), 38)
    return label


def _bar_colors(comparison: Comparison) -> list[str]:
    return ["#4c72b0" if row["comparable"] else _NOT_COMPARABLE for row in comparison.rows]


def _comparability_note(ax, comparison: Comparison) -> None:
    if not all(row["comparable"] for row in comparison.rows):
        ax.text(0.0, -0.16, f"red: not comparable with #{comparison.baseline.index} "
                "(see the table)", transform=ax.transAxes, fontsize=8, color=_NOT_COMPARABLE,
                va="top")


def _figure(plt, n_runs: int, comparison: Comparison):
    height = 1.6 + 0.55 * n_runs + 0.15 * sum(len(r.differs) > 0 for r in comparison.runs)
    fig, ax = plt.subplots(figsize=(9, max(3.0, height)))
    return fig, ax


def _barh(plt, comparison: Comparison, values: list[Optional[float]], title: str, xlabel: str,
          fmt: str, errors: Optional[list[tuple[float, float]]] = None):
    runs = comparison.runs
    fig, ax = _figure(plt, len(runs), comparison)
    ys = list(range(len(runs)))
    shown = [v or 0.0 for v in values]
    xerr = None
    if errors:
        xerr = [[e[0] for e in errors], [e[1] for e in errors]]
    ax.barh(ys, shown, color=_bar_colors(comparison), xerr=xerr, capsize=3,
            error_kw={"elinewidth": 1, "ecolor": "#333333"})
    # value labels go past the whisker, so the two never overlap
    ends = [v + (e[1] if errors else 0.0) for v, e in zip(shown, errors or [(0, 0)] * len(shown))]
    top = max(ends + [1e-12])
    for y, v, end in zip(ys, values, ends):
        ax.text(end + 0.01 * top, y, "n/a" if v is None else format(v, fmt),
                va="center", ha="left", fontsize=9)
    ax.set_yticks(ys, [run_label(r) for r in runs], fontsize=9)
    ax.invert_yaxis()   # first run on top, as in the table
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    _comparability_note(ax, comparison)
    return fig


def _throughput_errors(comparison: Comparison) -> list[tuple[float, float]]:
    """Tokens/s at the step-time quartiles around the bar: the run's own spread."""
    errors = []
    for run, row in zip(comparison.runs, comparison.rows):
        times = [s["step_time_s"] for s in run.doc.get("steps", [])]
        tokens = (run.doc.get("measurement") or {}).get("tokens_per_step")
        value = row["tokens_per_sec"]
        if len(times) < 4 or not tokens or value is None:
            errors.append((0.0, 0.0))
            continue
        slow, fast = tokens / quantile(times, 0.75), tokens / quantile(times, 0.25)
        errors.append((max(0.0, value - slow), max(0.0, fast - value)))
    return errors


def plot_throughput(plt, comparison: Comparison):
    values = [row["tokens_per_sec"] for row in comparison.rows]
    return _barh(plt, comparison, values, "Throughput (global)",
                 "tokens/s (total tokens / total time; whiskers: step-time quartiles)", ",.0f",
                 _throughput_errors(comparison))


def plot_memory(plt, comparison: Comparison):
    kinds = {row["memory_kind"] for row in comparison.rows}
    what = {"process_rss": "process peak RSS", "cuda_allocator": "CUDA allocator peak"}
    kind_text = ", ".join(sorted(what.get(k, str(k)) for k in kinds))
    values = [row["peak_memory_gb"] for row in comparison.rows]
    return _barh(plt, comparison, values, f"Peak memory per rank ({kind_text}, max over ranks)",
                 "peak memory (GB)", ".2f")


def plot_phases(plt, comparison: Comparison):
    """Mean step time split into phases (ms), stacked; 'other' is what no phase covers."""
    runs = comparison.runs
    fig, ax = _figure(plt, len(runs), comparison)
    ys = list(range(len(runs)))
    left = [0.0] * len(runs)
    longest = max([r.summary.get("avg_step_time_ms") or 0.0 for r in runs] + [1e-12])
    for phase, color in _PHASES:
        widths = []
        for run, row in zip(runs, comparison.rows):
            pct = row[f"{phase}_pct"]
            mean_ms = run.summary.get("avg_step_time_ms") or 0.0
            # other_pct can dip below zero: phases are maxed over ranks one by one
            widths.append(max(0.0, pct or 0.0) * mean_ms / 100)
        ax.barh(ys, widths, left=left, color=color, label=phase)
        for y, x, w in zip(ys, left, widths):
            if w > 0.07 * longest:   # a number only where it fits inside its segment
                ax.text(x + w / 2, y, f"{w:.0f}", ha="center", va="center", fontsize=8,
                        color="white")
        left = [a + b for a, b in zip(left, widths)]
    for y, row in zip(ys, comparison.rows):
        if row["forward_pct"] is None:
            ax.text(0, y, " no phase times (--timing none)", va="center", fontsize=8)
    ax.set_yticks(ys, [run_label(r) for r in runs], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left + [1e-12]) * 1.05)
    ax.set_xlabel("mean step time (ms), split by phase")
    ax.set_title("Where the step time goes", pad=24)
    ax.legend(loc="lower center", fontsize=8, ncols=4, bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _comparability_note(ax, comparison)
    return fig


def plot_loss(plt, comparison: Comparison):
    """Every step's loss (warm-up included) of every run on one chart: runs that train the
    same model from the same weights and tokens lie on top of each other."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5.5 + 0.22 * len(comparison.runs)))
    styles = ["-", "--", "-.", ":"]
    for i, run in enumerate(comparison.runs):
        records = sorted((run.doc.get("warmup") or []) + run.doc.get("steps", []),
                         key=lambda r: r["step"])
        if not records:
            continue
        ax.plot([r["step"] for r in records], [r["loss"] for r in records],
                linestyle=styles[i % len(styles)], marker="o", markersize=2.5, linewidth=1.4,
                label=run_label(run).replace("\n", " "))
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title("Loss curves (warm-up steps included)")
    groups = coinciding_losses(comparison)
    if groups:
        # identical curves hide each other; say so rather than let a run look missing
        text = "; ".join(" = ".join(f"#{i}" for i in g) for g in groups)
        ax.text(0.99, 0.98, f"same loss at every step (within {LOSS_MATCH:g}): {text}",
                transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    # below the axes: inside, it would hide the curves it names
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=1,
              frameon=False)
    return fig


LOSS_MATCH = 1e-3   # absolute loss difference below which two curves are drawn as one


def coinciding_losses(comparison: Comparison) -> list[list[int]]:
    """Groups (run numbers) whose loss agrees at every step both recorded, to LOSS_MATCH."""
    curves = {}
    for run in comparison.runs:
        records = (run.doc.get("warmup") or []) + run.doc.get("steps", [])
        curves[run.index] = {r["step"]: r["loss"] for r in records}
    groups: list[list[int]] = []
    for index, curve in curves.items():
        for group in groups:
            ref = curves[group[0]]
            common = curve.keys() & ref.keys()
            if common and all(abs(curve[s] - ref[s]) <= LOSS_MATCH for s in common):
                group.append(index)
                break
        else:
            groups.append([index])
    return [g for g in groups if len(g) > 1]


CHARTS = {"throughput.png": plot_throughput, "memory.png": plot_memory,
          "phases.png": plot_phases, "loss.png": plot_loss}


def write_plots(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """Write every chart to ``out_dir``; returns the paths written."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, chart in CHARTS.items():
        fig = chart(plt, comparison)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written



def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (memory, throughput) points no other point beats on both: less memory and more
    throughput. Sorted by memory."""
    front: list[tuple[float, float]] = []
    for memory, rate in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or rate > front[-1][1]:
            front.append((memory, rate))
    return front


def sweep_scatter(summary: dict, path: str | Path) -> Path:
    """tokens/s against peak memory, one colour per impl, each impl's Pareto front drawn and its
    best configuration circled (``tp-bench sweep --plot``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in summary["configurations"]
            if r["outcome"] == "ok" and r["tokens_per_sec"] and r["peak_memory_gb"] is not None]
    best_ids = {b["id"] for b in summary["best"].values()}
    for n, impl in enumerate(sorted({r["impl"] for r in rows})):
        color = f"C{n}"
        mine = [r for r in rows if r["impl"] == impl]
        ax.scatter([r["peak_memory_gb"] for r in mine], [r["tokens_per_sec"] for r in mine],
                   color=color, label=impl, alpha=0.7)
        front = pareto_front([(r["peak_memory_gb"], r["tokens_per_sec"]) for r in mine])
        ax.plot([m for m, _ in front], [t for _, t in front], color=color, linestyle="--",
                linewidth=1)
        for r in mine:
            if r["id"] in best_ids:
                ax.scatter([r["peak_memory_gb"]], [r["tokens_per_sec"]], s=200,
                           facecolors="none", edgecolors=color, linewidths=2)
    ax.set_xlabel("peak memory per rank (GB)")
    ax.set_ylabel("tokens/s (median step)")
    ax.set_title(f"sweep: {summary['model']} (dashed: Pareto front, circled: best)")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
