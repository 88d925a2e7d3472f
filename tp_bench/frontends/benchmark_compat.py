"""The one pytest-benchmark internal the suite touches, in one place, with a version check.

pytest-benchmark writes its JSON and storage when the pytest session ends. When a rank is stuck
in a collective the suite ends the process early (engine.failure), and rank 0 must write the
entries of the tests that passed first: pytest-benchmark offers no public call for that, so
``save_now`` calls its session's ``handle_saving``, which the 5.x releases have.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

SUPPORTED_MAJOR = 5   # keep in step with pyproject.toml's pytest-benchmark range


def check_version() -> str:
    version = metadata.version("pytest-benchmark")
    if int(version.split(".")[0]) != SUPPORTED_MAJOR:
        raise RuntimeError(f"pytest-benchmark {version} is not supported (the suite needs "
                           f"{SUPPORTED_MAJOR}.x: it saves results early through its "
                           f"session's handle_saving)")
    return version


def save_now(config: Any) -> None:
    """Write pytest-benchmark's JSON and storage now (the entries pass through the public
    ``pytest_benchmark_update_json`` hook, which keeps the passed tests only)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    check_version()
    # A test stopped mid-measurement has an entry without data, on which pytest-benchmark's
    # JSON generation fails (min() of nothing): only measured entries are written.
    session.benchmarks = [b for b in session.benchmarks
                          if getattr(getattr(b, "stats", None), "data", None)]
    session.handle_saving()
