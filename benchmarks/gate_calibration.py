"""Measure the regression gate on this machine, with the benchmark suite's own JSON.

    python benchmarks/gate_calibration.py --pairs 20 --factors 1.3 2.0 --out out/gate_cal

Runs, ``--pairs`` times and interleaved so that slow drifts of the machine weigh on all alike:
two honest suite runs of the unchanged code (A, B) and one run per slowdown factor with every
phase made that much slower (tests/slowdown_injection.py). Then, with the gate's default rule:

- false alarms: the honest pairs (A, B) that the gate fails;
- power: per factor, the pairs (A, slowed) that the gate fails.

Runs already in ``--out`` are not run again (add pairs or factors later). The summary goes to
``OUT/calibration.json`` and a markdown table to stdout; ``--thresholds`` adds rows for other
thresholds, evaluated on the same runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tp_bench.analysis import gate  # noqa: E402


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
    print(f"{path.name}: {time.monotonic() - start:.0f} s", flush=True)


def fails(baseline: Path, fresh: Path, threshold: float) -> bool:
    verdicts = gate.gate(gate.single(gate.load_samples(baseline)), gate.load_samples(fresh),
                         threshold)
    return any(v.status == "regression" for v in verdicts)


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
    for i in range(1, args.pairs + 1):
        suite_run(args.out / f"honest_a_{i}.json", args.nproc, 1.0, args.suite_args)
        suite_run(args.out / f"honest_b_{i}.json", args.nproc, 1.0, args.suite_args)
        for factor in args.factors:
            suite_run(args.out / f"slowed_{factor:g}_{i}.json", args.nproc, factor,
                      args.suite_args)
    rows = []
    for threshold in [gate.DEFAULT_THRESHOLD] + [t / 100 for t in args.thresholds]:
        a = [args.out / f"honest_a_{i}.json" for i in range(1, args.pairs + 1)]
        row = {"threshold": threshold, "alpha": gate.DEFAULT_ALPHA, "pairs": args.pairs,
               "false_alarms": sum(fails(x, args.out / f"honest_b_{i}.json", threshold)
                                   for i, x in enumerate(a, start=1)),
               "caught": {f"{factor:g}": sum(fails(x, args.out / f"slowed_{factor:g}_{i}.json",
                                                   threshold)
                                             for i, x in enumerate(a, start=1))
                          for factor in args.factors}}
        rows.append(row)
    (args.out / "calibration.json").write_text(json.dumps(rows, indent=2) + "\n")
    factors = [f"{f:g}" for f in args.factors]
    print("| threshold | honest pairs failed | " + " | ".join(f"{f}x caught" for f in factors)
          + " |")
    print("|---:|---:|" + "---:|" * len(factors))
    for row in rows:
        print(f"| {100 * row['threshold']:g}% | {row['false_alarms']} / {row['pairs']} | "
              + " | ".join(f"{row['caught'][f]} / {row['pairs']}" for f in factors) + " |")


if __name__ == "__main__":
    main()
