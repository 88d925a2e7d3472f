"""CI regression gate: fail when a benchmark got slower than its stored baseline, not on noise.

    tp-bench gate BASELINE FRESH [--threshold PCT] [--statistic median|min]

BASELINE and FRESH are pytest-benchmark JSON files (``--benchmark-json``, or an autosaved file)
or tp_bench results JSON files (each measured step is a round), or directories of either.
Benchmarks are matched by name (pytest-benchmark's ``fullname``; a results file's name).

The rule, per benchmark, on time per round (a step):

    slowdown = fresh statistic / baseline statistic - 1        (statistic: median by default)
    REGRESSION  when  slowdown > threshold                     (default 5%)
                and   fresh q1 > baseline q3                   (the shift exceeds the spread)

The second condition asks that the fresh run's interquartile range lie wholly above the
baseline's: three quarters of the fresh rounds are slower than three quarters of the baseline
rounds. Noise between two honest runs moves the medians but leaves the quartile boxes
overlapping; a real slowdown of the work moves the whole distribution. Quartiles come from
pytest-benchmark's stats as stored (so autosaved files without raw data work); for results
files, from the step times. A speed-up beyond both is reported as FASTER and never fails.

Exit status: 0 no regression, 1 at least one regression (each named, with both values and the
slowdown), 2 bad input (missing or unreadable file, no benchmark in common, a run that did not
complete, or a baseline and a fresh run that record different options for the same benchmark).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tp_bench.core.stats import quantile

# Config keys that do not change what one round measures: a longer run has more rounds.
_RUN_LENGTH_KEYS = {"output_dir", "num_training_steps", "log_interval", "warmup_steps",
                    "profile"}


class GateInputError(ValueError):
    """Bad input: exit status 2."""


@dataclass(frozen=True)
class Sample:
    """One benchmark's time per round (seconds), summarized."""

    name: str
    median: float
    min: float
    q1: float
    q3: float
    rounds: int
    source: str                              # the file it came from
    config: Optional[dict[str, Any]] = None  # what it measured, when the file says

    def statistic(self, which: str) -> float:
        return self.median if which == "median" else self.min


@dataclass(frozen=True)
class Verdict:
    name: str
    status: str          # "ok", "regression", "faster", "missing", "new"
    baseline: Optional[Sample] = None
    fresh: Optional[Sample] = None
    change: Optional[float] = None           # fresh / baseline - 1 of the chosen statistic
    beyond_spread: Optional[bool] = None


# ---------------------------------------------------------------------- loading
def _from_pytest_benchmark(doc: dict[str, Any], source: str) -> list[Sample]:
    samples = []
    for bench in doc["benchmarks"]:
        stats = bench.get("stats") or {}
        try:
            samples.append(Sample(name=bench["fullname"], median=stats["median"],
                                  min=stats["min"], q1=stats["q1"], q3=stats["q3"],
                                  rounds=stats["rounds"], source=source,
                                  config=(bench.get("extra_info") or {}).get("config")))
        except KeyError as exc:
            raise GateInputError(f"{source}: benchmark {bench.get('fullname', '?')} lacks "
                                 f"{exc.args[0]!r}") from None
    return samples


def results_name(doc: dict[str, Any]) -> str:
    """A results file's benchmark name: what was run, independent of where it was written."""
    c = doc["config"]
    return (f"{c['impl']} dp{c['dp_size']}xtp{c['tp_size']} {c['model_name']} "
            f"seq{c['seq_length']} bs{c['batch_size']}")


def _from_results(doc: dict[str, Any], source: str) -> list[Sample]:
    status = doc.get("status", "complete")
    if status != "complete":
        raise GateInputError(f"{source}: run status is {status!r}, not 'complete'"
                             + (f" ({doc['error']})" if doc.get("error") else ""))
    times = [s["step_time_s"] for s in doc["steps"]]
    if not times:
        raise GateInputError(f"{source}: no measured steps")
    return [Sample(name=results_name(doc), median=statistics.median(times), min=min(times),
                   q1=quantile(times, 0.25), q3=quantile(times, 0.75), rounds=len(times), source=source, config=doc["config"])]


