"""CI regression gate: fail when a benchmark got slower than its baseline, not on noise.

    tp-bench gate BASELINE FRESH [--confirm FRESH2] [--threshold PCT] [--alpha P]
    tp-bench gate --history DIR FRESH [--confirm FRESH2]

BASELINE and FRESH are pytest-benchmark JSON files (``--benchmark-json``, or saved runs) or
tp_bench results files (each measured step is a round), or directories of either. With
``--history``, every file and every sub-directory of DIR is one baseline run. Benchmarks are
matched by name (pytest-benchmark's ``fullname``; a results file's name).

The rule, per benchmark, on the time per round:

    slowdown   = fresh median / baseline median - 1
    REGRESSION when  slowdown > max(threshold, history spread)      (a change that matters)
               and   Mann-Whitney U: fresh rounds > baseline rounds, p < alpha   (not noise)

The effect must exceed the threshold (default 15%) and, with a history, the largest departure
of any baseline run's median from the baseline median (what honest runs did among themselves,
e.g. a GPU whose whole runs shift by 10%); the rank test asks that the fresh rounds be slower
than the baseline rounds as a whole, not by one lucky median. With a history the baseline
median is the median of the runs' medians, so one baseline taken on a lucky or unlucky day does
not decide alone. A file without per-round data (a run saved without --benchmark-save-data)
falls back to the quartile rule: fresh q1 above baseline q3. The mirror image is reported as
FASTER and never fails.

Confirmation (``--confirm FRESH2``, a second fresh run taken after FRESH failed): a benchmark
is a REGRESSION only when it is one in both. The rank test treats a run's rounds as
independent, but they share the machine's state: a whole run can be 30-50% slower than the
last on a shared CPU (10% on a GPU), more than its spread over rounds, and no test inside one
run can tell that from a slower code. A second run minutes later can: a slower code is slower
again, a passing shift of the machine is not (PyTorch's dashboards ask for several consecutive
points for the same reason). docs/compare.md gives the false-alarm rate and the power measured
on the CPU machine, with and without confirmation, and how to measure them on yours.

Exit status: 0 no regression, 1 at least one regression (each named, with both values, the
slowdown and the test), 2 bad input (missing or unreadable file, no benchmark in common, a run
that did not complete, or baseline and fresh recording different options for one benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tp_bench.core.stats import mann_whitney_greater, median, quantile

# Config keys that do not change what one round measures: a longer run has more rounds.
_RUN_LENGTH_KEYS = {"output_dir", "num_training_steps", "log_interval", "warmup_steps",
                    "profile", "force"}
DEFAULT_THRESHOLD = 0.10     # with --confirm: docs/compare.md, "Calibration"
DEFAULT_ALPHA = 0.001
MIN_ROUNDS = 8          # per side, for the rank test; below it the quartile rule decides


class GateInputError(ValueError):
    """Bad input: exit status 2."""


@dataclass(frozen=True)
class Sample:
    """One benchmark's time per round (seconds) in one run."""

    name: str
    median: float
    min: float
    q1: float
    q3: float
    rounds: int
    source: str                              # the file it came from
    config: Optional[dict[str, Any]] = None  # what it measured, when the file says
    data: Optional[tuple[float, ...]] = None  # every round, when the file has them

    def statistic(self, which: str) -> float:
        return self.median if which == "median" else self.min

    @classmethod
    def of(cls, name: str, times: Sequence[float], source: str,
           config: Optional[dict[str, Any]] = None) -> "Sample":
        return cls(name, median(times), min(times), quantile(times, 0.25),
                   quantile(times, 0.75), len(times), source, config, tuple(times))


