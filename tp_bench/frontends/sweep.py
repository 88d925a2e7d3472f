"""``tp-bench sweep``: each stack's fastest configuration that still trains the same model, and
best against best, confirmed interleaved.

The search, per impl, within ``--budget_minutes`` (docs/sweep.md says what it can miss):

1. the defaults (the options given), on each mesh asked for; the fastest mesh is kept;
2. the micro-batch, doubled while it fits and helps;
3. each option the stack declares for the sweep (``Strategy.sweep``, or ``--grid``), one at a
   time on top of the best so far, kept when it is faster by more than ``MIN_GAIN``;
4. when the batch stopped growing for lack of memory: activation checkpointing at the next
   batch size.

Every configuration is its own launch with a timeout (frontends.sweep_launch): its outcome is
ok, oom, failed, timeout, diverged, invalid or skipped (the memory plan says it cannot fit the
GPU: not launched), and the search goes on. The parity guard: a
configuration counts only if its losses track its impl's reference run at the same data (the
defaults at that mesh and batch, with activation checkpointing if they do not fit otherwise)
within the parity tolerance of its dtype; one that does not is kept as "diverged" and never
wins. Then the best and the default of each impl run again, interleaved (A B C D, A B C D, ...,
``--confirm_rounds`` rounds), and the verdict is a median ratio with its spread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from tp_bench.core.config import BenchConfig
from tp_bench.core.dims import ParallelDims
from tp_bench.core.errors import ConfigError
from tp_bench.core.stats import median, quantile
from tp_bench.frontends.arguments import (ArgumentParser, add_config_arguments,
                                          config_from_args, parse_value)
from tp_bench.frontends.sweep_launch import (Launch, command, config_id, gpu_memory_bytes, run,
                                             skip)
from tp_bench.strategies import registry

MIN_GAIN = 0.03        # a change is kept when it is this much faster (runs are noisy)
# A configuration is skipped when the plan's peak exceeds the GPU's memory by this factor: the
# plan is within a few percent for eager runs, and overestimates compiled ones (docs/plan.md).
SKIP_MARGIN = 1.05
LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}   # = tp-bench parity's


@dataclass
class ImplSearch:
    """One impl's search state."""

    impl: str
    base: BenchConfig
    best: Optional[Launch] = None
    default: Optional[Launch] = None
    launches: list[Launch] = field(default_factory=list)


