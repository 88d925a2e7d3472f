"""The benchmark suite (tests_bench/) under pytest and torchrun: parametrization and markers,
one pytest-benchmark JSON from rank 0 that `pytest-benchmark compare` reads, the slowest rank's
times, --benchmark-disable, and a failure on one rank (every rank exits non-zero, in time, and
the passed tests' results are kept)."""

import json
import os
import re
import subprocess
import sys
import time

from launch import REPO, python, torchrun
from tp_bench.frontends.suite import PHASES

TESTS = str(REPO / "tests")
# These tests are about the suite's mechanics: a few rounds do (the default is more).
FEW_ROUNDS = ["--tp-bench-rounds", "3", "--tp-bench-warmup", "1"]
# the fault-injection and broken-strategy plugins (-p) live beside this file
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), TESTS, os.environ.get("PYTHONPATH", "")])}


def collect(*args, world_size=1):
    """Collection only, as rank 0 of a world of ``world_size`` would do it (no process group)."""
    proc = python("-m", "pytest", "tests_bench", "--collect-only", "-q", *args,
                  env={**ENV, "WORLD_SIZE": str(world_size), "RANK": "0"}, timeout=120)
    ids = re.findall(r"::(\w+\[[^\]]+\])", proc.stdout)
    return proc, ids