@dataclass(frozen=True)
class Baseline:
    """One benchmark's baseline: one run, or a history of several."""

    runs: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return self.runs[0].name

    def statistic(self, which: str) -> float:
        """The median over runs of each run's statistic."""
        return statistics.median(r.statistic(which) for r in self.runs)

    def spread(self, which: str) -> float:
        """The largest relative departure of one run from the baseline (0 for a single run)."""
        center = self.statistic(which)
        return max(abs(r.statistic(which) / center - 1) for r in self.runs)

    @property
    def data(self) -> Optional[list[float]]:
        if any(r.data is None for r in self.runs):
            return None
        return [t for r in self.runs for t in r.data]

    @property
    def q3(self) -> float:
        return statistics.median(r.q3 for r in self.runs)

    @property
    def q1(self) -> float:
        return statistics.median(r.q1 for r in self.runs)

    @property
    def rounds(self) -> int:
        return sum(r.rounds for r in self.runs)


@dataclass(frozen=True)
class Verdict:
    name: str
    status: str          # "ok", "regression", "unconfirmed", "faster", "missing", "new"
    baseline: Optional[Baseline] = None
    fresh: Optional[Sample] = None
    change: Optional[float] = None           # fresh / baseline - 1 of the chosen statistic
    threshold: Optional[float] = None        # the effect the change had to exceed
    p_slower: Optional[float] = None         # rank test: fresh slower (None: quartile rule)
    p_faster: Optional[float] = None
    confirmation: Optional["Verdict"] = None  # the same benchmark in the second fresh run


# ---------------------------------------------------------------------- loading
def _from_pytest_benchmark(doc: dict[str, Any], source: str) -> list[Sample]:
    samples = []
    for bench in doc["benchmarks"]:
        stats = bench.get("stats") or {}
        config = (bench.get("extra_info") or {}).get("config")
        try:
            if stats.get("data"):
                samples.append(Sample.of(bench["fullname"], stats["data"], source, config))
            else:
                samples.append(Sample(name=bench["fullname"], median=stats["median"],
                                      min=stats["min"], q1=stats["q1"], q3=stats["q3"],
                                      rounds=stats["rounds"], source=source, config=config))
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
    return [Sample.of(results_name(doc), times, source, doc["config"])]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise GateInputError(f"{path}: no .json files in this directory")
        return files
    if path.exists():
        return [path]
    raise GateInputError(f"{path}: no such file")


def load_samples(path: str | Path) -> dict[str, Sample]:
    """Every benchmark of one run: a file, or the *.json files of a directory, by name."""
    samples: dict[str, Sample] = {}
    for file in _files(Path(path)):
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


