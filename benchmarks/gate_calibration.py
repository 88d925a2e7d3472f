"""Measure the regression gate on this machine, with the benchmark suite's own JSON.

    python benchmarks/gate_calibration.py --pairs 20 --factors 1.3 2.0 --out out/gate_cal \
        -- -m "(autotp or fsdp_dtensor) and not parity"

Runs ``--pairs + 2`` honest suite runs of the unchanged code (H1, H2, ...) and, after each
of the first ``--pairs + 1``, one run per slowdown factor with every phase made slower
(tests/slowdown_injection.py), interleaved so that slow drifts of the machine weigh on all
alike. Then, with the gate's default threshold and alpha, alone and with the confirmation CI
uses (a second fresh run after a failure, ``tp-bench gate --confirm``):

- false alarms: the honest pairs that the gate fails: baseline Hi, fresh Hi+1 (confirmed by
  Hi+2);
- power: per factor, baseline Hi, fresh slowed run i (confirmed by slowed run i+1).

Consecutive runs are shared between pairs: 22 honest runs give 20 pairs, each of them separate
runs minutes apart, as CI's baseline and fresh runs are. The effective slowdown of each factor
(slowed over honest medians) is printed too: the injection sleeps in proportion to a phase's
fastest time, so it slows a noisy phase's median by less than the factor.

Runs already in ``--out`` are not run again (add pairs or factors later). The summary goes to
``OUT/calibration.json`` and a markdown table to stdout; ``--thresholds`` adds rows for other
thresholds, evaluated on the same runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tp_bench.analysis import gate  # noqa: E402
from tp_bench.core.stats import median  # noqa: E402


def suite_run(path: Path, nproc: int, factor: float, extra: list[str]) -> None:
    if path.exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    plugin = []
    if factor != 1.0:
        env["TP_BENCH_TEST_SLOWDOWN"] = str(factor)
        plugin = ["-p", "slowdown_injection"]
    tmp = path.with_suffix(".tmp.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "pytest", "tests_bench", "-q", "-p",
           "no:cacheprovider", *plugin, "-m", "not parity", f"--benchmark-json={tmp}", *extra]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"suite run failed ({path}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    tmp.rename(path)
    load = os.getloadavg()[0]
    print(f"{path.name}: {time.monotonic() - start:.0f} s, {time.strftime('%H:%M:%S')}, "
          f"load {load:.1f}", flush=True)


# Every run is read once, though each takes part in many comparisons.
load = functools.lru_cache(maxsize=None)(gate.load_samples)


def verdicts(baseline: Path, fresh: Path, threshold: float) -> list[gate.Verdict]:
    return gate.gate(gate.single(load(baseline)), load(fresh), threshold)


def fails(baseline: Path, fresh: Path, confirm: Path | None, threshold: float) -> bool:
    """The gate's decision: FRESH against BASELINE, and with ``confirm`` the CI procedure, a
    second fresh run that must fail too (docs/compare.md)."""
    first = verdicts(baseline, fresh, threshold)
    if confirm is not None:
        first = gate.confirm(first, verdicts(baseline, confirm, threshold))
    return any(v.status == "regression" for v in first)


def effective(honest: Path, slowed: Path) -> list[float]:
    """Per benchmark: the slowed run's median over the honest run's."""
    h, s = load(honest), load(slowed)
    return [s[k].median / h[k].median for k in h if k in s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.3, 2.0])
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="more thresholds (percent) to evaluate on the same runs")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "gate_calibration")
    parser.add_argument("suite_args", nargs="*", help="more pytest options for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    n = args.pairs
    # One honest and one slowed run per factor beyond the pairs: the last pair's confirmations.
    honest = [args.out / f"honest_{i}.json" for i in range(1, n + 3)]
    slowed = {f: [args.out / f"slowed_{f:g}_{i}.json" for i in range(1, n + 2)]
              for f in args.factors}
    for i in range(n + 2):
        suite_run(honest[i], args.nproc, 1.0, args.suite_args)
        if i <= n:
            for factor in args.factors:
                suite_run(slowed[factor][i], args.nproc, factor, args.suite_args)
    rows = []
    for threshold in [gate.DEFAULT_THRESHOLD] + [t / 100 for t in args.thresholds]:
        for confirmed in (False, True):
            def count(fresh: list[Path]) -> int:
                return sum(fails(honest[i], fresh[i], fresh[i + 1] if confirmed else None,
                                 threshold) for i in range(n))
            rows.append({"threshold": threshold, "alpha": gate.DEFAULT_ALPHA,
                         "confirmed": confirmed, "pairs": n,
                         "false_alarms": count(honest[1:]),
                         "caught": {f"{f:g}": count(slowed[f]) for f in args.factors}})
    factors = [f"{f:g}" for f in args.factors]
    measured = {f"{f:g}": median([r for i in range(n) for r in effective(honest[i], slowed[f][i])])
                for f in args.factors}
    (args.out / "calibration.json").write_text(json.dumps(
        {"rows": rows, "effective_slowdown": measured}, indent=2) + "\n")
    print("| threshold | second fresh run on failure | honest pairs failed | "
          + " | ".join(f"{f}x caught" for f in factors) + " |")
    print("|---:|---|---:|" + "---:|" * len(factors))
    for row in rows:
        print(f"| {100 * row['threshold']:g}% | {'yes' if row['confirmed'] else 'no'} | "
              f"{row['false_alarms']} / {row['pairs']} | "
              + " | ".join(f"{row['caught'][f]} / {row['pairs']}" for f in factors) + " |")
    print("effective slowdown (median over pairs and benchmarks of slowed / honest median): "
          + ", ".join(f"{f}x -> {measured[f]:.2f}x" for f in factors))


if __name__ == "__main__":
    main()
