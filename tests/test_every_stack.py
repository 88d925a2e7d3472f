"""Every stack on the seed's command line at tp=2 (same seed, mesh and data): the same losses
from step 0, result files with the same blocks and precision, and the plans that differ recorded
as applied; hf_native also at dp=2 x tp=2; then `tp-bench compare` puts them side by side. One
run per stack, shared by every comparison."""

import importlib.util
import json
import re

import pytest

from launch import python, torchrun

# torchtitan is an optional extra (scripts/install.sh installs it, so CI runs it here).
STACKS = ["fsdp_dtensor", "hf_native", "autotp"] + (
    ["torchtitan"] if importlib.util.find_spec("torchtitan") else [])


def seed_command(out, impl, dp, tp):
    proc = torchrun(dp * tp, "benchmark.py", "--impl", impl, "--model_name", "tiny",
                    "--num_layers", "2", "--dp_size", str(dp), "--tp_size", str(tp),
                    "--seq_length", "32", "--batch_size", "2", "--dtype", "float32",
                    "--learning_rate", "1e-3", "--num_training_steps", "6",
                    "--warmup_steps", "1", "--log_interval", "3", "--output_dir", str(out),
                    timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / f"results_{impl}_tp{tp}_dp{dp}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("every_stack") / "results"
    docs = {impl: seed_command(out, impl, 1, 2) for impl in STACKS}
    docs["hf_native dp2"] = seed_command(out, "hf_native", 2, 2)
    return out, docs


@pytest.mark.parametrize("impl", [s for s in STACKS if s != "fsdp_dtensor"])
def test_the_same_model_from_the_same_start(runs, impl):
    _, docs = runs
    mine, theirs = docs["fsdp_dtensor"], docs[impl]
    assert abs(theirs["warmup"][0]["loss"] - mine["warmup"][0]["loss"]) <= 1e-5
    for a, b in zip(theirs["steps"], mine["steps"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-3
        if a["grad_norm"] is not None:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert set(theirs) == set(mine) and set(theirs["summary"]) == set(mine["summary"])
    assert theirs["model"] == mine["model"]
    for key in ("compute_dtype", "master_weights", "grad_reduce_dtype", "policy"):
        assert theirs["precision"][key] == mine["precision"][key]


def test_the_plans_as_applied(runs):
    _, docs = runs
    f = docs["fsdp_dtensor"]["strategy"]
    assert "model.layers.*.self_attn.qkv_proj" in f["tp_plan"]["layer"]   # --fused_qkv
    assert "model.layers.*.self_attn.q_proj" not in f["tp_plan"]["layer"]
    for doc in (docs["hf_native"], docs["hf_native dp2"]):
        assert doc["status"] == "complete"
        strategy = doc["strategy"]
        assert strategy["vocab_parallel"] is False and strategy["sequence_parallel"] is False
        assert "no vocabulary-parallel loss" in strategy["not_offered"]
        assert strategy["tp_plan"]["layer"]["model.layers.*.self_attn.q_proj"] == \
            "transformers colwise"
        assert strategy["tp_plan"]["root"]["lm_head"] == "transformers colwise_gather_output"
    assert docs["hf_native dp2"]["strategy"]["fsdp"] == "transformers FSDP2 (its fsdp_plan) over dp"
    if "torchtitan" in docs:
        t = docs["torchtitan"]
        assert "layers.*.attention.qkv_linear.wqkv" in t["strategy"]["tp_plan"]["layer"]
        assert t["strategy"]["tp_plan"]["root"]["lm_head"].startswith("params weight S(0)")
        assert t["strategy"]["fsdp"].startswith("fully_shard tok_embeddings, [norm, lm_head]")
        assert t["environment"]["torchtitan"] == "0.3.0"


def test_compare_puts_them_side_by_side(runs):
    out, _ = runs
    compare = python("-m", "tp_bench", "compare", str(out), timeout=120)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    rows = re.findall(r"^\d+ +(\w+) +(dp\dxtp\d) ", compare.stdout, re.M)
    assert sorted(rows) == sorted([(impl, "dp1xtp2") for impl in STACKS]
                                  + [("hf_native", "dp2xtp2")]), compare.stdout