def load_history(directory: str | Path) -> dict[str, Baseline]:
    """Several baseline runs: every .json file and every sub-directory of ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise GateInputError(f"--history {directory}: not a directory")
    runs = sorted(p for p in directory.iterdir() if p.is_dir() or p.suffix == ".json")
    if not runs:
        raise GateInputError(f"--history {directory}: no runs (.json files or directories)")
    by_name: dict[str, list[Sample]] = {}
    for run in runs:
        for name, sample in load_samples(run).items():
            by_name.setdefault(name, []).append(sample)
    return {name: Baseline(tuple(samples)) for name, samples in by_name.items()}


def single(samples: dict[str, Sample]) -> dict[str, Baseline]:
    return {name: Baseline((s,)) for name, s in samples.items()}


# ---------------------------------------------------------------------- the rule
def judge(baseline: Baseline, fresh: Sample, threshold: float = DEFAULT_THRESHOLD,
          statistic: str = "median", alpha: float = DEFAULT_ALPHA) -> Verdict:
    """Apply the rule (module docstring) to one benchmark; ``threshold`` is a fraction."""
    base = baseline.statistic(statistic)
    if base <= 0:
        raise GateInputError(f"{baseline.name}: baseline {statistic} is not positive "
                             f"({baseline.runs[0].source})")
    change = fresh.statistic(statistic) / base - 1
    needed = max(threshold, baseline.spread(statistic))
    base_data = baseline.data
    if (base_data is not None and fresh.data is not None
            and min(len(base_data), len(fresh.data)) >= MIN_ROUNDS):
        p_slower = mann_whitney_greater(fresh.data, base_data)
        p_faster = mann_whitney_greater(base_data, fresh.data)
        slower, faster = p_slower < alpha, p_faster < alpha
    else:       # no per-round data: the quartile boxes must not overlap
        p_slower = p_faster = None
        slower, faster = fresh.q1 > baseline.q3, fresh.q3 < baseline.q1
    if change > needed and slower:
        status = "regression"
    elif change < -needed and faster:
        status = "faster"
    else:
        status = "ok"
    return Verdict(baseline.name, status, baseline, fresh, change, needed, p_slower, p_faster)


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


def gate(baseline: dict[str, Baseline], fresh: dict[str, Sample],
         threshold: float = DEFAULT_THRESHOLD, statistic: str = "median",
         alpha: float = DEFAULT_ALPHA) -> list[Verdict]:
    common = [name for name in baseline if name in fresh]
    if not common:
        raise GateInputError(
            "no benchmark in common between baseline and fresh run "
            f"(baseline: {', '.join(sorted(baseline)) or 'none'}; "
            f"fresh: {', '.join(sorted(fresh)) or 'none'})")
    verdicts = []
    for name in common:
        for run in baseline[name].runs:
            diff = config_differences(run, fresh[name])
            if diff:
                raise GateInputError(f"{name}: baseline and fresh run measured different "
                                     f"configurations: {'; '.join(diff)}")
        verdicts.append(judge(baseline[name], fresh[name], threshold, statistic, alpha))
    verdicts += [Verdict(n, "missing", baseline=baseline[n]) for n in baseline if n not in fresh]
    verdicts += [Verdict(n, "new", fresh=fresh[n]) for n in fresh if n not in baseline]
    return verdicts


def confirm(first: Sequence[Verdict], second: Sequence[Verdict]) -> list[Verdict]:
    """A regression of the first fresh run stands only when the second fresh run has it too;
    otherwise it is "unconfirmed" (passes). Other verdicts are the first run's."""
    again = {v.name: v for v in second}
    out = []
    for v in first:
        if v.status == "regression":
            w = again.get(v.name)
            status = "regression" if w is not None and w.status == "regression" else "unconfirmed"
            v = dataclasses.replace(v, status=status, confirmation=w)
        out.append(v)
    return out


# ---------------------------------------------------------------------- output
def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _evidence(v: Verdict, slower: bool) -> str:
    p = v.p_slower if slower else v.p_faster
    if p is None:
        return (f"quartiles apart (fresh q1 {_time(v.fresh.q1)} > baseline q3 "
                f"{_time(v.baseline.q3)})" if slower else "quartiles apart")
    return f"Mann-Whitney p = {p:.2g}, {v.fresh.rounds} vs {v.baseline.rounds} rounds"


def _again(v: Optional[Verdict]) -> str:
    if v is None or v.change is None:
        return "not measured there"
    return f"{100 * v.change:+.1f}%, {v.status}"


def describe(v: Verdict, statistic: str, alpha: float = DEFAULT_ALPHA) -> str:
    """One line per benchmark; a regression's line names it, both values, the slowdown and the
    evidence."""
    if v.status == "missing":
        return f"MISSING    {v.name}: in the baseline, not in the fresh run"
    if v.status == "new":
        return (f"NEW        {v.name}: no baseline yet "
                f"(fresh {statistic} {_time(v.fresh.statistic(statistic))})")
    b, f = v.baseline, v.fresh
    values = f"{statistic} {_time(b.statistic(statistic))} -> {_time(f.statistic(statistic))}"
    runs = f" over {len(b.runs)} baseline runs" if len(b.runs) > 1 else ""
    if v.status == "regression":
        again = (f"; confirmed by the second fresh run ({_again(v.confirmation)})"
                 if v.confirmation else "")
        return (f"REGRESSION {v.name}: slower by {100 * v.change:.1f}% ({values}{runs}), beyond "
                f"the {100 * v.threshold:.3g}% threshold and significant ({_evidence(v, True)})"
                f"{again}")
    if v.status == "unconfirmed":
        return (f"ok         {v.name}: slower by {100 * v.change:.1f}% in the first fresh run "
                f"({values}), not in the second ({_again(v.confirmation)}): the machine "
                f"shifted, not the code")
    head = f"{v.name}: {values} ({100 * v.change:+.1f}%{runs})"
    if v.status == "faster":
        return (f"FASTER     {head}: beyond the threshold and significant; refresh the "
                f"baseline once this lands")
    if abs(v.change) <= v.threshold:
        why = f"within the {100 * v.threshold:.3g}% threshold"
    else:
        p = v.p_slower if v.change > 0 else v.p_faster
        why = ("not significant (quartile ranges overlap)" if p is None
               else f"not significant (Mann-Whitney p = {p:.2g} >= {alpha:g})")
    return f"ok         {head}: {why}"


