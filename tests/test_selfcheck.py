"""The measuring instruments: profiler breakdown arithmetic, overhead and startup reports."""

import json

from launch import python
from tp_bench.core.metrics import process_age_s
from tp_bench.engine.profiling import kernel_breakdown


def kernel(name, ts, dur):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_kernel_breakdown_by_hand():
    trace = {"traceEvents": [
        {"name": "tp_bench.step", "ts": 0, "dur": 100},
        kernel("ampere_bf16_gemm", 0, 40),          # compute 0-40
        kernel("ncclDevKernel_AllReduce", 30, 30),  # comm 30-60: 10 overlapped, 20 exposed
        kernel("elementwise", 70, 20),              # compute 70-90, idle 60-70 and 90-100
        kernel("late_gemm", 95, 10),                # starts inside the step, ends after it
    ]}
    b = kernel_breakdown(trace)
    assert b["step_span_ms"] == 0.105
    assert abs(b["compute_pct"] - 100 * 70 / 105) < 1e-9
    assert abs(b["communication_pct"] - 100 * 30 / 105) < 1e-9
    assert abs(b["communication_exposed_pct"] - 100 * 20 / 105) < 1e-9
    assert abs(b["idle_pct"] - 100 * 15 / 105) < 1e-9
    assert kernel_breakdown({"traceEvents": []}) is None


def test_process_age_is_positive():
    assert 0 < process_age_s() < 24 * 3600


def test_overhead_and_startup_reports(tmp_path):
    base = ["--impl", "fsdp_dtensor", "--model_name", "tiny", "--num_layers", "2",
            "--seq_length", "32", "--batch_size", "1", "--warmup_steps", "1"]
    proc = python("-m", "tp_bench", "selfcheck", "overhead", *base, "--rounds", "2",
                  "--steps_per_round", "2", "--out", str(tmp_path / "o.json"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "o.json").read_text())
    assert set(doc["modes"]) == {"none", "events", "sync"}
    assert doc["modes"]["none"]["throughput_vs_none"] == 1.0
    assert all(len(m["step_ms_per_round"]) == 2 for m in doc["modes"].values())
    proc = python("-m", "tp_bench", "selfcheck", "startup", *base, "--out", str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["launch_to_first_step_s"] > doc["setup_time_s"] > 0
    table = python("-m", "tp_bench", "selfcheck", "table", str(tmp_path / "o.json"),
                   str(tmp_path / "s.json")).stdout
    assert "| tiny | fsdp_dtensor eager | events |" in table
    assert "fsdp_dtensor meta init" in table
