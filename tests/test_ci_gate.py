"""The CI regression gate: the rule, the inputs it reads, and end to end on CPU (a run against
itself passes; a run with a slowdown injected fails, naming the benchmark and the slowdown)."""

import json
import re
import textwrap

import pytest

from conftest import SLOWDOWN, concurrently
from launch import python
from tp_bench.analysis import gate as ci_gate
from tp_bench.analysis.gate import GateInputError, Sample, gate, judge

CPU_THRESHOLD = "25"   # percent; this shared 2-core machine needs far more than a GPU's 5


def sample(median, q1, q3, name="b", lo=None, rounds=15, config=None):
    return Sample(name, median=median, min=lo if lo is not None else q1 * 0.9, q1=q1, q3=q3,
                  rounds=rounds, source="test", config=config)


# ---------------------------------------------------------------------- the rule
def test_slower_beyond_threshold_and_spread_is_a_regression():
    v = judge(sample(100, 95, 105), sample(130, 125, 140), threshold=0.05)
    assert v.status == "regression" and v.change == pytest.approx(0.30)


def test_slower_within_threshold_passes():
    # quartile boxes apart, but only 3% slower
    assert judge(sample(100, 99, 101), sample(103, 102, 104), threshold=0.05).status == "ok"


def test_slower_beyond_threshold_but_within_spread_passes():
    # 20% slower median, but the fresh run's q1 sits below the baseline's q3: noise
    v = judge(sample(100, 80, 130), sample(120, 100, 150), threshold=0.05)
    assert v.status == "ok" and not v.beyond_spread


def test_faster_is_reported_not_failed():
    assert judge(sample(100, 95, 105), sample(70, 65, 75), threshold=0.05).status == "faster"


def test_min_statistic():
    base, fresh = sample(100, 95, 105, lo=90), sample(130, 125, 140, lo=91)
    assert judge(base, fresh, 0.05, "min").status == "ok"          # the minimums agree
    assert judge(base, fresh, 0.05, "median").status == "regression"


def test_missing_and_new_benchmarks_are_listed_but_pass():
    verdicts = gate({"a": sample(1, 1, 1, "a"), "gone": sample(1, 1, 1, "gone")},
                    {"a": sample(1, 1, 1, "a"), "added": sample(1, 1, 1, "added")}, 0.05)
    assert {v.name: v.status for v in verdicts} == {"a": "ok", "gone": "missing",
                                                    "added": "new"}


def test_nothing_in_common_is_bad_input():
    with pytest.raises(GateInputError, match="no benchmark in common"):
        gate({"a": sample(1, 1, 1, "a")}, {"b": sample(1, 1, 1, "b")}, 0.05)


def test_different_configurations_are_bad_input():
    base = sample(1, 1, 1, "a", config={"seq_length": 64, "output_dir": "x"})
    fresh = sample(1, 1, 1, "a", config={"seq_length": 128, "output_dir": "y"})
    with pytest.raises(GateInputError, match=r"configurations: seq_length 128 vs 64$"):
        gate({"a": base}, {"a": fresh}, 0.05)


def test_an_option_added_since_the_baseline_does_not_block():
    base = sample(1, 1, 1, "a", config={"seq_length": 64})
    fresh = sample(1, 1, 1, "a", config={"seq_length": 64, "new_option": True})
    assert [v.status for v in gate({"a": base}, {"a": fresh}, 0.05)] == ["ok"]


# ---------------------------------------------------------------------- inputs
def write_pytest_benchmark(path, median, q1, q3, with_data=False):
    stats = {"min": q1 * 0.9, "max": q3 * 1.2, "mean": median, "stddev": 0.1, "rounds": 9,
             "median": median, "iqr": q3 - q1, "q1": q1, "q3": q3, "iterations": 1}
    if with_data:
        stats["data"] = [median] * 9
    path.write_text(json.dumps({"benchmarks": [{
        "group": None, "name": "test_step[x]", "fullname": "tests_bench/test_x.py::test_step[x]",
        "params": {"x": 1}, "extra_info": {}, "stats": stats}], "version": "5.3.1"}))
    return path


def test_reads_pytest_benchmark_json_with_and_without_raw_data(tmp_path):
    for name, with_data in (("saved.json", False), ("json.json", True)):
        samples = ci_gate.load_samples(write_pytest_benchmark(tmp_path / name, 2.0, 1.9, 2.1,
                                                              with_data))
        s = samples["tests_bench/test_x.py::test_step[x]"]
        assert (s.median, s.q1, s.q3, s.rounds) == (2.0, 1.9, 2.1, 9)