def test_parametrization_meshes_and_markers():
    proc, ids = collect("-p", "broken_strategy", "--strict-markers", world_size=4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    params = {i.split("[")[1].rstrip("]") for i in ids}
    assert {"fsdp_dtensor-dp1xtp4", "fsdp_dtensor-dp2xtp2", "fsdp_dtensor-dp4xtp1",
            "broken-dp2xtp2"} <= params
    assert {i.split("[")[0] for i in ids} == {"test_parity", *(f"test_{p}" for p in PHASES)}

    _, ids = collect("-m", "fsdp_dtensor and tp2", world_size=4)
    assert sorted(ids) == sorted([f"test_{p}[fsdp_dtensor-dp2xtp2]" for p in PHASES]
                                 + ["test_parity[fsdp_dtensor-dp2xtp2]"])
    _, ids = collect("-m", "fsdp_dtensor and dp4 and not parity", world_size=4)
    assert sorted(ids) == sorted(f"test_{p}[fsdp_dtensor-dp4xtp1]" for p in PHASES)
    _, ids = collect("-m", "fsdp_dtensor", "--tp-bench-mesh", "1x4,4x1", world_size=4)
    assert {i.split("[")[1] for i in ids} == {"fsdp_dtensor-dp1xtp4]", "fsdp_dtensor-dp4xtp1]"}
    _, ids = collect("-m", "fsdp_dtensor and gpu", world_size=4)   # no GPU here
    assert ids == []

    proc, _ = collect("--tp-bench-mesh", "2x4", world_size=4)
    assert proc.returncode == 4
    assert "--tp-bench-mesh 2x4 needs 8 ranks; the world size is 4" in proc.stderr


def test_import_failure_is_reported_not_a_crash():
    proc = python("-m", "pytest", "tests_bench", "-p", "broken_strategy", "-k", "test_step",
                  "-m", "fsdp_dtensor or broken", "--benchmark-disable", env=ENV, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"\b1 passed, \d+ deselected, 1 error\b", proc.stdout), proc.stdout
    assert ("strategy 'broken' is registered but cannot be imported: ModuleNotFoundError: "
            "No module named 'a_framework_that_is_not_installed'") in proc.stdout


def test_torchrun_suite_writes_one_json_that_compare_reads(tmp_path):
    out, storage = tmp_path / "out.json", tmp_path / "storage"
    # rank 1's optimizer step ends 0.4 s late (after its last collective): rank 0's entry
    # shows it only if the recorded times are the slowest rank's
    proc = torchrun(2, "-m", "pytest", "-p", "suite_fault", "tests_bench", "-m", "fsdp_dtensor",
                    *FEW_ROUNDS,
                    f"--benchmark-json={out}", "--benchmark-autosave",
                    f"--benchmark-storage=file://{storage}", timeout=300,
                    env={**ENV,
                         "TP_BENCH_SUITE_FAULT": "slow:1:optimizer[fsdp_dtensor-dp1xtp2]:0.4"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone reports and writes
    assert proc.stdout.count("10 passed") == 1
    assert (proc.stdout + proc.stderr).count("Wrote benchmark data in") == 1
    assert len(list(storage.rglob("*.json"))) == 1

    doc = json.loads(out.read_text())
    entries = {b["name"]: b for b in doc["benchmarks"]}
    assert set(entries) == {f"test_{p}[fsdp_dtensor-{m}]" for p in PHASES
                            for m in ("dp1xtp2", "dp2xtp1")}
    for name, entry in entries.items():
        info, mesh = entry["extra_info"], name.split("-", 1)[1].rstrip("]")
        assert entry["group"] == f"tiny L2 seq64 bs2 float32 {mesh}"
        assert entry["stats"]["rounds"] == 3 and entry["options"]["timer"] == "device_clock"
        assert info["phase"] == name[5:].split("[")[0] and info["impl"] == "fsdp_dtensor"
        assert info["mesh"] == mesh and info["world_size"] == 2
        assert info["tokens_per_sec"] > 0 and info["memory_peak_gb"] > 0
        assert info["mfu"] is None   # no GPU peak on CPU
        assert 0 < info["loss"] < 20
        assert info["precision"]["compute_dtype"] == "float32"
        assert info["config"]["seq_length"] == 64 and info["config"]["dp_size"] * \
            info["config"]["tp_size"] == 2
    assert entries["test_optimizer[fsdp_dtensor-dp1xtp2]"]["stats"]["min"] >= 0.4
    assert entries["test_optimizer[fsdp_dtensor-dp2xtp1]"]["stats"]["max"] < 0.4
    assert doc["machine_info"]["tp_bench"]["world_size"] == 2

    compare = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(out),
                              "--columns=min,median,rounds"], capture_output=True, text=True,
                             timeout=60)
    assert compare.returncode == 0, compare.stderr
    for mesh in ("dp1xtp2", "dp2xtp1"):
        assert f"benchmark 'tiny L2 seq64 bs2 float32 {mesh}': 4 tests" in compare.stdout
        for phase in PHASES:
            assert f"test_{phase}[fsdp_dtensor-{mesh}]" in compare.stdout


def test_benchmark_disable_runs_each_test_once(tmp_path):
    proc = torchrun(2, "-m", "pytest", "tests_bench", "-m", "fsdp_dtensor and not parity",
                    "--tp-bench-mesh", "1x2", "--benchmark-disable",
                    f"--benchmark-json={tmp_path / 'out.json'}", timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("4 passed") == 1
    assert "benchmark '" not in proc.stdout and not (tmp_path / "out.json").exists()


SUBSET = ["-m", "fsdp_dtensor and not parity", *FEW_ROUNDS]


def _exit_statuses(directory):
    return {p.name: int(p.read_text()) for p in directory.iterdir()}


def test_failure_on_one_rank_mid_step_stops_every_rank_and_keeps_passed_results(tmp_path):
    """Rank 1 fails before the test body: rank 0 waits for it in the first collective until the
    grace period ends, then the session stops on both ranks."""
    out = tmp_path / "out.json"
    fault = "raise:1:backward[fsdp_dtensor-dp1xtp2]:before"
    start = time.monotonic()
    # one mesh, so the tests that ran before the failure do not depend on collection order
    proc = torchrun(2, "-m", "pytest", "-p", "suite_fault", "tests_bench", *SUBSET,
                    "--tp-bench-mesh", "1x2", "--tp-bench-failure-grace", "5",
                    f"--benchmark-json={out}", timeout=180,
                    env={**ENV, "TP_BENCH_SUITE_FAULT": fault})
    assert time.monotonic() - start < 120
    assert proc.returncode != 0
    assert proc.stderr.count(
        "tp_bench: error: rank 0: did not finish call of "
        "tests_bench/test_training_step.py::test_backward[fsdp_dtensor-dp1xtp2] within 5 s after "
        "rank 1 failed it (RuntimeError: injected failure before "
        "test_backward[fsdp_dtensor-dp1xtp2])") == 1
    # torchrun lists both workers as failed (whichever exits last may show its SIGTERM)
    assert "rank      : 0" in proc.stderr and "rank      : 1" in proc.stderr
    assert "exitcode  : 0" not in proc.stderr
    doc = json.loads(out.read_text())
    assert [b["name"] for b in doc["benchmarks"]] == ["test_forward[fsdp_dtensor-dp1xtp2]"]


def test_failure_on_one_rank_after_the_step_fails_everywhere_and_the_session_goes_on(tmp_path):
    """Rank 1 fails after the test body (the others are not blocked): the test fails on every
    rank, the later tests run, every rank exits 1, the JSON holds the passed tests."""
    out, exits = tmp_path / "out.json", tmp_path / "exit"
    exits.mkdir()
    proc = torchrun(2, "-m", "pytest", "-p", "suite_fault", "tests_bench", *SUBSET,
                    # generous: no rank is stuck here, so the grace period is never waited out
                    "--tp-bench-failure-grace", "60", f"--benchmark-json={out}", timeout=240, env={
                        **ENV, "TP_BENCH_SUITE_EXIT_DIR": str(exits),
                        "TP_BENCH_SUITE_FAULT": "raise:1:backward[fsdp_dtensor-dp1xtp2]:after"})
    assert proc.returncode != 0
    assert _exit_statuses(exits) == {"rank0": 1, "rank1": 1}
    assert proc.stdout.count("1 failed, 7 passed") == 1
    assert "call failed on another rank:\nfailed on rank 1:" in proc.stdout
    assert "RuntimeError: injected failure after test_backward[fsdp_dtensor-dp1xtp2]" in proc.stdout
    names = {b["name"] for b in json.loads(out.read_text())["benchmarks"]}
    assert len(names) == 7 and "test_backward[fsdp_dtensor-dp1xtp2]" not in names


def test_default_rounds_are_enough_for_the_gates_rank_test():
    from tp_bench.analysis.gate import MIN_ROUNDS
    from tp_bench.core.config import BenchConfig
    from tp_bench.frontends.suite_options import SuiteOptions

    for device in ("cpu", "cuda"):
        assert SuiteOptions.resolve(device, BenchConfig()).rounds >= MIN_ROUNDS
