"""scripts/slurm/: the sbatch scripts run a benchmark and the suite over two nodes.

Under a real SLURM when one answers (``bash ci/slurm_up.sh`` brings one up on this machine as
two nodes; .ci/run does, and sets TP_BENCH_REQUIRE_SLURM=1 so that a SLURM that fails to come
up fails the test instead of falling back); otherwise the scripts run with SLURM's environment
set as srun would set it, and small stand-ins for srun and scontrol on the PATH.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from launch import REPO, free_port

FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # srun's part here: one task per node (SLURM_JOB_NUM_NODES), its SLURM variables set.
    while [[ "$1" == --* ]]; do shift; done
    pids=()
    for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
      SLURM_NODEID=$i SLURMD_NODENAME=node$((i + 1)) SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status
""")
FAKE_SCONTROL = textwrap.dedent("""\
    #!/usr/bin/env bash
    # scontrol show hostnames node[1-2]
    for ((i = 1; i <= SLURM_JOB_NUM_NODES; i++)); do echo "node$i"; done
""")


def slurm_answers() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


def submit(script, args, env, out_dir, fake_bin):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "RANKS_PER_NODE": "1", **env}
    if slurm_answers():
        log = out_dir / "slurm.log"
        cmd = ["sbatch", "--wait", "--nodes=2", f"--output={log}", script, *args]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        return proc.returncode, proc.stdout + proc.stderr + (log.read_text() if log.exists()
                                                             else "")
    if os.environ.get("TP_BENCH_REQUIRE_SLURM") == "1":
        pytest.fail("TP_BENCH_REQUIRE_SLURM=1 but no SLURM answers (bash ci/slurm_up.sh)")
    fake_bin.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID=str(free_port()),
               SLURM_SUBMIT_DIR=str(REPO), RDZV_ENDPOINT=f"127.0.0.1:{free_port()}")
    proc = subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def test_benchmark_sbatch_runs_one_agent_per_node(tmp_path):
    code, output = submit("scripts/slurm/benchmark.sbatch",
                          ["--model_name", "tiny", "--num_layers", "2", "--seq_length", "32",
                           "--num_training_steps", "4", "--warmup_steps", "1",
                           "--dtype", "float32", "--output_dir", str(tmp_path)],
                          {"IMPL": "autotp", "DP_SIZE": "2"}, tmp_path, tmp_path / "bin")
    assert code == 0, output[-4000:]
    doc = json.loads((tmp_path / "results_autotp_tp1_dp2.json").read_text())
    assert doc["status"] == "complete"
    assert doc["environment"]["topology"]["ranks_per_node"] == {"node1": 1, "node2": 1}


def test_suite_sbatch_runs_the_suite_over_two_nodes(tmp_path):
    out = tmp_path / "suite.json"
    code, output = submit("scripts/slurm/suite.sbatch",
                          ["-m", "fsdp_dtensor and not parity", "-k", "test_step",
                           "--tp-bench-mesh", "2x1", "--tp-bench-rounds", "2",
                           "--tp-bench-warmup", "1", f"--benchmark-json={out}",
                           "-p", "no:cacheprovider"],
                          {}, tmp_path, tmp_path / "bin")
    assert code == 0, output[-4000:]
    (entry,) = json.loads(out.read_text())["benchmarks"]
    assert entry["name"] == "test_step[fsdp_dtensor-dp2xtp1]"
    topology = entry["extra_info"]["environment"]["topology"]
    assert topology["nodes"] == 2 and not topology["dp_groups_node_local"]
