"""torchtitan (its own model, its own parallelize_*) trains the same model as the single-process
reference (CPU, gloo), at tp=2 and dp=2 x tp=2; in bf16 it tracks it. (Beside fsdp_dtensor on
the seed's command line, with the plans where the two setups differ: test_every_stack.py.)"""

import pytest

from launch import parity_reports, report_of

pytest.importorskip("torchtitan")

COMMON = ["-m", "tp_bench", "parity", "--impl", "torchtitan", "--model_name", "tiny",
          "--num_layers", "2", "--seq_length", "64", "--batch_size", "2",
          "--learning_rate", "1e-3"]
TINY_TIED = "tests/data/tiny_qwen3_tied.json"
TINY_LLAMA = "tests/data/tiny_llama.json"

CASES = {
    # defaults: vocab/loss + sequence parallel, FSDP2 at dp 1 too, fused AdamW
    "tp2": (2, ["--parity_steps", "5"]),
    "dp2-tp2-ga2-ac-no-sp": (4, ["--dp_size", "2", "--gradient_accumulation_steps", "2",
                                 "--activation_checkpointing", "--sequence_parallel", "false",
                                 "--optimizer_impl", "foreach"]),
    "tp2-tied-embeddings": (2, ["--model_name", TINY_TIED]),
    "tp2-llama": (2, ["--model_name", TINY_LLAMA]),
    # HSDP (replicate 2 x shard 1) with TP: torchtitan's ["dp_replicate", "fsdp"] mesh
    "hsdp-rep2-tp2": (4, ["--dp_size", "2", "--dp_replicate", "2"]),
    # per-block compile (fullgraph) and the compiled loss-parallel cross-entropy
    "tp2-compile": (2, ["--compile", "--num_layers", "1", "--parity_steps", "3"]),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every case, the cases of one world size in one launch."""
    cases = {name: (n, ["--dtype", "float32", *extra]) for name, (n, extra) in CASES.items()}
    cases["bf16"] = (2, ["--dtype", "bfloat16"])
    return parity_reports(tmp_path_factory.mktemp("parity_torchtitan"), COMMON[3:], cases)


@pytest.mark.parametrize("case", CASES)
def test_parity_with_reference(reports, case):
    report = report_of(reports, case)
    assert report["ok"], report
    assert report["step0_loss_diff"] <= 1e-5
    assert report["max_loss_diff"] <= 1e-3
    assert report["max_grad_rel_diff"] <= 1e-4   # every parameter, mapped back to HF names
    # The check has power: the loss moved far more than the tolerance.
    assert report["loss_change"] > 0.3


def test_bf16_tracks_the_reference(reports):
    """bf16 "cast" policy at tp=2. torchtitan's model rounds differently from HF's by design:
    its norms are torch's nn.RMSNorm (HF's upcast to float32 by hand and apply the weight after
    casting back) and it applies RoPE in float32 (HF casts cos/sin to bf16). Measured on this
    model: step-0 loss 1.9e-4 apart, at most 5.8e-4 over 5 steps, grad norms 3.3e-3 apart
    (fsdp_dtensor, HF's own model, at the same settings: 2.4e-4, 2.6e-4 and 2.7e-3: bf16
    rounding in the TP reductions is as large). Bounded at about ten times that."""
    report = report_of(reports, "bf16")
    assert report["ok"], report
    assert report["step0_loss_diff"] <= 2e-3
    assert report["max_loss_diff"] <= 5e-3
    assert report["max_grad_norm_rel_diff"] <= 3e-2
    assert report["loss_change"] > 0.3