class Sweep:
    def __init__(self, args: Any, base: BenchConfig, impls: list[str], meshes: list[ParallelDims],
                 grid: dict[str, list[Any]]):
        self.args = args
        self.out: Path = Path(args.out)
        self.meshes = meshes
        self.grid = grid
        self.program = args.program.split() if args.program else ["-m", "tp_bench", "run"]
        self.searches = [ImplSearch(impl, dataclasses.replace(base, impl=impl)) for impl in impls]
        self.references: dict[str, Launch] = {}       # reference key -> launch
        self.launches: dict[str, Launch] = {}          # config id -> launch
        self.started = time.monotonic()
        self.memory_bytes: Optional[int] = (int(args.gpu_memory_gb * 2**30) if args.gpu_memory_gb
                                            else gpu_memory_bytes())

    # ------------------------------------------------------------------ running one
    def launch(self, cfg: BenchConfig, directory: Optional[Path] = None) -> Launch:
        cfg = registry.resolve(dataclasses.replace(cfg, force=self.args.force))
        name = config_id(cfg)
        if directory is None and name in self.launches:
            return self.launches[name]
        directory = directory or self.out / "configs" / name
        launch = Launch(dataclasses.replace(cfg, output_dir=str(directory)), directory)
        fresh = not (directory / "outcome.json").exists()
        misfit = self._predicted_misfit(launch.cfg) if fresh else None
        if misfit:
            skip(launch, misfit)
        else:
            run(launch, self.args.nproc, self.program, self.args.timeout_s)
        if directory.parent.name == "configs":
            self.launches[name] = launch
            self._guard(launch)
        tps = launch.tokens_per_sec
        print(f"sweep: {launch.id}: {launch.outcome}"
              + (f", {tps:,.1f} tok/s, peak {launch.peak_memory_gb:.2f} GB" if tps else "")
              + (f" ({launch.reason})" if launch.reason else "")
              + ("" if fresh else " [measured before]"), flush=True)
        return launch

    def _predicted_misfit(self, cfg: BenchConfig) -> Optional[str]:
        """Why the memory plan says ``cfg`` cannot fit the GPU, or None (also without a GPU:
        there the run checks the host itself)."""
        if not self.memory_bytes or self.args.force:
            return None
        from tp_bench.engine.plan import fits
        from tp_bench.engine.shapes import model_shapes

        ok, row = fits(cfg, model_shapes(cfg.model_name, cfg.num_layers),
                       int(self.memory_bytes * SKIP_MARGIN))
        if ok or row is None:
            return None
        return (f"predicted not to fit {self.memory_bytes / 2**30:.0f} GB: {row.summary()}")

    def remaining_s(self) -> float:
        return self.args.budget_minutes * 60 - (time.monotonic() - self.started)

    # ------------------------------------------------------------------ parity guard
    def _reference_key(self, cfg: BenchConfig) -> str:
        return f"{cfg.impl} {cfg.dims.label} bs{cfg.batch_size}"

    def reference(self, cfg: BenchConfig) -> Optional[Launch]:
        """The impl's defaults at this mesh and batch (with activation checkpointing when they do
        not fit without): the run that says which losses the data give."""
        key = self._reference_key(cfg)
        if key not in self.references:
            base = next(s.base for s in self.searches if s.impl == cfg.impl)
            same_data = dataclasses.replace(base, dp_size=cfg.dp_size, tp_size=cfg.tp_size,
                                            batch_size=cfg.batch_size)
            ref = self.launch(same_data)
            if ref.outcome in ("oom", "skipped") and not same_data.activation_checkpointing:
                ref = self.launch(dataclasses.replace(same_data, activation_checkpointing=True))
            self.references[key] = ref
        ref = self.references[key]
        return ref if ref.outcome == "ok" else None

    def _guard(self, launch: Launch) -> None:
        """Mark an ok launch "diverged" when its losses leave its reference's."""
        if launch.outcome != "ok":
            return
        key = self._reference_key(launch.cfg)
        ref = self.references.get(key)
        if ref is None or ref is launch:
            return
        gaps = [abs(a - b) for a, b in zip(launch.losses, ref.losses)
                if a is not None and b is not None]
        tolerance = LOSS_TOLERANCE[launch.cfg.dtype]
        if not gaps or max(gaps) > tolerance:
            launch.outcome = "diverged"
            launch.reason = (f"losses off the reference {ref.id} by {max(gaps):.3g} > "
                             f"{tolerance:g}" if gaps else "no losses to compare")
            (launch.directory / "outcome.json").write_text(json.dumps(
                {"outcome": launch.outcome, "reason": launch.reason, "seconds": launch.seconds}))

    # ------------------------------------------------------------------ the search
    def _counts(self, launch: Launch) -> bool:
        """Can this launch be a best: ok, checked against its reference, within memory."""
        if launch.outcome != "ok" or launch.tokens_per_sec is None:
            return False
        limit = self.args.max_memory_gb
        return limit is None or (launch.peak_memory_gb or 0) <= limit

    def _try(self, search: ImplSearch, cfg: BenchConfig) -> Optional[Launch]:
        """Run ``cfg`` (checked against its reference); return it when it beats the best."""
        if self.reference(cfg) is None:
            return None
        launch = self.launch(cfg)
        search.launches.append(launch)
        if not self._counts(launch):
            return None
        if search.best is None or launch.tokens_per_sec > search.best.tokens_per_sec * (1 + MIN_GAIN):
            search.best = launch
            return launch
        return None

    def _knobs(self, search: ImplSearch) -> list[tuple[str, list[Any]]]:
        strategy = registry.get(search.impl)
        dims = search.best.cfg.dims
        if self.grid:
            return [(k, v) for k, v in self.grid.items() if k != "batch_size"
                    and (k in strategy.options or k not in _IMPL_KNOBS)]
        knobs = []
        for name in strategy.sweep:
            values = list(strategy.options[name])
            if name in ("sequence_parallel", "use_vocab_parallel", "async_tp") and dims.tp == 1:
                continue       # nothing to shard or overlap over tp at tp 1
            if name == "zero_stage" and dims.dp == 1:
                values = [v for v in values if v in (0, 1)]   # nothing to partition at dp 1
            knobs.append((name, values))
        return knobs

    def _steps(self, search: ImplSearch) -> Iterator[None]:
        """The search of one impl, one launch per step (so impls share the budget in turn)."""
        for dims in self.meshes:
            self._try(search, dataclasses.replace(search.base, dp_size=dims.dp, tp_size=dims.tp))
            yield
        if search.best is None:
            return
        search.default = search.best
        out_of_memory = False
        if "batch_size" in self.grid:
            for batch in self.grid["batch_size"]:
                self._try(search, dataclasses.replace(search.best.cfg, batch_size=batch))
                yield
        else:
            while True:
                cfg = dataclasses.replace(search.best.cfg, batch_size=2 * search.best.cfg.batch_size)
                before = search.best
                self._try(search, cfg)
                yield
                if search.best is before:
                    tried = self.launches.get(config_id(registry.resolve(cfg)))
                    out_of_memory = tried is None or tried.outcome in ("oom", "skipped") \
                        or self.references.get(self._reference_key(cfg)) is None
                    break
        for name, values in self._knobs(search):
            current = getattr(search.best.cfg, name)
            for value in values:
                if value != current:
                    self._try(search, dataclasses.replace(search.best.cfg, **{name: value}))
                    yield
        if out_of_memory and not search.best.cfg.activation_checkpointing and not self.grid:
            bigger = dataclasses.replace(search.best.cfg, activation_checkpointing=True,
                                         batch_size=2 * search.best.cfg.batch_size)
            self._try(search, bigger)
            yield

    def search(self) -> None:
        """Every impl in turn, one launch each, until the searches end or the budget (minus
        what the confirmation will need) is spent."""
        steppers = [self._steps(s) for s in self.searches]
        while steppers:
            for stepper in list(steppers):
                if self.remaining_s() < self._confirmation_cost():
                    print("sweep: budget reached; confirming what was found", flush=True)
                    return
                if next(stepper, StopIteration) is StopIteration:
                    steppers.remove(stepper)

    def _confirmation_cost(self) -> float:
        durations = [l.seconds for l in self.launches.values() if l.outcome == "ok"]
        if not durations:
            return 0.0
        return self.args.confirm_rounds * 2 * len(self.searches) * median(durations)

    # ------------------------------------------------------------------ confirmation
    def confirm(self) -> dict[str, Any]:
        """The best and the default of each impl, interleaved, ``confirm_rounds`` times."""
        pairs = [(s, role, launch) for s in self.searches if s.best
                 for role, launch in (("best", s.best), ("default", s.default))
                 if role == "best" or s.default is not s.best]
        rates: dict[tuple[str, str], list[float]] = {(s.impl, role): [] for s, role, _ in pairs}
        for round_ in range(1, self.args.confirm_rounds + 1):
            for search, role, launch in pairs:
                again = self.launch(launch.cfg, self.out / "confirm" / f"round{round_}" /
                                    f"{search.impl}-{role}")
                if again.outcome == "ok" and again.tokens_per_sec:
                    rates[(search.impl, role)].append(again.tokens_per_sec)
        for search in self.searches:   # the defaults were the best found: one run stands for both
            if search.best is not None and search.default is search.best:
                rates[(search.impl, "default")] = rates[(search.impl, "best")]
        return {"rounds": self.args.confirm_rounds, "tokens_per_sec": {
            f"{impl} {role}": values for (impl, role), values in rates.items()},
            "ratios": _ratios(rates)}

    # ------------------------------------------------------------------ output
    def summary(self, confirmation: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for launch in self.launches.values():
            rows.append({"id": launch.id, "impl": launch.cfg.impl, "mesh": launch.cfg.dims.label,
                         "options": _differences(launch.cfg, self._base_of(launch)),
                         "outcome": launch.outcome, "reason": launch.reason,
                         "tokens_per_sec": launch.tokens_per_sec,
                         "peak_memory_gb": launch.peak_memory_gb,
                         "seconds": round(launch.seconds, 1),
                         "results": str(launch.results_path)})
        best = {s.impl: {"id": s.best.id, "tokens_per_sec": s.best.tokens_per_sec,
                         "peak_memory_gb": s.best.peak_memory_gb,
                         "options": _differences(s.best.cfg, s.base),
                         "command": " ".join(_portable(command(s.best.cfg, self.args.nproc,
                                                               self.program)))}
                for s in self.searches if s.best}
        return {"model": self.searches[0].base.model_name, "nproc": self.args.nproc,
                "budget_minutes": self.args.budget_minutes,
                "minutes_used": round((time.monotonic() - self.started) / 60, 2),
                "max_memory_gb": self.args.max_memory_gb, "configurations": rows, "best": best,
                "confirmation": confirmation}

    def _base_of(self, launch: Launch) -> BenchConfig:
        return next(s.base for s in self.searches if s.impl == launch.cfg.impl)


_IMPL_KNOBS = {"zero_stage", "sequence_parallel", "use_vocab_parallel", "fsdp_at_dp1",
               "meta_init", "async_tp"}


def _portable(cmd: list[str]) -> list[str]:
    """The command as a user types it (``python``, not this interpreter's path)."""
    return ["python", *cmd[1:]]


def _differences(cfg: BenchConfig, base: BenchConfig) -> dict[str, Any]:
    skip = {"output_dir", "force", "impl", "dp_size", "tp_size"}   # the mesh has its column
    resolved = registry.resolve(base)
    return {k: v for k, v in cfg.to_dict().items()
            if k not in skip and v != getattr(resolved, k)}


def _ratios(rates: dict[tuple[str, str], list[float]]) -> list[dict[str, Any]]:
    """Per round, best / default of each impl, and best / best between impls: median, q1-q3."""
    impls = sorted({impl for impl, _ in rates})
    pairs = [(f"{i} best", f"{i} default") for i in impls]
    pairs += [(f"{a} best", f"{b} best") for n, a in enumerate(impls) for b in impls[n + 1:]]
    out = []
    for num, den in pairs:
        a, b = rates[tuple(num.split())], rates[tuple(den.split())]
        per_round = [x / y for x, y in zip(a, b)]
        if not per_round:
            continue
        q1, q3 = quantile(per_round, 0.25), quantile(per_round, 0.75)
        verdict = ("no measurable difference" if q1 <= 1.0 <= q3
                   else f"{num} {'faster' if q1 > 1 else 'slower'}")
        out.append({"ratio": f"{num} / {den}", "median": median(per_round), "q1": q1,
                    "q3": q3, "rounds": len(per_round), "verdict": verdict})
    return out


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    return [f"{r['ratio']} = {r['median']:.2f} (q1-q3 {r['q1']:.2f}-{r['q3']:.2f}, "
            f"{r['rounds']} rounds): {r['verdict']}" for r in summary["confirmation"]["ratios"]]


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| impl | mesh | options (vs the defaults) | outcome | tok/s | peak GB | s |",
             "|---|---|---|---|---:|---:|---:|"]
    best_ids = {b["id"] for b in summary["best"].values()}
    for row in summary["configurations"]:
        options = ", ".join(f"{k}={_text(v)}" for k, v in row["options"].items()) or "defaults"
        tps = "" if row["tokens_per_sec"] is None else f"{row['tokens_per_sec']:,.0f}"
        peak = "" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f}"
        mark = " **best**" if row["id"] in best_ids else ""
        outcome = row["outcome"] + (f": {row['reason']}" if row["reason"] else "")
        lines.append(f"| {row['impl']}{mark} | {row['mesh']} | {options} | {outcome} | {tps} | "
                     f"{peak} | {row['seconds']:.0f} |")
    lines.append("")
    lines += [f"- {line}" for line in verdict_lines(summary)]
    for impl, best in summary["best"].items():
        lines.append(f"- best {impl}: `{best['command']}`")
    return "\n".join(lines) + "\n"


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------------- command line
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="tp-bench sweep", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, exclude=frozenset({"impl", "output_dir"}))
    sweep = parser.add_argument_group("Sweep")
    sweep.add_argument("--impls", default=None, metavar="A,B",
                       help="impls to sweep [every installed one]")
    sweep.add_argument("--nproc_per_node", type=int, default=None, metavar="N",
                       help="ranks per launch [the torchrun world size, else the GPUs, else 2]")
    sweep.add_argument("--all_meshes", action="store_true",
                       help="every dp x tp of the ranks, not only --dp_size/--tp_size's")
    sweep.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                       help="explore these values instead of each stack's declared options "
                            "(batch_size=... replaces the doubling)")
    sweep.add_argument("--budget_minutes", type=float, default=30.0,
                       help="search and confirmation together [30]")
    sweep.add_argument("--timeout_s", type=float, default=600.0,
                       help="a launch that outlives this is killed: outcome timeout [600]")
    sweep.add_argument("--gpu_memory_gb", type=float, default=None,
                       help="memory per GPU the plan checks each configuration against before "
                            "launching it; one predicted not to fit is skipped [the GPU's]")
    sweep.add_argument("--max_memory_gb", type=float, default=None,
                       help="only configurations whose peak stays under this can be best")
    sweep.add_argument("--confirm_rounds", type=int, default=3,
                       help="interleaved rounds of the best and default of each impl [3]")
    sweep.add_argument("--out", default="sweep", help="output directory (resumable) [sweep]")
    sweep.add_argument("--plot", action="store_true",
                       help="also write sweep.png: tokens/s against peak memory, Pareto front")
    sweep.add_argument("--program", default=None,
                       help="what each launch runs instead of `-m tp_bench run` (for wrappers)")
    return parser


