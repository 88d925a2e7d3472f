"""Launch a command under torchrun in a subprocess, with a hard timeout (tests never hang)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, *args: str, timeout: float = 240, env: dict | None = None,
             cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc *args``; raises on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or REPO)


def python(*args: str, timeout: float = 240, env: dict | None = None,
           cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)


def start_torchrun(nproc: int, *args: str, env: dict | None = None,
                   cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """``torchrun`` in the background, in a process group of its own (a terminal's Ctrl-C
    reaches the whole group: ``os.killpg(proc.pid, SIGINT)``); output piped as text."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd or REPO, start_new_session=True)


def start_python(*args: str, env: dict | None = None,
                 cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """``python *args`` in the background, in a process group of its own."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd or REPO,
                            start_new_session=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(nodes: list[str], nproc_per_node: int, *args: str, env: dict | None = None,
                cwd: str | os.PathLike | None = None) -> list[subprocess.Popen]:
    """One torchrun agent per "node", all on 127.0.0.1, meeting through c10d rendezvous, each
    with its own node identity (TP_BENCH_NODE_NAME), in process groups of their own."""
    port, run_id = free_port(), f"test{os.getpid()}{free_port()}"
    procs = []
    for name in nodes:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(nodes)}",
               f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}", "--max_restarts=0",
               *args]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "TP_BENCH_NODE_NAME": name, **(env or {})}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=full_env, cwd=cwd or REPO,
                                      start_new_session=True))
    return procs


def parity_reports(out: Path, common: list[str], cases: dict[str, tuple[int, list[str]]],
                   timeout: float = 1200) -> dict[str, dict | str]:
    """``tp-bench parity`` for every case (name -> (ranks, arguments after ``common``)), the
    cases of one world size in one torchrun launch (tests/parity_cases.py). Returns name ->
    the case's report, or name -> why there is none (its error, or the launch's output)."""
    import json

    found: dict[str, dict | str] = {}
    for nproc in sorted({n for n, _ in cases.values()}):
        group = {name: [*common, *extra] for name, (n, extra) in cases.items() if n == nproc}
        where = Path(out) / f"ranks{nproc}"
        where.mkdir(parents=True, exist_ok=True)
        try:
            proc = torchrun(nproc, "tests/parity_cases.py", str(where), json.dumps(group),
                            timeout=timeout)
            output = (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as exc:
            output = f"the launch of {nproc} ranks timed out after {exc.timeout} s"
        for name in group:
            report, error = where / f"{name}.json", where / f"{name}.error"
            if report.exists():
                found[name] = json.loads(report.read_text())
            elif error.exists():
                found[name] = f"{name} raised:\n{error.read_text()}"
            else:
                found[name] = f"{name} did not run (an earlier case stopped the launch):\n{output}"
    return found


def report_of(reports: dict, case: str) -> dict:
    """The case's report from ``parity_reports``; fails with why there is none."""
    report = reports[case]
    assert isinstance(report, dict), report
    return report