def load_samples(path: str | Path) -> dict[str, Sample]:
    """Every benchmark in a file, or in the *.json files of a directory, by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise GateInputError(f"{path}: no .json files in this directory")
    elif path.exists():
        files = [path]
    else:
        raise GateInputError(f"{path}: no such file")
    samples: dict[str, Sample] = {}
    for file in files:
        try:
            doc = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise GateInputError(f"{file}: cannot read ({exc})") from None
        if isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list):
            found = _from_pytest_benchmark(doc, str(file))
        elif isinstance(doc, dict) and {"config", "steps", "summary"} <= doc.keys():
            found = _from_results(doc, str(file))
        else:
            raise GateInputError(f"{file}: neither pytest-benchmark JSON nor tp_bench results")
        for sample in found:
            if sample.name in samples:
                raise GateInputError(f"benchmark {sample.name!r} appears twice "
                                     f"({samples[sample.name].source}, {file})")
            samples[sample.name] = sample
    return samples


# ---------------------------------------------------------------------- the rule
def judge(baseline: Sample, fresh: Sample, threshold: float,
          statistic: str = "median") -> Verdict:
    """Apply the rule (module docstring) to one benchmark; ``threshold`` is a fraction."""
    if baseline.statistic(statistic) <= 0:
        raise GateInputError(f"{baseline.name}: baseline {statistic} is not positive "
                             f"({baseline.source})")
    change = fresh.statistic(statistic) / baseline.statistic(statistic) - 1
    slower_beyond_spread = fresh.q1 > baseline.q3
    faster_beyond_spread = fresh.q3 < baseline.q1
    if change > threshold and slower_beyond_spread:
        status = "regression"
    elif change < -threshold and faster_beyond_spread:
        status = "faster"
    else:
        status = "ok"
    beyond = slower_beyond_spread if change >= 0 else faster_beyond_spread
    return Verdict(baseline.name, status, baseline, fresh, change, beyond)


def config_differences(baseline: Sample, fresh: Sample) -> list[str]:
    """Options in which the two measured different things (empty when unknown).

    Only options both record count: an option added since the baseline, at a default that
    keeps the old behaviour, must not block every pull request until the baseline is redone.
    """
    if not baseline.config or not fresh.config:
        return []
    keys = (baseline.config.keys() & fresh.config.keys()) - _RUN_LENGTH_KEYS
    return [f"{k} {fresh.config.get(k)!r} vs {baseline.config.get(k)!r}" for k in sorted(keys)
            if baseline.config.get(k) != fresh.config.get(k)]


def gate(baseline: dict[str, Sample], fresh: dict[str, Sample], threshold: float,
         statistic: str = "median") -> list[Verdict]:
    common = [name for name in baseline if name in fresh]
    if not common:
        raise GateInputError(
            "no benchmark in common between baseline and fresh run "
            f"(baseline: {', '.join(sorted(baseline)) or 'none'}; "
            f"fresh: {', '.join(sorted(fresh)) or 'none'})")
    verdicts = []
    for name in common:
        diff = config_differences(baseline[name], fresh[name])
        if diff:
            raise GateInputError(f"{name}: baseline and fresh run measured different "
                                 f"configurations: {'; '.join(diff)}")
        verdicts.append(judge(baseline[name], fresh[name], threshold, statistic))
    verdicts += [Verdict(n, "missing", baseline=baseline[n]) for n in baseline if n not in fresh]
    verdicts += [Verdict(n, "new", fresh=fresh[n]) for n in fresh if n not in baseline]
    return verdicts


# ---------------------------------------------------------------------- output
def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def describe(v: Verdict, threshold: float, statistic: str) -> str:
    """One line per benchmark; a regression's line names it, both values and the slowdown."""
    if v.status == "missing":
        return f"MISSING    {v.name}: in the baseline, not in the fresh run"
    if v.status == "new":
        return (f"NEW        {v.name}: no baseline yet "
                f"(fresh {statistic} {_time(v.fresh.statistic(statistic))})")
    b, f = v.baseline, v.fresh
    values = f"{statistic} {_time(b.statistic(statistic))} -> {_time(f.statistic(statistic))}"
    if v.status == "regression":
        return (f"REGRESSION {v.name}: slower by {100 * v.change:.1f}% ({values}), beyond the "
                f"{100 * threshold:g}% threshold and the spread (fresh q1 {_time(f.q1)} > "
                f"baseline q3 {_time(b.q3)})")
    head = f"{v.name}: {values} ({100 * v.change:+.1f}%)"
    if v.status == "faster":
        return (f"FASTER     {head}: beyond threshold and spread; refresh the baseline once "
                f"this lands")
    why = ("within the threshold" if abs(v.change) <= threshold
           else "within the spread (quartile ranges overlap)")
    return f"ok         {head}: {why}"


def markdown(verdicts: Sequence[Verdict], threshold: float, statistic: str) -> str:
    lines = [f"### Benchmark gate ({statistic}, threshold {100 * threshold:g}%)", "",
             f"| benchmark | baseline {statistic} | fresh {statistic} | change | "
             f"fresh q1 / baseline q3 | rounds | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for v in verdicts:
        if v.baseline and v.fresh:
            lines.append(f"| `{v.name}` | {_time(v.baseline.statistic(statistic))} | "
                         f"{_time(v.fresh.statistic(statistic))} | {100 * v.change:+.1f}% | "
                         f"{_time(v.fresh.q1)} / {_time(v.baseline.q3)} | "
                         f"{v.baseline.rounds} / {v.fresh.rounds} | **{v.status}** |")
        else:
            lines.append(f"| `{v.name}` | | | | | | {v.status} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- command line
def _percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if value < 0:
        raise argparse.ArgumentTypeError("the threshold cannot be negative")
    return value / 100


def build_parser(prog: str) -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)[1]
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", help="stored baseline: JSON file or directory")
    parser.add_argument("fresh", help="fresh run: JSON file or directory")
    parser.add_argument("--threshold", type=_percent, default=0.05, metavar="PCT",
                        help="slowdown (percent) tolerated before the spread is even looked at "
                             "[5; CPU runners need more, e.g. 25]")
    parser.add_argument("--statistic", choices=("median", "min"), default="median",
                        help="time per round compared against the threshold; min suits "
                             "machines whose noise only ever adds time [median]")
    parser.add_argument("--summary", metavar="FILE",
                        help="also append a markdown table to FILE (e.g. $GITHUB_STEP_SUMMARY)")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "tp-bench gate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        verdicts = gate(load_samples(args.baseline), load_samples(args.fresh), args.threshold,
                        args.statistic)
    except GateInputError as exc:
        print(f"tp_bench gate: error: {exc}", file=sys.stderr)
        return 2
    for v in verdicts:
        print(describe(v, args.threshold, args.statistic))
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(markdown(verdicts, args.threshold, args.statistic))
    regressions = [v for v in verdicts if v.status == "regression"]
    compared = sum(v.baseline is not None and v.fresh is not None for v in verdicts)
    print(f"{len(regressions)} regression(s) in {compared} benchmark(s) compared")
    return 1 if regressions else 0

