"""One rank failing, a NaN loss: every rank exits non-zero, quickly, with one message, and the
results measured before the failure are kept."""

import json
import time

from launch import torchrun

RUN = ["tests/fault_injection.py", "--impl", "fsdp_dtensor", "--model_name", "tiny",
       "--seq_length", "32", "--batch_size", "2", "--num_training_steps", "20",
       "--warmup_steps", "1", "--log_interval", "2"]


def test_one_rank_raising_stops_every_rank_and_keeps_results(tmp_path):
    start = time.monotonic()
    proc = torchrun(2, *RUN, "--output_dir", str(tmp_path), timeout=180,
                    env={"TP_BENCH_TEST_FAULT": "raise:1:7"})
    assert time.monotonic() - start < 120
    assert proc.returncode != 0
    assert proc.stderr.count("tp_bench: error: rank 1: RuntimeError: injected failure at step 7") == 1
    # torchrun's table lists both workers with a non-zero status (the last may be its SIGTERM)
    assert "rank      : 0" in proc.stderr and "rank      : 1" in proc.stderr
    assert "exitcode  : 0" not in proc.stderr
    doc = json.loads((tmp_path / "results_fsdp_dtensor_tp2_dp1.json").read_text())
    assert doc["status"] == "failed"
    assert "injected failure" in doc["error"]
    assert [s["step"] for s in doc["steps"]] == [1, 2, 3, 4, 5]   # flushed before step 7


def test_nan_loss_stops_cleanly(tmp_path):
    proc = torchrun(2, *RUN, "--output_dir", str(tmp_path), timeout=180,
                    env={"TP_BENCH_TEST_FAULT": "nan:4"})
    assert proc.returncode != 0
    assert proc.stderr.count("loss is nan at step 4") == 1
    doc = json.loads((tmp_path / "results_fsdp_dtensor_tp2_dp1.json").read_text())
    assert doc["status"] == "failed" and [s["step"] for s in doc["steps"]] == [1, 2, 3]