def test_exit_status_and_message_on_regression(tmp_path, capsys):
    base = write_pytest_benchmark(tmp_path / "base.json", 1.0, 0.95, 1.05)
    fresh = write_pytest_benchmark(tmp_path / "fresh.json", 1.5, 1.45, 1.6)
    summary = tmp_path / "summary.md"
    assert ci_gate.main([str(base), str(fresh), "--summary", str(summary)]) == 1
    out = capsys.readouterr().out
    assert ("REGRESSION tests_bench/test_x.py::test_step[x]: slower by 50.0% "
            "(median 1 s -> 1.5 s)") in out
    assert "| **regression** |" in summary.read_text()
    assert ci_gate.main([str(base), str(base)]) == 0


def bad_file(directory, content):
    path = directory / "bad.json"
    if content is not None:
        path.write_text(content)
    return path


FAILED_RUN = json.dumps({"config": {}, "steps": [], "summary": {}, "status": "failed",
                         "error": "OOM"})


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "cannot read"),
    ('{"a": 1}', "neither pytest-benchmark JSON nor tp_bench results"),
    (FAILED_RUN, "status is 'failed', not 'complete' (OOM)"),
])
def test_bad_input_exits_2(tmp_path, capsys, content, message):
    good = write_pytest_benchmark(tmp_path / "good.json", 1.0, 0.9, 1.1)
    assert ci_gate.main([str(good), str(bad_file(tmp_path, content))]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------- end to end on CPU
def gate_cli(*args):
    return python("-m", "tp_bench", "gate", *map(str, args), "--threshold", CPU_THRESHOLD,
                  timeout=60)


def slowdown_in(stdout):
    match = re.search(r"slower by ([0-9.]+)%", stdout)
    return match and float(match.group(1))


def test_results_run_against_itself_passes(cpu_runs):
    honest, _ = cpu_runs
    proc = gate_cli(honest, honest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 regression(s) in 1 benchmark(s) compared" in proc.stdout


def test_results_run_with_injected_slowdown_fails(cpu_runs):
    honest, slowed = cpu_runs
    proc = gate_cli(honest, slowed)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION fsdp_dtensor dp1xtp1 tiny seq64 bs2: slower by" in proc.stdout
    assert slowdown_in(proc.stdout) > float(CPU_THRESHOLD)


def test_results_dirs_through_tp_bench_gate(cpu_runs):
    honest, slowed = cpu_runs
    proc = python("-m", "tp_bench", "gate", str(honest), str(slowed), "--threshold",
                  CPU_THRESHOLD, timeout=60)
    assert proc.returncode == 1 and "REGRESSION" in proc.stdout


BENCH_FILE = textwrap.dedent('''
    """A self-contained pytest-benchmark test: CPU work, slowed down on request."""
    import os
    import time

    SLOWDOWN = float(os.environ.get("TP_BENCH_TEST_SLOWDOWN", "0"))


    def work():
        start = time.perf_counter()
        total = 0
        for i in range(60_000):
            total += i * i
        if SLOWDOWN:
            time.sleep(SLOWDOWN * (time.perf_counter() - start))
        return total


    def test_work(benchmark):
        benchmark.pedantic(work, rounds=25, iterations=1, warmup_rounds=2)
''')


@pytest.fixture(scope="module")
def pytest_benchmark_runs(tmp_path_factory):
    """An honest and a slowed pytest-benchmark run, measured at the same time (see cpu_runs)."""
    root = tmp_path_factory.mktemp("pb")
    (root / "test_cpu_work.py").write_text(BENCH_FILE)
    (root / "pytest.ini").write_text("[pytest]\n")
    out = {label: root / f"{label}.json" for label in ("honest", "slowed")}

    def run(label, slowdown):
        return python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:tp_bench",
                      "test_cpu_work.py", f"--benchmark-json={out[label]}", cwd=root,
                      timeout=120, env={"TP_BENCH_TEST_SLOWDOWN": slowdown})

    for proc in concurrently(lambda: run("honest", "0"), lambda: run("slowed", str(SLOWDOWN))):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_pytest_benchmark_run_against_itself_passes(pytest_benchmark_runs):
    proc = gate_cli(pytest_benchmark_runs["honest"], pytest_benchmark_runs["honest"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pytest_benchmark_run_with_injected_slowdown_fails(pytest_benchmark_runs):
    proc = gate_cli(pytest_benchmark_runs["honest"], pytest_benchmark_runs["slowed"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION test_cpu_work.py::test_work: slower by" in proc.stdout
    assert slowdown_in(proc.stdout) > float(CPU_THRESHOLD)


def test_help_states_the_rule():
    text = ci_gate.build_parser("gate").format_help()
    assert "fresh q1 > baseline q3" in text and "Exit status" in text
