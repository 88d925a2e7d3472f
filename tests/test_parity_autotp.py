"""autotp trains the same model as a single-process reference (CPU, gloo, float32), at tp=2 and
dp=2 x tp=2, ZeRO 0/1/2/3, with and without vocabulary parallelism; DeepSpeed's groups are the
seed's rows and columns. (The seed's command for autotp beside the other stacks:
test_every_stack.py.)"""

import re

import pytest

from launch import parity_reports, report_of, torchrun

COMMON = ["-m", "tp_bench", "parity", "--impl", "autotp", "--seq_length", "32",
          "--batch_size", "2", "--dtype", "float32", "--learning_rate", "1e-3",
          "--num_layers", "2"]
TINY_TIED = "tests/data/tiny_qwen3_tied.json"
TINY_LLAMA = "tests/data/tiny_llama.json"
TINY_QWEN2 = "tests/data/tiny_qwen2.json"

CASES = {
    "tp2-zero0": (2, ["--model_name", "tiny", "--zero_stage", "0"]),
    "tp2-zero1": (2, ["--model_name", "tiny", "--zero_stage", "1"]),
    "tp2-zero1-no-vocab": (2, ["--model_name", "tiny", "--zero_stage", "1",
                               "--no_vocab_parallel"]),
    "dp2-tp2-zero1": (4, ["--model_name", "tiny", "--dp_size", "2", "--zero_stage", "1"]),
    "dp2-tp2-zero2-ga2-ac": (4, ["--model_name", "tiny", "--dp_size", "2", "--zero_stage", "2",
                                 "--gradient_accumulation_steps", "2",
                                 "--activation_checkpointing"]),
    "tp2-zero3": (2, ["--model_name", "tiny", "--zero_stage", "3"]),
    "dp2-tp2-zero3-ga2-ac": (4, ["--model_name", "tiny", "--dp_size", "2", "--zero_stage", "3",
                                 "--gradient_accumulation_steps", "2",
                                 "--activation_checkpointing"]),
    "tp2-tied-embeddings": (2, ["--model_name", TINY_TIED]),
    "tp2-llama": (2, ["--model_name", TINY_LLAMA]),
    "tp2-qwen2-bias": (2, ["--model_name", TINY_QWEN2]),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every case, the cases of one world size in one launch."""
    return parity_reports(tmp_path_factory.mktemp("parity_autotp"), COMMON[3:], {
        **CASES,
        "bf16-zero1": (2, ["--model_name", "tiny", "--dtype", "bfloat16"]),
        "bf16-zero0": (2, ["--model_name", "tiny", "--dtype", "bfloat16", "--zero_stage", "0"]),
    })


@pytest.mark.parametrize("case", CASES)
def test_parity_with_reference(reports, case):
    report = report_of(reports, case)
    assert report["ok"], report
    assert report["step0_loss_diff"] <= 1e-5
    assert report["max_loss_diff"] <= 1e-3
    assert report["max_grad_rel_diff"] <= 1e-4
    # Gradient clipping at 1.0 is active (norms ~6), so a wrong norm would move the losses.
    assert report["loss_change"] > 0.3


CAST = {"autotp": ["--impl", "autotp"], "autotp-zero3": ["--impl", "autotp", "--zero_stage", "3"],
        "fsdp_dtensor": ["--impl", "fsdp_dtensor"]}


@pytest.fixture(scope="module")
def cast_reports(tmp_path_factory):
    common = ["--model_name", TINY_TIED, "--num_layers", "2", "--seq_length", "32",
              "--batch_size", "2", "--dtype", "bfloat16", "--learning_rate", "1e-5"]
    return parity_reports(tmp_path_factory.mktemp("parity_cast"), common,
                          {name: (1, extra) for name, extra in CAST.items()})


@pytest.mark.parametrize("case", CAST)
def test_bf16_cast_policy_starts_from_exact_master_weights(cast_reports, case):
    """bf16 "cast" policy at lr 1e-5: updates are far below the bf16 grid step, so a master
    copy that started on the grid (DeepSpeed's, unless restored) trains measurably slower
    (max loss diff 1.8e-2 here) than the reference; from exact values both stay within 1e-3."""
    report = report_of(cast_reports, case)
    assert report["ok"], report
    assert report["max_loss_diff"] <= 5e-3


# bf16 rounding noise in the gradient norm over the parity steps, at lr 1e-3: 2.6e-3 with
# HuggingFace's RMSNorm, 5.6e-3 with the fused one (--norm_impl, the default); the defect this
# bound catches (ZeRO 0's norm, below) is 18%.
BF16_GRAD_NORM_NOISE = 1e-2


def test_bf16_zero1_tracks_the_reference(reports):
    report = report_of(reports, "bf16-zero1")
    assert report["ok"], report
    assert report["max_grad_norm_rel_diff"] <= BF16_GRAD_NORM_NOISE


@pytest.mark.xfail(strict=True, reason="DeepSpeed 0.19.8: with bf16 at ZeRO 0 under AutoTP the "
                   "engine's gradient norm is ~18% low on this model, so clipping is too weak")
def test_bf16_zero0_grad_norm(reports):
    assert report_of(reports, "bf16-zero0")["max_grad_norm_rel_diff"] <= BF16_GRAD_NORM_NOISE


def test_deepspeed_groups_are_the_seed_rows_and_columns():
    proc = torchrun(4, "tests/autotp_groups.py", "--impl", "autotp", "--model_name", "tiny",
                    "--num_layers", "1", "--dp_size", "2", "--tp_size", "2",
                    "--dtype", "float32", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = {int(r): (t, d) for r, t, d in
              re.findall(r"rank (\d): tp (\[[\d, ]+\]) dp (\[[\d, ]+\])", proc.stdout)}
    print(proc.stdout)
    assert groups == {0: ("[0, 1]", "[0, 2]"), 1: ("[0, 1]", "[1, 3]"),
                      2: ("[2, 3]", "[0, 2]"), 3: ("[2, 3]", "[1, 3]")}
