"""One sweep configuration: its own torchrun launch with a timeout, and what became of it.

An out-of-memory, a crash or a hang costs that configuration only: the launch runs in a process
group of its own, is killed whole when it outlives its timeout, and its outcome is read from the
results file the run leaves behind (the run writes one whatever happens, docs/faults.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tp_bench.core import results
from tp_bench.core.config import BenchConfig
from tp_bench.frontends.arguments import config_to_argv

OUTCOMES = ("ok", "oom", "failed", "timeout", "diverged", "invalid")
# Options that do not change what a configuration measures.
_NOT_IDENTITY = ("output_dir", "log_interval", "profile", "force")


def config_id(cfg: BenchConfig) -> str:
    """A short, stable name for what ``cfg`` measures (its directory in the sweep)."""
    identity = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IDENTITY}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.impl}-{cfg.dims.label}-bs{cfg.batch_size}-{digest}"


@dataclass
class Launch:
    """A configuration and what its run gave."""

    cfg: BenchConfig
    directory: Path
    outcome: str = ""
    reason: str = ""
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    losses: list[Optional[float]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.directory.name

    @property
    def results_path(self) -> Path:
        c = self.cfg
        return results.result_path(self.directory, c.impl, c.tp_size, c.dp_size, c.dp_replicate)

    @property
    def tokens_per_sec(self) -> Optional[float]:
        return self.summary.get("median_tokens_per_sec")

    @property
    def peak_memory_gb(self) -> Optional[float]:
        return self.summary.get("peak_memory_gb")


def command(cfg: BenchConfig, nproc: int, program: list[str]) -> list[str]:
    """The exact command line that runs ``cfg``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *program, *config_to_argv(cfg)]


def _read(launch: Launch) -> Optional[dict[str, Any]]:
    try:
        return json.loads(launch.results_path.read_text())
    except (OSError, ValueError):
        return None


def classify(launch: Launch, returncode: Optional[int], stderr_tail: str) -> None:
    """Fill the launch's outcome from its results file (and exit status)."""
    doc = _read(launch)
    if returncode is None:
        launch.outcome, launch.reason = "timeout", f"killed after {launch.seconds:.0f} s"
    elif doc is None and (returncode == 2 or _last_error(stderr_tail)):
        # refused before set-up (exit status 2; 1 from torchrun, after the worker's one line)
        launch.outcome, launch.reason = "invalid", _last_error(stderr_tail)
    elif doc is None:
        launch.outcome = "failed"
        launch.reason = _last_error(stderr_tail) or f"exit status {returncode}, no results"
    else:
        status, error = doc.get("status"), doc.get("error") or ""
        if status == "complete" and returncode == 0:
            launch.outcome = "ok"
        elif status == "diverged":
            launch.outcome, launch.reason = "diverged", error
        elif "out of memory" in error.lower() or "OutOfMemoryError" in error:
            launch.outcome, launch.reason = "oom", error
        else:
            launch.outcome = "failed"
            launch.reason = error or f"status {status}, exit status {returncode}"
    if doc is not None:
        launch.summary = doc.get("summary") or {}
        launch.losses = [s.get("loss") for s in doc.get("steps", [])]


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("tp_bench: ")]
    return lines[-1].split(": ", 2)[-1] if lines else ""


def run(launch: Launch, nproc: int, program: list[str], timeout_s: float,
        env: Optional[dict[str, str]] = None) -> None:
    """Launch the configuration, unless its directory holds a finished launch already (the
    sweep resumes)."""
    saved = launch.directory / "outcome.json"
    if saved.exists():
        record = json.loads(saved.read_text())
        launch.outcome, launch.reason, launch.seconds = (record["outcome"], record["reason"],
                                                         record["seconds"])
        doc = _read(launch) or {}
        launch.summary = doc.get("summary") or {}
        launch.losses = [s.get("loss") for s in doc.get("steps", [])]
        return
    launch.directory.mkdir(parents=True, exist_ok=True)
    cfg = launch.cfg
    full_env = {**os.environ, **(env or {})}
    start = time.monotonic()
    with open(launch.directory / "log.txt", "w") as log:
        proc = subprocess.Popen(command(cfg, nproc, program), stdout=log,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        try:
            returncode: Optional[int] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
            _kill(proc)
    launch.seconds = time.monotonic() - start
    tail = (launch.directory / "log.txt").read_text()[-20000:]
    classify(launch, returncode, tail)
    (launch.directory / "outcome.json").write_text(json.dumps(
        {"outcome": launch.outcome, "reason": launch.reason, "seconds": launch.seconds}))


def skip(launch: Launch, reason: str) -> None:
    """Record a configuration that is not launched (the memory plan says it cannot fit)."""
    launch.directory.mkdir(parents=True, exist_ok=True)
    launch.outcome, launch.reason, launch.seconds = "skipped", reason, 0.0
    (launch.directory / "outcome.json").write_text(json.dumps(
        {"outcome": launch.outcome, "reason": launch.reason, "seconds": launch.seconds}))


def gpu_memory_bytes() -> Optional[int]:
    """The first GPU's memory, asked in a child process (a CUDA context here would hold GPU
    memory for the whole sweep); None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda."
                          "get_device_properties(0).total_memory)"],
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(proc: subprocess.Popen) -> None:
    """The whole launch. SIGTERM first: torchrun passes it to its workers, which stop with what
    they have (docs/faults.md); then SIGKILL for whatever is left, workers included (torchrun
    starts them in sessions of their own)."""
    workers = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=45)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
