"""Where the GPU time of a profiled step goes: the kernels of a ``--profile`` Chrome trace
(``trace_*.json.gz``) grouped by name, largest first, with the step's span and busy time.

    python benchmarks/trace_kernels.py TRACE [TRACE ...] [--top 40]

With two traces it also prints the kernel groups side by side (ms in each, the difference)."""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter


def kernel_times(path: str) -> tuple[Counter, float]:
    """GPU milliseconds per kernel group within the profiled step, and the step's span."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    steps = [e for e in events if e.get("name") == "tp_bench.step" and "dur" in e]
    begin = min(e["ts"] for e in steps)
    end = max(e["ts"] + e["dur"] for e in steps)
    times: Counter = Counter()
    last = end
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e and begin <= e["ts"] <= end:
            times[group(e["name"])] += e["dur"] / 1000.0
            last = max(last, e["ts"] + e["dur"])
    return times, (last - begin) / 1000.0


def group(name: str) -> str:
    """A kernel's name without template arguments and launch details, so that one operation's
    instances add up."""
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name.strip()[:90]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    loaded = [kernel_times(p) for p in args.traces]
    for path, (times, span) in zip(args.traces, loaded):
        print(f"{path}: span {span:.1f} ms, kernels {sum(times.values()):.1f} ms")
    if len(loaded) == 2:
        (a, _), (b, _) = loaded
        rows = sorted(set(a) | set(b), key=lambda k: -abs(a[k] - b[k]))[:args.top]
        print(f"{'A ms':>9} {'B ms':>9} {'A-B':>9}  kernel")
        for k in rows:
            print(f"{a[k]:9.2f} {b[k]:9.2f} {a[k] - b[k]:9.2f}  {k}")
        return
    for path, (times, _) in zip(args.traces, loaded):
        print(f"== {path}")
        for k, ms in times.most_common(args.top):
            print(f"{ms:9.2f}  {k}")


if __name__ == "__main__":
    main()
