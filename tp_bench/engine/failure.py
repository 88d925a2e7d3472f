"""One rank's failure, a lost rank or a signal: every rank's clean exit, one message, no hang.

``FailureGuard`` runs a watcher thread on every rank, talking through the process group's store
(never through a collective, which a failed or vanished rank cannot join):

- A rank that raises publishes a one-line reason and a status ("failed", "diverged",
  "interrupted") under one key, first writer wins (eight identical OOMs print once). Every
  watcher sees it: rank 0 keeps the results measured so far (``on_abort``), prints the one line
  and acknowledges; then every rank leaves. Ranks blocked inside a collective are never woken by
  Python code, which is why the exit is ``os._exit`` from the watcher thread.
- SIGINT and SIGTERM are caught (a wake-up fd wakes the watcher even while the main thread is
  inside a collective) and published as a stop request; every rank stops at the next log
  interval, the run's next agreed safe point (``stop_requested``; the training loop reads it
  inside the interval's collective). If that point does not come within ``stop_grace_s``, the
  watcher stops the run itself, with what was flushed so far. Exit status 128 + the signal.
- Every rank records its pid and host and writes a heartbeat. A rank whose process is gone (same
  host) or whose heartbeat stops (any host) is noticed within ``lost_after_s``: the run fails
  naming it. A signal that arrives because a peer vanished (torchrun then stops the others with
  SIGTERM) is reported as that peer's loss, not as an interruption.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

from tp_bench.core.dist import DistContext
from tp_bench.core.errors import RunStopped

_PREFIX = "tp_bench/guard"
ABORT_KEY, ACK_KEY, STOP_KEY = f"{_PREFIX}/abort", f"{_PREFIX}/abort_ack", f"{_PREFIX}/stop"


def exit_code(status: str, signum: Optional[int] = None) -> int:
    """1 for a failure or a divergence; 128 + the signal for an interruption (130, 143)."""
    if status == "interrupted":
        return 128 + (signum or signal.SIGINT)
    return 1


def _process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs on this host (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return False


class FailureGuard:
    def __init__(self, ctx: DistContext, on_abort: Callable[[str, str, Optional[str]], None],
                 poll_s: float = 0.5, ack_timeout_s: float = 30.0, stop_grace_s: float = 20.0,
                 lost_after_s: float = 45.0, heartbeat_s: float = 2.0,
                 handle_signals: bool = True, phase: Callable[[], Optional[str]] = lambda: None):
        self.ctx = ctx
        self.on_abort = on_abort          # (status, message, phase of the failing rank): rank 0
        self.phase = phase                # where this rank is (set-up, training, ...)
        self.poll_s = poll_s
        self.ack_timeout_s = ack_timeout_s
        self.stop_grace_s = stop_grace_s
        self.lost_after_s = lost_after_s
        self.heartbeat_s = heartbeat_s
        self.handle_signals = handle_signals
        self._store = dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self._lock = threading.Lock()     # one handler per process: main thread or watcher
        self._handled = False
        self._thread: Optional[threading.Thread] = None
        self._wakeup: Optional[tuple[int, int]] = None
        self._saved_handlers: dict[int, object] = {}
        self._saved_wakeup_fd = -1
        self.stop_signal: Optional[int] = None       # the signal of a stop request, any rank
        self._stop_seen_at: Optional[float] = None
        self._peers: dict[int, dict] = {}
        self._last_peer_check = 0.0

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "FailureGuard":
        self._store.set(f"{_PREFIX}/proc/{self.ctx.rank}",
                        json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        self._beat()
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            self._install_signal_handlers()
        self._thread = threading.Thread(target=self._watch, name="tp_bench-failure-watch",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # never leave it inside a store call at process-group teardown
        self._restore_signal_handlers()
        if exc is None or isinstance(exc, SystemExit):
            return False
        if isinstance(exc, RunStopped):   # every rank raises the same: no rank to name
            self.fail(exc.reason, exc.status, exc, name_rank=False)
        else:
            self.fail(f"{type(exc).__name__}: {exc}".splitlines()[0], "failed", exc)
        return True  # not reached: fail() exits

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    # ------------------------------------------------------------------ failing
    def fail(self, reason: str, status: str = "failed", exc: BaseException | None = None,
             name_rank: bool = True) -> None:
        """Called on the rank that failed: publish, let rank 0 keep results, exit."""
        if status == "failed":
            lost = self._lost_peer()
            if lost is not None and not reason.startswith(lost):
                reason = f"{lost} (here: {reason})"
        message = (f"rank {self.ctx.rank}: {reason}"
                   if name_rank and not reason.startswith("rank ") else reason)
        if os.environ.get("TP_BENCH_DEBUG") and exc is not None:
            import traceback

            traceback.print_exception(exc)
        payload = json.dumps({"status": status, "message": message, "signal": self.stop_signal,
                              "phase": self.phase()})
        try:
            self._store.compare_set(ABORT_KEY, "", payload)
        except Exception:  # noqa: BLE001 - the store is gone: report locally and leave
            self._leave(status, message, self.stop_signal, self.phase(), acknowledge=False)
        self._handle()

    def _handle(self) -> None:
        with self._lock:
            if self._handled:
                return
            self._handled = True
        try:
            payload = json.loads(self._store.get(ABORT_KEY).decode())
        except Exception:  # noqa: BLE001
            payload = {"status": "failed", "message": "the run's store went away"}
        self._leave(payload["status"], payload["message"], payload.get("signal"),
                    payload.get("phase"), acknowledge=True)

    def _leave(self, status: str, message: str, signum: Optional[int], phase: Optional[str],
               acknowledge: bool) -> None:
        if self.ctx.is_rank0:
            try:
                self.on_abort(status, message, phase)
            except Exception as exc:  # noqa: BLE001 - the exit below must happen regardless
                message += f" (the results could not be saved: {type(exc).__name__}: {exc})"
            label = "interrupted" if status == "interrupted" else "error"
            print(f"tp_bench: {label}: {message}", file=sys.stderr, flush=True)
            if acknowledge:
                try:
                    self._store.set(ACK_KEY, "1")
                except Exception:  # noqa: BLE001
                    pass
        elif acknowledge:
            # Wait for rank 0 to save the results before the launcher starts killing workers.
            deadline = time.monotonic() + self.ack_timeout_s
            while time.monotonic() < deadline:
                try:
                    if self._store.check([ACK_KEY]):
                        break
                except Exception:  # noqa: BLE001
                    break
                time.sleep(0.1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code(status, signum))

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._wakeup = (read_fd, write_fd)
        self._saved_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM):
            # The Python-level handler does nothing: the watcher reads the wake-up fd, which
            # the C-level handler writes at once, even while this thread waits in a collective.
            self._saved_handlers[signum] = signal.signal(signum, lambda *_: None)

    def _restore_signal_handlers(self) -> None:
        if self._wakeup is None:
            return
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._saved_wakeup_fd)
        for fd in self._wakeup:
            os.close(fd)
        self._wakeup = None

    def _read_signals(self) -> list[int]:
        if self._wakeup is None:
            self._stop.wait(self.poll_s)
            return []
        ready, _, _ = select.select([self._wakeup[0]], [], [], self.poll_s)
        if not ready:
            return []
        try:
            return list(os.read(self._wakeup[0], 64))
        except BlockingIOError:
            return []

    def _request_stop(self, signum: int) -> None:
        lost = self._lost_peer()
        if lost is not None:   # the launcher stops us because a peer died: that is the news
            self.fail(lost)
        name = signal.Signals(signum).name
        self._store.compare_set(STOP_KEY, "", json.dumps({"signal": signum,
                                                          "rank": self.ctx.rank,
                                                          "name": name}))

    def _see_stop(self) -> None:
        if self.stop_signal is None and self._store.check([STOP_KEY]):
            self.stop_signal = json.loads(self._store.get(STOP_KEY).decode())["signal"]
            self._stop_seen_at = time.monotonic()

    # ------------------------------------------------------------------ peers
    def _beat(self) -> None:
        self._store.set(f"{_PREFIX}/heartbeat/{self.ctx.rank}", repr(time.time()))

    def _lost_peer(self) -> Optional[str]:
        """'rank R (pid P on HOST) ...' for the first peer that is gone, else None."""
        try:
            here = socket.gethostname()
            now = time.time()
            for rank in range(self.ctx.world_size):
                if rank == self.ctx.rank:
                    continue
                if rank not in self._peers:
                    key = f"{_PREFIX}/proc/{rank}"
                    if not self._store.check([key]):
                        continue
                    self._peers[rank] = json.loads(self._store.get(key).decode())
                peer = self._peers[rank]
                where = f"pid {peer['pid']} on {peer['host']}"
                if peer["host"] == here and _process_gone(peer["pid"]):
                    return f"rank {rank} ({where}) exited unexpectedly"
                beat = float(self._store.get(f"{_PREFIX}/heartbeat/{rank}").decode())
                if now - beat > self.lost_after_s:
                    return (f"rank {rank} ({where}) stopped responding: no heartbeat for "
                            f"{now - beat:.0f} s")
        except Exception:  # noqa: BLE001 - the store itself is gone: nothing to tell
            return None
        return None

    # ------------------------------------------------------------------ the watcher
    def _watch(self) -> None:
        last_beat = 0.0
        while not self._stop.is_set():
            signals = self._read_signals()
            if self._stop.is_set():
                return
            try:
                for signum in signals:
                    if signum in (signal.SIGINT, signal.SIGTERM) and self.stop_signal is None:
                        self._request_stop(signum)
                if self._store.check([ABORT_KEY]):
                    self._handle()
                self._see_stop()
                now = time.monotonic()
                if now - last_beat >= self.heartbeat_s:
                    self._beat()
                    last_beat = now
                if now - self._last_peer_check >= 5 * self.heartbeat_s:
                    self._last_peer_check = now
                    lost = self._lost_peer()
                    if lost is not None:
                        self.fail(lost)
                if (self._stop_seen_at is not None
                        and now - self._stop_seen_at > self.stop_grace_s):
                    self.fail(self._interrupted_reason(), "interrupted")
            except Exception:  # noqa: BLE001 - the store went away: the launcher is tearing down
                return

    def _interrupted_reason(self) -> str:
        try:
            stop = json.loads(self._store.get(STOP_KEY).decode())
            return (f"rank {stop['rank']}: {stop['name']}; stopped before the next log "
                    f"interval could be reached")
        except Exception:  # noqa: BLE001
            return "interrupted"
