"""One pytest process's view of a suite run under torchrun; the pytest plugin's hooks are thin
calls into it.

- Collection and parametrization depend only on the world size, the options and the registered
  strategies, so every rank runs the same tests in the same order.
- After each test phase the ranks agree on its outcome (frontends.rank_agreement): a test that
  fails on one rank fails on every rank and the session goes on, or, when a rank is stuck in a
  collective, the session stops on every rank after rank 0 has saved the passed tests.
- Only the entries of tests that passed on every rank reach pytest-benchmark's output.

Nothing here imports torch until the process group is made: the plugin is loaded by every pytest
run in an environment where tp_bench is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from tp_bench.core.dims import ParallelDims
from tp_bench.frontends import benchmark_compat


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def mesh_dims(chosen: Optional[list[str]], world_size: int) -> list[ParallelDims]:
    """The shapes to run: ``--tp-bench-mesh`` values, or every dp x tp of the world size."""
    if not chosen:
        return ParallelDims.factorizations(world_size)
    try:
        meshes = [ParallelDims.parse(t) for text in chosen for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise pytest.UsageError(f"--tp-bench-mesh: {exc}") from None
    for dims in meshes:
        if dims.world_size != world_size:
            raise pytest.UsageError(f"--tp-bench-mesh {dims.dp}x{dims.tp} needs "
                                    f"{dims.world_size} ranks; the world size is {world_size}")
    return list(dict.fromkeys(meshes))


@dataclass
class SuiteRun:
    rank: int
    world_size: int
    meshes: list[ParallelDims]     # the parametrization of tp_bench_mesh
    failure_grace_s: float
    active: bool = False           # the session runs suite tests (decided at collection)
    ctx: Any = None                # DistContext, once the process group exists
    guard: Any = None              # FailureGuard (several ranks only)
    agreement: Any = None          # RankAgreement (several ranks only)
    index: int = 0                 # the running test's position in the session
    failed: set = field(default_factory=set)     # nodeids failed in some phase on some rank
    finished: set = field(default_factory=set)   # nodeids whose teardown was agreed

    def context(self, config: pytest.Config) -> Any:
        """The process group (created on first use) as a DistContext."""
        if self.ctx is None:
            from tp_bench.core import dist

            self.ctx = dist.setup()
            if self.world_size > 1:
                self._start_agreement(config)
        return self.ctx

    def _start_agreement(self, config: pytest.Config) -> None:
        import torch.distributed as dist

        from tp_bench.engine.failure import FailureGuard
        from tp_bench.frontends.rank_agreement import RankAgreement

        store = dist.distributed_c10d._get_default_store()
        # pytest handles Ctrl-C itself; the guard handles failures and lost ranks.
        self.guard = FailureGuard(self.ctx, on_abort=lambda status, message, phase:
                                  self.save_on_abort(config), handle_signals=False)
        self.guard.__enter__()
        self.agreement = RankAgreement(
            self.ctx, store, self.guard, grace_s=self.failure_grace_s,
            timeout_s=dist.default_pg_timeout.total_seconds())  # as long as a collective waits
        self.agreement.start()

    def close(self) -> None:
        if self.agreement is not None:
            self.agreement.stop()
            self.guard.__exit__(None, None, None)
        if self.ctx is not None:
            from tp_bench.core import dist

            dist.teardown()
        self.ctx = self.agreement = self.guard = None

    # ------------------------------------------------------------------ rank agreement
    def begin(self, item: pytest.Item, when: str) -> None:
        if self.agreement is not None:
            self.agreement.begin(self.index, item.nodeid, when)

    def agree(self, item: pytest.Item, report: pytest.TestReport, when: str) -> None:
        """Every rank's outcome of this phase; a failure anywhere is this rank's too."""
        if self.agreement is not None:
            from tp_bench.frontends.rank_agreement import outcome_of, verdict

            outcomes = self.agreement.agree(outcome_of(self.rank, report), self.index, when)
            message = verdict(outcomes)
            if message is not None:
                if report.failed:
                    report.sections.append(("tp_bench: every rank", message))
                else:
                    report.outcome = "failed"
                    report.longrepr = f"{when} failed on another rank:\n{message}"
        if report.failed:
            self.failed.add(item.nodeid)
        elif when == "teardown":
            self.finished.add(item.nodeid)

    # ------------------------------------------------------------------ pytest-benchmark
    def passed(self, benchmarks: list) -> list:
        """The entries of tests that passed on every rank and finished."""
        done = self.finished - self.failed
        return [b for b in benchmarks if _fullname(b) in done]

    def save_on_abort(self, config: pytest.Config) -> None:
        """Rank 0, when the session stops: write the JSON/storage of the tests that passed.

        Runs on FailureGuard's thread while the main thread may be inside a test, i.e. while
        pytest captures output, which the process leaves without ever showing: stop capturing
        first.
        """
        capture = config.pluginmanager.get_plugin("capturemanager")
        if capture is not None:
            capture.suspend_global_capture(in_=True)
        benchmark_compat.save_now(config)


def _fullname(benchmark: Any) -> str:
    return benchmark["fullname"] if isinstance(benchmark, dict) else benchmark.fullname
