"""Every rank agrees on the outcome of every test phase, so one rank's failure is every rank's.

Under torchrun each rank runs the same tests in the same order. After each phase of a test
(setup, call, teardown) every rank publishes its outcome in the process group's store and waits
for the others' outcomes there: not through a collective, which a rank that failed half-way
through a step could not join. If any rank failed, the phase is failed on every rank, with that
rank's message; if ranks disagree otherwise (one skipped, one passed), it is failed too, since
their decisions must be identical. Then the session goes on, in step.

A rank that fails while the others are blocked in a collective (waiting for it) cannot be
waited for: they will never reach the agreement. So every rank also watches for failures
published for the phase it is running; if one appears and this rank has not reached the
agreement within a grace period, it is stuck, and the session stops on every rank through
``FailureGuard`` (rank 0 first saves what was measured, then every rank exits with status 1).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from tp_bench.core.dist import DistContext
from tp_bench.engine.failure import FailureGuard

_PREFIX = "tp_bench/suite"
_MESSAGE_LINES = 40   # of a failure's report, carried to the other ranks


@dataclass(frozen=True)
class Outcome:
    rank: int
    nodeid: str
    outcome: str       # "passed", "failed" or "skipped"
    message: str = ""  # the failure report's last lines, or the skip reason
    summary: str = ""  # one line: the exception, or the skip reason

    @staticmethod
    def trim(text: str) -> str:
        lines = text.rstrip().splitlines()
        return "\n".join(lines[-_MESSAGE_LINES:])


def outcome_of(rank: int, report: Any) -> Outcome:
    """This rank's outcome of a test phase, from pytest's report."""
    longrepr = report.longrepr
    if report.skipped:
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr or "")
        return Outcome(rank, report.nodeid, "skipped", reason, reason)
    if report.failed:
        lines = report.longreprtext.strip().splitlines()
        crash = getattr(getattr(longrepr, "reprcrash", None), "message", None)
        summary = (crash or (lines[-1] if lines else "")).split("\n")[0]
        return Outcome(rank, report.nodeid, "failed", Outcome.trim(report.longreprtext), summary)
    return Outcome(rank, report.nodeid, "passed")


def verdict(outcomes: list[Outcome]) -> Optional[str]:
    """None when every rank passed (or every rank skipped); else what every rank reports."""
    failed = [o for o in outcomes if o.outcome == "failed"]
    if failed:
        by_message: dict[str, list[int]] = {}
        for o in failed:
            by_message.setdefault(o.message, []).append(o.rank)
        return "\n".join(f"failed on rank{'s' if len(r) > 1 else ''} "
                         f"{', '.join(map(str, r))}:\n{m}" for m, r in by_message.items())
    if len({o.outcome for o in outcomes}) > 1:
        return "ranks disagree (every decision must be identical on every rank): " + "; ".join(
            f"rank {o.rank} {o.outcome}" + (f" ({o.message})" if o.message else "")
            for o in outcomes)
    return None


class RankAgreement:
    """Per-phase outcome agreement through the store, plus the stuck-rank watch (a thread)."""

    def __init__(self, ctx: DistContext, store, guard: FailureGuard, grace_s: float,
                 timeout_s: float, poll_s: float = 0.2):
        self.ctx = ctx
        self.store = store
        self.guard = guard
        self.grace_s = grace_s
        self.timeout_s = timeout_s     # longest wait for a peer that has not failed anything
        self.poll_s = poll_s
        # The phase this rank runs: (index, nodeid, when); the watch thread reads it.
        self._phase: Optional[tuple[int, str, str]] = None
        self._waiting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tp_bench-agreement-watch",
                                        daemon=True)

    def _key(self, index: int, when: str, who: str) -> str:
        return f"{_PREFIX}/{index}/{when}/{who}"

    # ------------------------------------------------------------------ main thread
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def begin(self, index: int, nodeid: str, when: str) -> None:
        """This rank starts a phase: from now on a peer's failure of it is watched for."""
        self._waiting = False
        self._phase = (index, nodeid, when)

    def agree(self, mine: Outcome, index: int, when: str) -> list[Outcome]:
        """Publish this rank's outcome and return every rank's (rank order)."""
        store = self.store
        store.set(self._key(index, when, str(mine.rank)), json.dumps(asdict(mine)))
        if mine.outcome == "failed":
            store.compare_set(self._key(index, when, "failed"), "",
                              f"rank {mine.rank} failed it ({mine.summary})")
        self._waiting = True
        keys = [self._key(index, when, str(r)) for r in range(self.ctx.world_size)]
        # A rank that failed may wait only as long as the stuck peers' own watch takes to stop
        # the session (plus margin); one that did not fail waits as long as a collective would.
        limit = self.grace_s + 30.0 if mine.outcome == "failed" else self.timeout_s
        deadline = time.monotonic() + limit
        pause = 0.001
        while not store.check(keys):
            if time.monotonic() > deadline:
                missing = [r for r, k in enumerate(keys) if not store.check([k])]
                self.guard.fail(f"ranks {missing} did not finish {when} of {mine.nodeid} "
                                f"within {limit:.0f} s; stopping the session")
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        outcomes = [Outcome(**json.loads(store.get(k))) for k in keys]
        if len({o.nodeid for o in outcomes}) > 1:
            self.guard.fail("ranks ran different tests (collection must not depend on the "
                            "rank): " + ", ".join(f"rank {o.rank}: {o.nodeid}" for o in outcomes))
        return outcomes

    # ------------------------------------------------------------------ watch thread
    def _watch(self) -> None:
        seen: Optional[tuple[tuple[int, str, str], float]] = None   # (phase, first seen)
        while not self._stop.wait(self.poll_s):
            phase, waiting = self._phase, self._waiting
            if phase is None or waiting:
                seen = None
                continue
            index, nodeid, when = phase
            try:
                failed = self.store.check([self._key(index, when, "failed")])
                if not failed:
                    continue
                now = time.monotonic()
                if seen is None or seen[0] != phase:
                    seen = (phase, now)
                if now - seen[1] < self.grace_s or self._phase != phase or self._waiting:
                    continue
                notice = self.store.get(self._key(index, when, "failed")).decode()
            except Exception:   # the store went away: the launcher is tearing down anyway
                return
            self.guard.fail(f"did not finish {when} of {nodeid} within {self.grace_s:.0f} s "
                            f"after {notice}; it is presumably blocked in a collective that the "
                            f"failed rank never joined: stopping the session")