def _nproc(given: Optional[int]) -> int:
    if given:
        return given
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    import torch

    return torch.cuda.device_count() or 2


def _grid(items: Sequence[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2")
        grid[key] = [parse_value(key, v) for v in values.split(",")]
    return grid


def main(argv: Sequence[str]) -> int:
    if int(os.environ.get("RANK", "0")) > 0:
        return 0     # under torchrun: rank 0 launches every configuration itself
    args = build_parser().parse_args(list(argv))
    args.nproc = _nproc(args.nproc_per_node)
    base = config_from_args(args)
    impls = args.impls.split(",") if args.impls else registry.available()
    for impl in impls:
        registry.get(impl)
    if args.confirm_rounds < 1:
        raise ConfigError("--confirm_rounds must be >= 1")
    meshes = (ParallelDims.factorizations(args.nproc) if args.all_meshes
              else [ParallelDims.resolve(args.nproc, base.dp_size, base.tp_size)])
    sweep = Sweep(args, base, impls, meshes, _grid(args.grid))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sweep.search()
    summary = sweep.summary(sweep.confirm())
    out = Path(args.out)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (out / "sweep.md").write_text(table)
    sys.stdout.write(table)
    if args.plot:
        from tp_bench.analysis.plots import sweep_scatter

        print(f"wrote {sweep_scatter(summary, out / 'sweep.png')}", file=sys.stderr)
    return 0
