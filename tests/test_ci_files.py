"""ci/: the example workflow parses and calls what exists; the shell scripts parse."""

import os
import subprocess

import pytest

from launch import REPO

SCRIPTS = ["ci/run_suite.sh"]


def test_workflow_gates_and_uploads():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((REPO / "ci/gpu-benchmarks.yml").read_text())
    steps = workflow["jobs"]["benchmark"]["steps"]
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "ci/run_suite.sh out/benchmarks.json" in runs
    assert 'tp-bench gate --history "$BASELINE" out/benchmarks.json' in runs
    assert "--plot out/plots" in runs
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "out/benchmarks.json" in upload["with"]["path"] and upload["if"] == "${{ !cancelled() }}"
    for path in ("scripts/install.sh", "ci/run_suite.sh", "benchmark.py"):
        assert (REPO / path).exists(), path


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = REPO / script
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True)
