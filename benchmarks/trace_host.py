"""Where the host's time in a profiled step goes: the CPU side of a ``--profile`` Chrome trace
(``trace_*.json.gz``), for steps bound by the host launching kernels (batch 1 on a GPU).

    python benchmarks/trace_host.py TRACE [TRACE ...] [--top 30]

Per trace, within the step: its wall time; on the main thread the time inside top-level
operators (those not called from another operator) and the rest (Python between operators); on
the other threads (on a GPU the backward runs on autograd's device thread) the time inside
top-level operators; then the top-level operators and CUDA runtime calls grouped by name
(inclusive ms, count). With two traces, the groups side by side, largest difference first."""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter


def host_times(path: str) -> tuple[dict[str, float], Counter, Counter]:
    """(totals, ms per top-level operator, ms per CUDA runtime call) within the step."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    step = max((e for e in events if e.get("name") == "tp_bench.step" and "dur" in e),
               key=lambda e: e["dur"])
    begin, end, main = step["ts"], step["ts"] + step["dur"], step.get("tid")
    inside = [e for e in events if "dur" in e and begin <= e["ts"] < end and e is not step
              and e.get("cat") in ("cpu_op", "cuda_runtime")]
    ops, runtime, counts = Counter(), Counter(), Counter()
    top_end: dict = {}          # per thread: where its current top-level operator ends
    busy: Counter = Counter()   # per thread: ms inside top-level operators
    for e in sorted(inside, key=lambda e: (e["ts"], -e["dur"])):
        if e["cat"] == "cuda_runtime":
            runtime[e["name"]] += e["dur"] / 1000.0
            counts["runtime " + e["name"]] += 1
        elif e["ts"] >= top_end.get(e["tid"], -1.0):
            ops[e["name"]] += e["dur"] / 1000.0
            counts["op " + e["name"]] += 1
            top_end[e["tid"]] = e["ts"] + e["dur"]
            busy[e["tid"] == main] += e["dur"] / 1000.0
    top_ms = busy[True]
    wall = step["dur"] / 1000.0
    totals = {"step wall ms": wall, "main thread in top-level ops ms": top_ms,
              "between them ms": wall - top_ms,
              "other threads (autograd's device threads) in ops ms": busy[False],
              "top-level ops": sum(
                  v for k, v in counts.items() if k.startswith("op ")),
              "runtime calls": sum(v for k, v in counts.items() if k.startswith("runtime "))}
    ops_n = Counter({k: (ops[k], counts["op " + k]) for k in ops})
    rt_n = Counter({k: (runtime[k], counts["runtime " + k]) for k in runtime})
    return totals, ops_n, rt_n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    loaded = [host_times(p) for p in args.traces]
    for path, (totals, _, _) in zip(args.traces, loaded):
        print(path + ": " + ", ".join(f"{k} {v:,.1f}" for k, v in totals.items()))
    for title, index in (("top-level operators", 1), ("CUDA runtime calls", 2)):
        names = set().union(*(t[index] for t in loaded))
        def ms(t, n):
            return t[index].get(n, (0.0, 0))[0]
        order = sorted(names, key=lambda n: -(abs(ms(loaded[0], n) - ms(loaded[-1], n))
                                              if len(loaded) > 1 else ms(loaded[0], n)))
        print(f"\n{title}: " + " | ".join("ms (count)" for _ in loaded)
              + (" | difference ms" if len(loaded) > 1 else ""))
        for n in order[:args.top]:
            cells = [f"{t[index].get(n, (0.0, 0))[0]:9.2f} ({t[index].get(n, (0.0, 0))[1]:5d})"
                     for t in loaded]
            diff = f" | {ms(loaded[0], n) - ms(loaded[-1], n):+8.2f}" if len(loaded) > 1 else ""
            print(f"  {n[:60]:60s} " + " | ".join(cells) + diff)


if __name__ == "__main__":
    main()
