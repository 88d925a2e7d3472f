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
