"""Repeated runs of one configuration, summarized across the runs.

A GPU step time moves more between processes of the same configuration than inside one run (10%
and more; 40% where the host launching kernels is the bottleneck), so one run per configuration
cannot rank two configurations a few percent apart. Runs whose settings are all equal (every
option but the output directory, the same versions and device) form a group; each group gets
the median of its runs' tokens/s with the lowest and highest, and each group is set against the
first: the ratio of the medians and, pairing the k-th run of each group (the k-th round of an
interleaved measurement), the median and quartiles of the per-round ratios, which cancel drifts
slower than a round.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tp_bench.analysis.compare import Comparison, Run, run_settings
from tp_bench.core.stats import median, quantile


@dataclass
class Group:
    """Complete, comparable runs of one configuration, in the order of their rounds."""

    index: int                          # 1-based, as shown in the table
    runs: list[Run]
    rounds: list[int]                   # each run's round (see group_runs), ascending

    @property
    def tokens_per_sec(self) -> list[float]:
        return [r.summary["avg_tokens_per_sec"] for r in self.runs]

    @property
    def step_ms(self) -> list[float]:
        return [r.summary["median_step_time_ms"] for r in self.runs]


def group_runs(comparison: Comparison,
               given: Optional[Sequence[str | os.PathLike]] = None) -> list[Group]:
    """Groups of identical settings, in order of first appearance in the comparison (the
    baseline's group first); runs that are incomplete or not comparable with the baseline are
    left out (the comparison's notes say why). A run's round is its place among all the runs of
    its configuration in the order ``given`` (the files as passed, before the comparison moved
    its baseline first; the comparison's order without it), incomplete runs counted, so a failed
    run in round 2 does not pair round 3 of its configuration with round 2 of another."""
    keys = [json.dumps({"label": [run.config["impl"], run.mesh], **run_settings(run)},
                       sort_keys=True, default=str) for run in comparison.runs]
    order = list(range(len(comparison.runs)))
    if given is not None:
        position = {Path(p).resolve(): i for i, p in enumerate(given)}
        order.sort(key=lambda n: position.get(comparison.runs[n].path.resolve(), -1))
    seen: dict[str, int] = {}
    round_of: dict[int, int] = {}
    for n in order:
        seen[keys[n]] = seen.get(keys[n], 0) + 1
        round_of[n] = seen[keys[n]]
    keyed: dict[str, list[int]] = {}
    for n, row in enumerate(comparison.rows):
        if row["comparable"] and row["tokens_per_sec"]:   # comparable: complete, too
            keyed.setdefault(keys[n], []).append(n)
    groups = []
    for i, members in enumerate(keyed.values(), start=1):
        members.sort(key=round_of.__getitem__)
        groups.append(Group(i, [comparison.runs[n] for n in members],
                            [round_of[n] for n in members]))
    return groups


def has_repeats(groups: list[Group]) -> bool:
    return any(len(g.runs) > 1 for g in groups)


def group_row(group: Group, first: Group) -> dict[str, Any]:
    """What one line of the repeats table shows, as plain data."""
    tps = group.tokens_per_sec
    row: dict[str, Any] = {
        "group": group.index, "runs": [r.index for r in group.runs],
        "impl": group.runs[0].config["impl"], "mesh": group.runs[0].mesh,
        "differs": group.runs[0].differs if group is not first else [],
        "tokens_per_sec_median": median(tps), "tokens_per_sec_min": min(tps),
        "tokens_per_sec_max": max(tps), "step_ms_median": median(group.step_ms),
        "ratio_of_medians": median(tps) / median(first.tokens_per_sec),
        "paired": None,
    }
    first_by_round = dict(zip(first.rounds, first.tokens_per_sec))
    pairs = [t / first_by_round[k] for k, t in zip(group.rounds, tps) if k in first_by_round]
    if group is not first and pairs:
        row["paired"] = {"median": median(pairs), "q1": quantile(pairs, 0.25),
                         "q3": quantile(pairs, 0.75), "min": min(pairs), "max": max(pairs),
                         "pairs": len(pairs)}
    return row


def rows(groups: list[Group]) -> list[dict[str, Any]]:
    return [group_row(g, groups[0]) for g in groups]


def _paired_text(paired: Optional[dict[str, Any]]) -> str:
    if paired is None:
        return "-"
    return (f"{paired['median']:.2f}x [{paired['q1']:.2f}-{paired['q3']:.2f}] "
            f"(n={paired['pairs']})")


def table_cells(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    header = ["group", "impl", "mesh", "runs", "tok/s median", "min-max", "step ms median",
              "vs G1 (medians)", "vs G1 per round: median [q1-q3]"]
    body = []
    for row in rows(groups):
        body.append([
            f"G{row['group']}", row["impl"], row["mesh"],
            ",".join(f"#{i}" for i in row["runs"]), f"{row['tokens_per_sec_median']:,.0f}",
            f"{row['tokens_per_sec_min']:,.0f}-{row['tokens_per_sec_max']:,.0f}",
            f"{row['step_ms_median']:.1f}", f"{row['ratio_of_medians']:.2f}x",
            _paired_text(row["paired"])])
    return header, body


def _notes(groups: list[Group]) -> list[str]:
    out = [f"G{row['group']}: {', '.join(row['differs'])}" for row in rows(groups)[1:]
           if row["differs"]]
    out.append("Repeated configurations: runs with equal settings grouped; tok/s is each run's "
               "total tokens / total time; per round: the k-th run of a group against the k-th "
               "of G1.")
    return out


def format_table(groups: list[Group]) -> str:
    header, body = table_cells(groups)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
             for cells in [header, ["-" * w for w in widths], *body]]
    return "\n".join(["", *lines, "", *_notes(groups)]) + "\n"


def format_markdown(groups: list[Group]) -> str:
    header, body = table_cells(groups)
    align = ["---" if i < 4 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, align, *body)]
    return "\n".join(["", *lines, "", *[f"- {n}" for n in _notes(groups)]]) + "\n"


FORMATS = {"table": format_table, "markdown": format_markdown}
