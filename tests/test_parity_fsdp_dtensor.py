"""fsdp_dtensor trains the same model as a single-process reference (CPU, gloo, float32), in
every combination of its techniques; and the comparison itself can fail."""

import json

import pytest
import torch

from launch import parity_reports, report_of, torchrun
from tp_bench.engine.parity import Tolerances, Trace, compare

COMMON = ["-m", "tp_bench", "parity", "--impl", "fsdp_dtensor", "--seq_length", "32",
          "--batch_size", "2", "--dtype", "float32", "--learning_rate", "1e-3",
          "--num_layers", "2"]
TINY_TIED = "tests/data/tiny_qwen3_tied.json"
TINY_LLAMA = "tests/data/tiny_llama.json"
TINY_QWEN2 = "tests/data/tiny_qwen2.json"

CASES = {
    # defaults: vocab + sequence parallel, fused q/k/v, meta-device init, fused AdamW, no FSDP
    # at dp 1
    "tp2": (2, ["--model_name", "tiny", "--parity_steps", "5"]),
    "tp2-plain-plan": (2, ["--model_name", "tiny", "--use_vocab_parallel", "false",
                           "--sequence_parallel", "false", "--meta_init", "false",
                           "--fused_qkv", "false", "--optimizer_impl", "foreach",
                           "--fsdp_at_dp1"]),
    "dp2-tp2-ga2-ac": (4, ["--model_name", "tiny", "--dp_size", "2",
                           "--gradient_accumulation_steps", "2", "--activation_checkpointing"]),
    "tp2-tied-embeddings": (2, ["--model_name", TINY_TIED]),
    # meta-device init must keep the tie where no TP plan re-ties it (tp 1; FSDP over dp)
    "tp1-tied-embeddings": (1, ["--model_name", TINY_TIED, "--num_layers", "2"]),
    "dp2-tied-embeddings": (2, ["--model_name", TINY_TIED, "--num_layers", "2", "--dp_size", "2"]),
    "tp2-llama": (2, ["--model_name", TINY_LLAMA]),
    "tp2-qwen2-bias-no-sp": (2, ["--model_name", TINY_QWEN2, "--sequence_parallel", "false"]),
    "tp2-compile": (2, ["--model_name", "tiny", "--num_layers", "1", "--compile",
                        "--parity_steps", "3"]),
    # the compiled loss (strategies.causal_loss; not over vocabulary-sharded logits) under FSDP2
    "dp2-compile": (2, ["--model_name", "tiny", "--num_layers", "1", "--compile", "--dp_size",
                        "2", "--parity_steps", "3"]),
    # HSDP: parameters sharded within a replica group, replicated across them
    "hsdp-rep2-shard2": (4, ["--model_name", "tiny", "--num_layers", "2", "--dp_size", "4",
                             "--dp_replicate", "2"]),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every case, the cases of one world size in one launch."""
    return parity_reports(tmp_path_factory.mktemp("parity_fsdp"), COMMON[3:], CASES)


@pytest.mark.parametrize("case", CASES)
def test_parity_with_reference(reports, case):
    report = report_of(reports, case)
    assert report["ok"], report
    assert report["step0_loss_diff"] <= 1e-5
    assert report["max_loss_diff"] <= 1e-3
    assert report["max_grad_rel_diff"] <= 1e-4
    # The check has power: the loss moved far more than the tolerance.
    assert report["loss_change"] > 0.3


def test_comparison_catches_a_wrong_gradient_and_a_wrong_loss():
    """A partial gradient (what a replicated norm inside a TP region gets) and a drifting loss
    are both flagged."""
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


def test_qwen3_qk_norms_need_their_plan_entry(tmp_path):
    """Without the q_norm/k_norm entries each tp rank keeps a partial gradient for them: the
    parity check must catch it (and does, on exactly those parameters)."""
    report_path = tmp_path / "parity.json"
    proc = torchrun(2, "tests/plan_without_qk_norm.py", *COMMON[2:], "--model_name", "tiny",
                    "--num_layers", "2", "--sequence_parallel", "false",
                    "--report", str(report_path), timeout=400)
    report = json.loads(report_path.read_text())
    assert proc.returncode == 1 and not report["ok"]
    assert report["max_grad_rel_diff"] > 0.1
    assert report["worst_grad"].endswith(("q_norm.weight", "k_norm.weight"))


def test_the_loss_is_compiled_where_the_logits_are_whole():
    """--compile compiles the loss (dp2-compile above checks it) but not under loss_parallel,
    where the compiled cross-entropy came out per vocabulary shard (tp2-compile checks that)."""
    from tp_bench.core.config import BenchConfig
    from tp_bench.core.dims import ParallelDims
    from tp_bench.strategies.fsdp_dtensor import compiles_loss

    cfg = BenchConfig(impl="fsdp_dtensor", compile=True, use_vocab_parallel=True)
    assert compiles_loss(cfg, ParallelDims(dp=2, tp=1))
    assert not compiles_loss(cfg, ParallelDims(dp=1, tp=2))
    assert compiles_loss(BenchConfig(impl="fsdp_dtensor", compile=True, use_vocab_parallel=False),
                         ParallelDims(dp=1, tp=2))
    assert not compiles_loss(BenchConfig(impl="fsdp_dtensor"), ParallelDims(dp=2, tp=1))