def markdown(verdicts: Sequence[Verdict], statistic: str) -> str:
    lines = [f"### Benchmark gate ({statistic})", "",
             f"| benchmark | baseline {statistic} | fresh {statistic} | change | needed | "
             f"p (slower) | rounds | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in verdicts:
        if v.baseline and v.fresh:
            p = "quartiles" if v.p_slower is None else f"{v.p_slower:.2g}"
            lines.append(f"| `{v.name}` | {_time(v.baseline.statistic(statistic))} | "
                         f"{_time(v.fresh.statistic(statistic))} | {100 * v.change:+.1f}% | "
                         f"{100 * v.threshold:.3g}% | {p} | "
                         f"{v.baseline.rounds} / {v.fresh.rounds} | **{v.status}** |")
        else:
            lines.append(f"| `{v.name}` | | | | | | | {v.status} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- command line
def _percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if value < 0:
        raise argparse.ArgumentTypeError("the threshold cannot be negative")
    return value / 100


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("alpha is a probability between 0 and 1")
    return value


def build_parser(prog: str) -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)[1]
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="BASELINE FRESH",
                        help="baseline and fresh run (files or directories); with --history, "
                             "the fresh run alone")
    parser.add_argument("--history", metavar="DIR",
                        help="several baseline runs: every .json file and sub-directory of DIR")
    parser.add_argument("--confirm", metavar="FRESH2",
                        help="a second fresh run, taken after FRESH failed: only regressions "
                             "in both fail")
    parser.add_argument("--threshold", type=_percent, default=DEFAULT_THRESHOLD, metavar="PCT",
                        help=f"smallest slowdown (percent) that counts "
                             f"[{100 * DEFAULT_THRESHOLD:g}]")
    parser.add_argument("--alpha", type=_probability, default=DEFAULT_ALPHA, metavar="P",
                        help=f"significance level of the rank test [{DEFAULT_ALPHA:g}]")
    parser.add_argument("--statistic", choices=("median", "min"), default="median",
                        help="time per round the threshold applies to; min suits machines "
                             "whose noise only ever adds time [median]")
    parser.add_argument("--summary", metavar="FILE",
                        help="also append a markdown table to FILE (e.g. $GITHUB_STEP_SUMMARY)")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "tp-bench gate") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    expected = 1 if args.history else 2
    if len(args.runs) != expected:
        parser.error("give BASELINE and FRESH, or --history DIR and FRESH")
    try:
        baseline = (load_history(args.history) if args.history
                    else single(load_samples(args.runs[0])))
        verdicts = gate(baseline, load_samples(args.runs[-1]), args.threshold,
                        args.statistic, args.alpha)
        if args.confirm:
            verdicts = confirm(verdicts, gate(baseline, load_samples(args.confirm),
                                              args.threshold, args.statistic, args.alpha))
    except GateInputError as exc:
        print(f"tp_bench gate: error: {exc}", file=sys.stderr)
        return 2
    for v in verdicts:
        print(describe(v, args.statistic, args.alpha))
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(markdown(verdicts, args.statistic))
    regressions = [v for v in verdicts if v.status == "regression"]
    compared = sum(v.baseline is not None and v.fresh is not None for v in verdicts)
    print(f"{len(regressions)} regression(s) in {compared} benchmark(s) compared")
    return 1 if regressions else 0
