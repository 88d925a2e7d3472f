"""Several nodes, on this one machine: two torchrun agents on 127.0.0.1 meeting through c10d
rendezvous, each with its own node identity. One results file from global rank 0 with every
node's ranks, the topology recorded, TP across nodes refused unless asked for, HSDP, and a node
that fails or vanishes stopping every rank with one message (docs/multinode.md)."""

import json
import os
import signal
import time

import pytest

from launch import start_nodes

SHORT = ["--model_name", "tiny", "--num_layers", "2", "--seq_length", "32", "--batch_size", "2",
         "--num_training_steps", "6", "--warmup_steps", "1", "--log_interval", "3",
         "--dtype", "float32", "--learning_rate", "1e-3"]


def finish(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], "".join(o + e for o, e in outs)


def tp_bench_lines(text):
    """tp_bench's messages (errors, interruptions), not its log lines."""
    return [line for line in text.splitlines()
            if line.startswith(("tp_bench: error: ", "tp_bench: interrupted: "))]


# Each stack's data parallelism across the nodes, and TP across them once (the topology
# record does not depend on the stack).
@pytest.mark.parametrize("impl, mesh", [("autotp", ["--dp_size", "2"]),
                                        ("fsdp_dtensor", ["--tp_size", "2"]),
                                        ("fsdp_dtensor", ["--dp_size", "2", "--dp_replicate", "2"])])
def test_two_nodes_write_one_results_file_with_the_topology(tmp_path, impl, mesh):
    cross = ["--allow_cross_node_tp"] if "--tp_size" in mesh else []
    procs = start_nodes(["nodeA", "nodeB"], 1, "benchmark.py", "--impl", impl, *mesh, *cross,
                        *SHORT, "--output_dir", str(tmp_path))
    codes, output = finish(procs)
    assert codes == [0, 0], output[-4000:]
    (path,) = tmp_path.glob("results_*.json")
    doc = json.loads(path.read_text())
    topology = doc["environment"]["topology"]
    assert topology["nodes"] == 2 and topology["ranks_per_node"] == {"nodeA": 1, "nodeB": 1}
    assert sorted(topology["rank_nodes"]) == ["nodeA", "nodeB"]
    tp_across = "--tp_size" in mesh
    assert topology["tp_groups_node_local"] is not tp_across
    assert topology["dp_groups_node_local"] is tp_across
    assert doc["summary"]["slowest_rank"]["node"] in ("nodeA", "nodeB")
    assert doc["status"] == "complete" and doc["summary"]["num_steps"] == 5


def test_tp_across_nodes_is_refused_with_one_line(tmp_path):
    procs = start_nodes(["nodeA", "nodeB"], 1, "benchmark.py", "--impl", "fsdp_dtensor",
                        "--tp_size", "2", *SHORT, "--output_dir", str(tmp_path))
    codes, output = finish(procs)
    assert all(code != 0 for code in codes)
    (line,) = tp_bench_lines(output)
    assert "TP group [0, 1] spans nodes (rank 0 on node" in line and "--allow_cross_node_tp" in line
    assert not list(tmp_path.glob("results_*.json"))


LONG = [*SHORT[:-8], "--num_training_steps", "100000", "--warmup_steps", "1",
        "--log_interval", "2"]


def _wait_for_steps(path, procs, steps=2, timeout=200):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(json.loads(path.read_text())["steps"]) >= steps:
            return
        assert all(p.poll() is None for p in procs), finish(procs)[1][-4000:]
        time.sleep(0.3)
    raise AssertionError(f"no {steps} steps in {path}")


@pytest.mark.parametrize("fault", ["rank raises", "node vanishes"])
def test_a_failing_node_stops_every_rank_within_a_minute(tmp_path, fault):
    env = {"TP_BENCH_TEST_FAULT": "raise:1:4"} if fault == "rank raises" else None
    program = "tests/fault_injection.py" if env else "benchmark.py"
    procs = start_nodes(["nodeA", "nodeB"], 1, program, "--impl", "fsdp_dtensor",
                        "--dp_size", "2", *LONG, "--output_dir", str(tmp_path), env=env)
    path = tmp_path / "results_fsdp_dtensor_tp1_dp2.json"
    if fault == "node vanishes":
        _wait_for_steps(path, procs)
        # the node without rank 0: its agent and its worker, all at once
        doc = json.loads(path.read_text())
        victim = next(p for p in procs if doc["run"]["pid"] not in _children(p.pid))
        start = time.monotonic()
        for pid in [victim.pid, *_children(victim.pid)]:
            os.kill(pid, signal.SIGKILL)
    else:
        start = time.monotonic()
    codes, output = finish(procs, timeout=240)
    assert time.monotonic() - start < (60 if fault == "node vanishes" else 150)
    assert all(code != 0 for code in codes)
    lines = tp_bench_lines(output)
    assert len(lines) == 1, output[-4000:]
    doc = json.loads(path.read_text())
    assert doc["status"] == "failed"
    if fault == "rank raises":
        assert "rank 1: RuntimeError: injected failure at step 4" in lines[0]
    else:
        assert "rank 1 (pid" in lines[0] and ("exited unexpectedly" in lines[0]
                                              or "stopped responding" in lines[0])


def _children(pid):
    found = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                found += [int(stat), *_children(int(stat))]
    return found
