"""Faults and bad input (docs/faults.md): one clear message, every rank out within a minute, the
results measured so far kept with an honest status. One row of the table per test, 2 ranks,
the tiny preset; the fault hooks are test-only (tests/fault_injection.py)."""

import json
import os
import signal
import time

import pytest

from launch import REPO, python, start_python, start_torchrun, torchrun
from tp_bench.core import results

SHORT = ["--model_name", "tiny", "--num_layers", "2", "--seq_length", "32", "--batch_size", "2",
         "--warmup_steps", "1", "--log_interval", "2"]
RUN = ["tests/fault_injection.py", "--impl", "fsdp_dtensor", *SHORT, "--num_training_steps", "20"]


def errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("tp_bench: ")]


def load(path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------------- failures during the run
def test_one_rank_raising_stops_every_rank_and_keeps_results(tmp_path):
    start = time.monotonic()
    proc = torchrun(2, *RUN, "--output_dir", str(tmp_path), timeout=180,
                    env={"TP_BENCH_TEST_FAULT": "raise:1:7"})
    assert time.monotonic() - start < 120
    assert proc.returncode != 0
    assert errors(proc.stderr) == ["tp_bench: error: rank 1: RuntimeError: injected failure "
                                   "at step 7"]
    # torchrun's table lists both workers with a non-zero status (the last may be its SIGTERM)
    assert "rank      : 0" in proc.stderr and "rank      : 1" in proc.stderr
    assert "exitcode  : 0" not in proc.stderr
    doc = load(tmp_path / "results_fsdp_dtensor_tp2_dp1.json")
    assert doc["status"] == "failed" and doc["error_phase"] == "train"
    assert "injected failure" in doc["error"]
    assert [s["step"] for s in doc["steps"]] == [1, 2, 3, 4, 5]   # flushed before step 7


def test_nan_loss_is_a_divergence(tmp_path):
    proc = torchrun(2, *RUN, "--output_dir", str(tmp_path), timeout=180,
                    env={"TP_BENCH_TEST_FAULT": "nan:4"})
    assert proc.returncode == 1
    (line,) = errors(proc.stderr)
    assert line.startswith("tp_bench: error: loss is nan at step 4: the run diverged")
    assert "--dtype" not in line          # bfloat16 is the default already
    doc = load(tmp_path / "results_fsdp_dtensor_tp2_dp1.json")
    assert doc["status"] == "diverged" and [s["step"] for s in doc["steps"]] == [1, 2, 3]


@pytest.mark.parametrize("impl", ["autotp", "fsdp_dtensor"])
def test_a_diverging_run_ends_diverged_and_is_never_a_baseline(tmp_path, impl):
    """lr 1e6: DeepSpeed skips every step ("OVERFLOW! Skipping step") with an inf gradient norm,
    fsdp_dtensor's loss turns NaN. Both must end "diverged", non-zero, and be refused by compare
    and the gate."""
    start = time.monotonic()
    proc = torchrun(2, "benchmark.py", "--impl", impl, *SHORT, "--num_training_steps", "8",
                    "--learning_rate", "1e6", "--output_dir", str(tmp_path), timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert "the run diverged" in line, line
    doc = load(tmp_path / f"results_{impl}_tp2_dp1.json")
    assert doc["status"] == "diverged" and doc["error"] in line
    assert all(s["loss"] is not None and s["grad_norm"] not in (None, float("inf"))
               for s in doc["steps"]), "a measured step did not update the weights"
    assert elapsed < 180
    compared = python("-m", "tp_bench", "compare", str(tmp_path))
    assert compared.returncode == 2 and "no complete run" in compared.stderr
    gated = python("-m", "tp_bench", "gate", str(tmp_path), str(tmp_path))
    assert gated.returncode == 2 and "'diverged', not 'complete'" in gated.stderr


def test_a_failure_during_setup_writes_the_failed_report(tmp_path):
    proc = torchrun(2, *RUN, "--output_dir", str(tmp_path), timeout=180,
                    env={"TP_BENCH_TEST_FAULT": "setup:1"})
    assert proc.returncode == 1
    assert errors(proc.stderr) == ["tp_bench: error: rank 1: RuntimeError: injected failure "
                                   "during set-up"]
    doc = load(tmp_path / "results_fsdp_dtensor_tp2_dp1.json")
    assert (doc["status"], doc["error_phase"], doc["steps"]) == ("failed", "setup", [])
    assert doc["config"]["impl"] == "fsdp_dtensor" and doc["run"]["pid"] > 0


# ---------------------------------------------------------------------- signals and lost ranks
def _wait_for_steps(path, proc, steps=2, timeout=150):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(load(path)["steps"]) >= steps:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no {steps} measured steps in {path} within {timeout} s")


LONG = [*SHORT, "--num_training_steps", "100000", "--warmup_steps", "1"]


@pytest.mark.parametrize("how, signum", [("group", signal.SIGINT), ("torchrun", signal.SIGTERM),
                                         ("alone", signal.SIGINT)])
def test_a_signal_stops_every_rank_at_a_safe_point(tmp_path, how, signum):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it), SIGTERM to torchrun
    alone (which passes it on) and SIGINT to a run without torchrun: "interrupted" with the steps
    done, one line, no worker traceback, 128 + the signal from the workers. torchrun itself
    answers a signal with its own SignalException traceback and status 1 (docs/faults.md)."""
    nproc = 1 if how == "alone" else 2
    proc = (start_torchrun(2, "benchmark.py", "--impl", "fsdp_dtensor", *LONG,
                           "--output_dir", str(tmp_path)) if nproc == 2 else
            start_python("benchmark.py", "--impl", "fsdp_dtensor", *LONG,
                         "--output_dir", str(tmp_path)))
    path = tmp_path / f"results_fsdp_dtensor_tp{nproc}_dp1.json"
    _wait_for_steps(path, proc)
    sent = time.monotonic()
    if how == "torchrun":
        proc.send_signal(signum)
    else:
        os.killpg(proc.pid, signum)
    _, stderr = proc.communicate(timeout=90)
    assert time.monotonic() - sent < 60
    (line,) = errors(stderr)
    name = signal.Signals(signum).name
    assert line.startswith(f"tp_bench: interrupted: {name}: stopped after step "), line
    if how == "alone":
        assert proc.returncode == 128 + signum and "Traceback" not in stderr, stderr
    else:   # the one traceback is torchrun's own
        assert stderr.count("Traceback") <= 1 and proc.returncode == 1, stderr[-3000:]
        assert "Traceback" not in stderr or "SignalException" in stderr
    doc = load(path)
    assert doc["status"] == "interrupted" and len(doc["steps"]) >= 2
    assert doc["error"] in line


def test_a_vanished_rank_is_named_and_every_rank_leaves(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = start_torchrun(2, "tests/fault_injection.py", "--impl", "fsdp_dtensor", *LONG,
                          "--output_dir", str(tmp_path), env={"TP_BENCH_TEST_FAULT": f"pids:{pids}"})
    path = tmp_path / "results_fsdp_dtensor_tp2_dp1.json"
    _wait_for_steps(path, proc)
    os.kill(int((pids / "rank1").read_text()), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 60
    (line,) = errors(stderr)
    assert "rank 1 (pid" in line and "exited unexpectedly" in line, line
    doc = load(path)
    assert doc["status"] == "failed" and "rank 1 (pid" in doc["error"]
    assert len(doc["steps"]) >= 2


# ---------------------------------------------------------------------- bad input, early
def test_bad_values_are_refused_before_any_model(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for option, value, message in [
            ("--learning_rate", "nan", "--learning_rate must be a finite number >= 0 (got nan)"),
            ("--learning_rate", "-1", "--learning_rate must be a finite number >= 0 (got -1.0)"),
            ("--weight_decay", "inf", "--weight_decay must be a finite number >= 0 (got inf)"),
            ("--output_dir", str(a_file), f"--output_dir '{a_file}' is not a writable directory"),
            ("--output_dir", str(a_file / "sub"), "is not a writable directory")]:
        start = time.monotonic()
        proc = python("benchmark.py", "--impl", "fsdp_dtensor", *SHORT, option, value)
        assert proc.returncode == 2, proc.stderr
        (line,) = errors(proc.stderr)
        assert message in line and "Traceback" not in proc.stderr
        assert "setup" not in proc.stdout and time.monotonic() - start < 60


def test_model_config_problems_get_one_line_each(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "qwen3",')
    for model, message in [(str(tmp_path / "missing"), "no such file or directory"),
                           (str(tmp_path / "empty"), "this directory has no config.json"),
                           ("./no/such/config.json", "no such file or directory")]:
        proc = python("benchmark.py", "--impl", "fsdp_dtensor", "--model_name", model)
        assert proc.returncode == 2
        assert errors(proc.stderr) == [f"tp_bench: error: {model}: {message}"]
    proc = torchrun(2, "benchmark.py", "--impl", "fsdp_dtensor", "--model_name", str(bad),
                    timeout=120)
    assert proc.returncode != 0 and "JSONDecodeError" not in proc.stderr
    (line,) = errors(proc.stderr)
    assert line.startswith(f"tp_bench: error: {bad}: not valid JSON (")


def test_a_model_too_large_for_host_memory_is_refused_and_no_arguments_say_what_to_run():
    start = time.monotonic()
    proc = python("benchmark.py", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and time.monotonic() - start < 60
    (line,) = errors(proc.stderr)
    assert "Qwen/Qwen3-32B (32.8B parameters) needs at least" in line
    assert "GB of host memory" in line and "--model_name tiny" in line
    assert "with no arguments tp-bench runs the seed's default" in line
    assert "torchrun --nproc_per_node=2 benchmark.py --impl fsdp_dtensor --model_name tiny" in line
    proc = python("benchmark.py", "--impl", "fsdp_dtensor", "--model_name", "Qwen/Qwen3-8B")
    (line,) = errors(proc.stderr)
    assert proc.returncode == 2 and "--force" in line and "no arguments" not in line


# ---------------------------------------------------------------------- strict JSON
def test_non_finite_numbers_are_written_as_null_with_the_reason(tmp_path):
    path = results.write_json_atomic(tmp_path / "r.json", {
        "steps": [{"loss": float("nan"), "grad_norm": float("inf"), "step": 3}],
        "summary": {"final_loss": float("-inf")}, "curve": [1.0, float("nan")]})
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"constant {c}"))
    assert doc["steps"][0] == {"loss": None, "loss_nonfinite": "nan", "grad_norm": None,
                               "grad_norm_nonfinite": "inf", "step": 3}
    assert doc["summary"] == {"final_loss": None, "final_loss_nonfinite": "-inf"}
    assert doc["curve"] == [1.0, None]


def test_readme_tells_the_truth_about_exit_statuses():
    text = (REPO / "docs" / "faults.md").read_text()
    for status in ("exit status 2", "exit status 1", "130", "143", "ChildFailedError"):
        assert status in text, status
