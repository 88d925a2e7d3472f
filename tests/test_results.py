"""Results file: the seed's schema, the summary maths, atomic writes."""

import json
import math

import pytest

from launch import python
from tp_bench.core import results

SEED_STEP_KEYS = {"step": int, "loss": float, "step_time_s": float, "forward_time_s": float,
                  "backward_time_s": float, "optimizer_time_s": float, "tokens_per_sec": float,
                  "samples_per_sec": float, "memory_allocated_gb": float, "memory_peak_gb": float}
SEED_SUMMARY_KEYS = {"num_steps": int, "avg_step_time_ms": float, "std_step_time_ms": float,
                     "avg_tokens_per_sec": float, "avg_samples_per_sec": float, "avg_loss": float,
                     "final_loss": float, "peak_memory_gb": float, "timing_breakdown": dict}


def step(i, t, f, b, o, loss, peak):
    return {"step": i, "loss": loss, "step_time_s": t, "forward_time_s": f, "backward_time_s": b,
            "optimizer_time_s": o, "memory_peak_gb": peak}


def test_summary_maths_by_hand():
    steps = [step(5, 1.0, 0.3, 0.5, 0.1, 4.0, 10.0), step(6, 2.0, 0.6, 1.0, 0.2, 3.0, 12.0),
             step(7, 3.0, 0.9, 1.5, 0.3, 2.0, 11.0)]
    s = results.summarize(steps, tokens_per_step=1200, samples_per_step=3, world_size=2,
                          flops_per_token=10**12, peak_tflops=100.0)
    assert s["num_steps"] == 3
    assert s["avg_step_time_ms"] == pytest.approx(2000.0)
    assert s["std_step_time_ms"] == pytest.approx(1000.0)           # sample stdev of 1, 2, 3
    assert s["median_step_time_ms"] == pytest.approx(2000.0)
    assert s["avg_tokens_per_sec"] == pytest.approx(600.0)          # 3600 tokens / 6 s
    assert s["avg_samples_per_sec"] == pytest.approx(1.5)
    assert s["avg_tokens_per_sec_per_gpu"] == pytest.approx(300.0)
    assert s["tflops_per_gpu"] == pytest.approx(300.0)              # 1e12 * 300 tok/s / 1e12
    assert s["mfu"] == pytest.approx(3.0)
    assert s["avg_loss"] == pytest.approx(3.0) and s["final_loss"] == 2.0
    assert s["peak_memory_gb"] == 12.0
    b = s["timing_breakdown"]
    assert (b["forward_pct"], b["backward_pct"], b["optimizer_pct"]) == pytest.approx((30, 50, 10))
    assert b["other_pct"] == pytest.approx(10)
    assert s["p10_step_time_ms"] == pytest.approx(1200.0)
    assert s["iqr_step_time_ms"] == pytest.approx(1000.0)


def test_summary_without_phase_times():
    steps = [step(0, 1.0, None, None, None, 1.0, 1.0)]
    s = results.summarize(steps, 10, 1, 1, 1, None)
    assert s["timing_breakdown"] == {"forward_pct": None, "backward_pct": None,
                                     "optimizer_pct": None, "other_pct": None}
    assert s["mfu"] is None


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = results.write_json_atomic(tmp_path / "a" / "r.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_cli_run_writes_seed_schema(tmp_path):
    proc = python("benchmark.py", "--impl", "fsdp_dtensor", "--model_name", "tiny",
                  "--seq_length", "32", "--batch_size", "2", "--num_training_steps", "4",
                  "--warmup_steps", "1", "--log_interval", "2", "--output_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "summary: fsdp_dtensor dp1xtp1 tiny" in proc.stdout
    doc = results.load_result(tmp_path / "results_fsdp_dtensor_tp1_dp1.json")
    assert doc["status"] == "complete" and doc["error"] is None
    assert doc["config"]["impl"] == "fsdp_dtensor" and doc["config"]["tp_size"] == 1
    assert [s["step"] for s in doc["steps"]] == [1, 2, 3]
    assert [s["step"] for s in doc["warmup"]] == [0]
    for record in doc["steps"]:
        for key, kind in SEED_STEP_KEYS.items():
            assert isinstance(record[key], kind), (key, record[key])
        assert record["step_time_s"] >= record["forward_time_s"] + record["backward_time_s"]
    for key, kind in SEED_SUMMARY_KEYS.items():
        assert isinstance(doc["summary"][key], kind), key
    assert set(doc["summary"]["timing_breakdown"]) == {"forward_pct", "backward_pct",
                                                       "optimizer_pct", "other_pct"}
    assert doc["summary"]["num_steps"] == 3
    assert doc["precision"]["master_weights"] == "float32"
    assert doc["precision"]["compute_dtype"] == "bfloat16"
    assert doc["environment"]["torch"] and doc["environment"]["world_size"] == 1
    assert doc["measurement"]["memory"] == "process_rss"
    assert doc["measurement"]["python_gc"].startswith("automatic collection off")
    assert doc["model"]["flops_per_token"] > 0
    assert all(math.isfinite(s["loss"]) for s in doc["steps"])


def test_the_driver_runs_the_garbage_collector_on_its_schedule(monkeypatch):
    """Automatic collection off while a driver exists, a generation-1 collection at the start
    of every GC_EVERY-th step (torchtitan's trainer does the same), on again at release."""
    import gc

    from tp_bench.engine import driver

    class Clock:
        def start(self):
            pass

    class Data:
        def batch(self, *args):
            return None

    assert gc.isenabled()
    try:
        stepper = driver.StepDriver(None, Data(), 0, 1, Clock(), None, per_step_memory=False)
        assert not gc.isenabled()
        collected = []
        monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))
        for index in (driver.GC_EVERY - 1, driver.GC_EVERY, 2 * driver.GC_EVERY):
            stepper.step_index, stepper._next = index, 0
            stepper.run_phase("data")
        assert collected == [1, 1]
    finally:
        driver.release_gc()
    assert gc.isenabled()
