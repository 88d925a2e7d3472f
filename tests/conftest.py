import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/launch.py
# No test reaches the hub (CI machines have no route to it): an unknown hub name fails at once
# instead of after huggingface_hub's five retries. Inherited by every launch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (.ci/run: -n 2) the workers' PYTEST_XDIST_* variables would reach the
# pytest runs the tests launch, where pytest-benchmark would then switch itself off.
for _name in [n for n in os.environ if n.startswith("PYTEST_XDIST_")]:
    del os.environ[_name]

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402

from launch import torchrun  # noqa: E402

# The small CPU run the gate and comparison tests share. One process: two ranks on a 2-core
# machine stall on every collective whenever anything else runs, and the gate's tests are about
# the gate, not about tensor parallelism.
CPU_RUN = ["--impl", "fsdp_dtensor", "--model_name", "tiny", "--num_layers", "2",
           "--dtype", "float32", "--seq_length", "64", "--batch_size", "2",
           "--num_training_steps", "20"]
# Three times as slow. Other users' load on this shared machine has been seen to stretch a
# whole run by 1.6x; the injected slowdown must stay beyond the gate's threshold even when the
# baseline happened to run under such load.
SLOWDOWN = 3.0


@pytest.fixture(scope="session")
def cpu_runs(tmp_path_factory):
    """Two results directories: an honest run, and the same run with every step slowed down
    by tests/slowdown_injection.py, measured at the same time so that other users' load on a
    shared machine weighs on both alike (one after the other, a loaded honest run has been
    seen to come out slower than an unloaded slowed one)."""
    root = tmp_path_factory.mktemp("cpu_runs")
    honest, slowed = concurrently(
        lambda: torchrun(1, "benchmark.py", *CPU_RUN, "--output_dir", str(root / "honest"),
                         timeout=180),
        lambda: torchrun(1, "tests/slowdown_injection.py", *CPU_RUN, "--output_dir",
                         str(root / "slowed"), timeout=180,
                         env={"TP_BENCH_TEST_SLOWDOWN": str(SLOWDOWN)}))
    assert honest.returncode == 0, honest.stderr[-3000:]
    assert slowed.returncode == 0, slowed.stderr[-3000:]
    return root / "honest", root / "slowed"


def concurrently(*calls):
    """Run the calls in threads (each starts a subprocess); their results, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json_problems(root):
    """Every JSON file under ``root`` that holds NaN or Infinity, which a strict parser rejects
    (files that are no JSON at all are the tests' own bad input)."""
    import json

    problems = []
    for path in sorted(root.rglob("*.json")):
        text = path.read_text()
        try:
            json.loads(text)
        except ValueError:
            continue
        try:
            json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
    return problems


@pytest.fixture(scope="session", autouse=True)
def every_json_written_is_strict(tmp_path_factory):
    """After the session: every JSON file the tests wrote (results, reports, suite JSON) parses
    with a strict parser, as other languages' JSON libraries would read it."""
    yield
    problems = strict_json_problems(tmp_path_factory.getbasetemp())
    assert not problems, "\n".join(problems)


# The longest files first: under pytest-xdist's --dist loadfile (.ci/run) each file goes whole
# to the next free worker in this order, so the two workers end at about the same time instead
# of one waiting on a long file handed out last.
# (Measured 2026-12-04, seconds per file on the 2-core machine: faults 174, sweep 146,
# fsdp_dtensor parity 132, autotp parity 117, multinode 110, torchtitan parity 104, suite 103,
# slurm 84, every_stack 60, hf_native parity 55, plan 47.)
LONGEST_FIRST = ("test_faults.py", "test_sweep.py", "test_parity_fsdp_dtensor.py",
                 "test_parity_autotp.py", "test_multinode.py", "test_parity_torchtitan.py",
                 "test_suite.py", "test_slurm.py", "test_every_stack.py",
                 "test_parity_hf_native.py", "test_plan.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)   # stable: the order within a file is kept
