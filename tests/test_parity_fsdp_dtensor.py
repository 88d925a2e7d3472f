"""fsdp_dtensor trains the same model as a single-process reference (CPU, gloo, float32)."""

import json

import pytest
import torch

from launch import torchrun
from tp_bench.parity import Tolerances, Trace, compare

COMMON = ["-m", "tp_bench", "parity", "--impl", "fsdp_dtensor", "--model_name", "tiny",
          "--seq_length", "64", "--batch_size", "2", "--dtype", "float32",
          "--learning_rate", "1e-3", "--parity_steps", "5"]


def run_parity(tmp_path, nproc, *extra):
    report_path = tmp_path / "parity.json"
    proc = torchrun(nproc, *COMMON, *extra, "--report", str(report_path), timeout=300)
    assert report_path.exists(), proc.stdout + proc.stderr
    return proc, json.loads(report_path.read_text())


@pytest.mark.parametrize("nproc, extra", [
    (2, ["--tp_size", "2"]),
    (4, ["--dp_size", "2", "--tp_size", "2"]),
    (4, ["--dp_size", "2", "--tp_size", "2", "--gradient_accumulation_steps", "2",
         "--activation_checkpointing"]),
], ids=["tp2", "dp2-tp2", "dp2-tp2-ga2-ac"])
def test_parity_with_reference(tmp_path, nproc, extra):
    proc, report = run_parity(tmp_path, nproc, *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"]
    assert report["step0_loss_diff"] <= 1e-5
    assert report["max_loss_diff"] <= 1e-3
    assert report["max_grad_rel_diff"] <= 1e-4
    # The check has power: the loss moved far more than the tolerance in 5 steps.
    assert report["loss_change"] > 0.5


def test_comparison_catches_a_wrong_gradient_and_a_wrong_loss():
    """The comparator itself can fail: a partial gradient (the bug a replicated norm inside a
    TP region causes) and a drifting loss are both flagged."""
    ref = Trace(losses=[9.0, 8.0], grad_norms=[2.0, 2.0],
                grads={"w": torch.ones(4), "n": torch.ones(2)})
    good = Trace(losses=[9.0, 8.0], grad_norms=[2.0, 2.0],
                 grads={"w": torch.ones(4), "n": torch.ones(2)})
    tol = Tolerances.for_dtype("float32")
    assert compare(good, ref).ok(tol)
    partial = Trace(losses=[9.0, 8.0], grad_norms=[2.0, 2.0],
                    grads={"w": torch.ones(4), "n": torch.tensor([1.0, 0.0])})
    report = compare(partial, ref)
    assert not report.ok(tol) and report.worst_grad == "n"
    drift = Trace(losses=[9.0, 8.01], grad_norms=[2.0, 2.0], grads={})
    assert not compare(drift, ref).ok(tol)
