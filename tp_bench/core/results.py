"""The results file: the seed's schema (config, steps, summary) plus clearly named additions.

Written by rank 0 only, atomically (temporary file + rename), at every log interval while the
run goes (status "partial") and once at the end: "complete", or "failed", "diverged" or
"interrupted" with the error and the phase it happened in; what was measured before is never
dropped. The JSON is strict: a non-finite number is written as null, and its key gets a sibling
``<key>_nonfinite`` saying "nan", "inf" or "-inf".
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from tp_bench.core.errors import ConfigError
from tp_bench.core.stats import quantile

# 2: impl-specific options are null where the impl does not take them; strategy.tp_plan holds
# the applied root and layer plans; statuses "diverged" and "interrupted"; skipped steps kept
# apart; strict JSON (null + <key>_nonfinite); a "run" block (pid, host, heartbeat).
SCHEMA_VERSION = 2
STATUSES = ("partial", "complete", "failed", "diverged", "interrupted")
SEED_SUMMARY_KEYS = ("num_steps", "avg_step_time_ms", "std_step_time_ms", "avg_tokens_per_sec",
                     "avg_samples_per_sec", "avg_loss", "final_loss", "peak_memory_gb",
                     "timing_breakdown")


def result_path(output_dir: str | os.PathLike, impl: str, tp_size: int, dp_size: int,
                dp_replicate: int = 1) -> Path:
    replicate = f"_rep{dp_replicate}" if dp_replicate > 1 else ""
    return Path(output_dir) / f"results_{impl}_tp{tp_size}_dp{dp_size}{replicate}.json"


def summarize(steps: Sequence[dict[str, Any]], tokens_per_step: int, samples_per_step: int,
              world_size: int, flops_per_token: int,
              peak_tflops: Optional[float]) -> dict[str, Any]:
    """Summary of the measured (post-warm-up) steps.

    Rates are total work over total time (tokens_per_step / mean step time), not a mean of
    per-step rates, so a slow step weighs what it cost.
    """
    if not steps:
        return {"num_steps": 0}
    times = [s["step_time_s"] for s in steps]
    total_time = sum(times)
    mean_s = total_time / len(times)
    tokens_per_sec = tokens_per_step / mean_s
    tflops = flops_per_token * tokens_per_sec / world_size / 1e12

    def share(key: str) -> Optional[float]:
        if any(s[key] is None for s in steps):
            return None
        return 100.0 * sum(s[key] for s in steps) / total_time

    breakdown = {f"{p}_pct": share(f"{p}_time_s") for p in ("forward", "backward", "optimizer")}
    known = [v for v in breakdown.values() if v is not None]
    breakdown["other_pct"] = 100.0 - sum(known) if len(known) == 3 else None
    losses = [s["loss"] for s in steps]
    median_s = statistics.median(times)
    return {
        "num_steps": len(steps),
        "avg_step_time_ms": 1000 * mean_s,
        "std_step_time_ms": 1000 * (statistics.stdev(times) if len(times) > 1 else 0.0),
        "avg_tokens_per_sec": tokens_per_sec,
        "avg_samples_per_sec": samples_per_step / mean_s,
        "avg_loss": sum(losses) / len(losses),
        "final_loss": losses[-1],
        "peak_memory_gb": max(s["memory_peak_gb"] for s in steps),
        "timing_breakdown": breakdown,
        # additions
        "median_step_time_ms": 1000 * median_s,
        "min_step_time_ms": 1000 * min(times),
        "max_step_time_ms": 1000 * max(times),
        "p10_step_time_ms": 1000 * quantile(times, 0.10),
        "p90_step_time_ms": 1000 * quantile(times, 0.90),
        "iqr_step_time_ms": 1000 * (quantile(times, 0.75) - quantile(times, 0.25)),
        "median_tokens_per_sec": tokens_per_step / median_s,
        "avg_tokens_per_sec_per_gpu": tokens_per_sec / world_size,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "slowest_rank": _slowest_rank(steps),
    }


def _slowest_rank(steps: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The rank whose step time was the step's most often (None for a world of one)."""
    ranks = [s.get("slowest_rank") for s in steps if s.get("slowest_rank") is not None]
    if not ranks:
        return None
    rank = max(set(ranks), key=ranks.count)
    return {"rank": rank, "share_of_steps": ranks.count(rank) / len(steps)}


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, world_size: int, backend: str) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "tp_bench": _version("tp_bench"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "deepspeed": _version("deepspeed"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "world_size": world_size,
        "backend": backend,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _nonfinite_reason(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None; in a dict, key ``k`` also gets
    ``k_nonfinite`` ("nan", "inf", "-inf") so the reason is kept."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
                out[f"{key}_nonfinite"] = _nonfinite_reason(value)
            else:
                out[key] = strict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def check_output_dir(path: str | os.PathLike) -> None:
    """Raise ConfigError unless results can be written to ``path`` (created if missing), found
    out by writing and removing a file there."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tp_bench_write_check.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"--output_dir {str(path)!r} is not a writable directory "
                          f"({reason})") from None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``strict(obj)`` as standard JSON, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private; results are ordinary files
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(strict(obj), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    missing = [k for k in ("config", "steps", "summary") if k not in data]
    if missing:
        raise ValueError(f"{path}: not a tp_bench results file (missing {', '.join(missing)})")
    return data
