"""The memory plan (engine.plan, `tp-bench plan`, docs/plan.md): what it predicts per rank, checked
against what the strategies allocate (CPU, tp=2 and dp=2 x tp=2, both stacks, ZeRO 0/1/2), the
Qwen3-32B table and a few numbers computed by hand, the refusal of a run that cannot fit, and
the comparison with measured peaks (`--check`)."""

import contextlib
import io
import json
import shutil

import pytest

from launch import REPO, torchrun
from tp_bench.core.config import BenchConfig
from tp_bench.core.dims import ParallelDims
from tp_bench.core.errors import ConfigError
from tp_bench.engine import fit
from tp_bench.engine.plan import GIB, fits, plan_row, resolve_for
from tp_bench.engine.shapes import model_shapes
from tp_bench.frontends import plan as plan_cli
from tp_bench.frontends.cli import main

# ---------------------------------------------------------------------- calibration on CPU
CALIBRATED = [["--impl", "fsdp_dtensor"], ["--impl", "autotp", "--zero_stage", "0"],
              ["--impl", "autotp", "--zero_stage", "1"], ["--impl", "autotp", "--zero_stage", "2"]]
SMALL = ["--model_name", "tiny", "--num_layers", "2", "--seq_length", "32", "--batch_size", "2"]
# Everything a rank holds after the backward, against the plan's parameters, master weights,
# optimizer state and gradients: the rest is the batch, rotary tables and scalars.
TOTAL_TOLERANCE = 0.02


@pytest.mark.parametrize("nproc,mesh", [(2, []), (4, ["--dp_size", "2"])],
                         ids=["tp2", "dp2-tp2"])
def test_the_plan_holds_what_the_strategies_allocate(nproc, mesh):
    # every stage at tp=2; at dp=2 x tp=2 (where the stages differ by what they split over dp)
    # fsdp_dtensor and ZeRO 1, the default, to keep the 4-rank launch short
    chosen = CALIBRATED if not mesh else [CALIBRATED[0], CALIBRATED[2]]
    configs = [impl + SMALL + mesh for impl in chosen]
    proc = torchrun(nproc, "tests/plan_calibration.py", json.dumps(configs), timeout=600,
                    env={"PYTHONPATH": str(REPO)})
    lines = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
             if line.startswith("CALIBRATION ")]
    assert proc.returncode == 0 and len(lines) == len(configs), proc.stdout + proc.stderr[-3000:]
    for line in lines:
        measured, planned = line["measured"], line["planned"]
        label = f"{line['impl']} ZeRO {line['zero_stage']} {line['mesh']}"
        for state in ("params", "master", "optimizer"):
            assert measured[state] == planned[state], (label, state, measured, planned)
        # What the step frees: the gradients, and a scalar or two (loss, norm).
        assert 0 <= measured["grads"] - planned["grads"] <= 64, (label, measured, planned)
        states = sum(planned.values())
        assert abs(measured["live"] - states) <= TOTAL_TOLERANCE * states, (label, measured)
    expected = {("fsdp_dtensor", None), ("autotp", 0), ("autotp", 1), ("autotp", 2)}
    assert {(x["impl"], x["zero_stage"]) for x in lines} == (
        expected if not mesh else {("fsdp_dtensor", None), ("autotp", 1)})


# ---------------------------------------------------------------------- the Qwen3-32B table
def run_cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def qwen3_32b_counts(tp):
    """Rank 0's parameters of Qwen3-32B at tp, by hand: q/k/v/gate/up split on their outputs,
    o/down on their inputs, the norms whole, embedding and lm_head on the vocabulary."""
    h, i, q, kv, vocab, layers = 5120, 25600, 64 * 128, 8 * 128, 151936, 64
    split = (q * h + 2 * kv * h + h * q + 3 * i * h) // tp
    whole = 2 * h + 2 * 128
    root = 2 * -(-vocab // tp) * h + h
    return layers * (split + whole) + root


def test_qwen3_32b_on_8_gpus_every_mesh_both_stacks():
    code, text = run_cli("plan", "--model_name", "Qwen/Qwen3-32B", "--nproc", "8")
    assert code == 0
    for mesh in ("dp1xtp8", "dp2xtp4", "dp4xtp2", "dp8xtp1"):
        rows = [line for line in text.splitlines() if line.startswith(mesh)]
        assert len(rows) == 4, text                    # memory and communication, 2 stacks
        assert any(" autotp " in r for r in rows) and any(" fsdp_dtensor " in r for r in rows)
    assert "Memory per rank (GB)" in text and "Communication per step per rank" in text
    code, md = run_cli("plan", "--model_name", "Qwen/Qwen3-32B", "--nproc", "8",
                       "--format", "markdown")
    assert code == 0 and "| dp2xtp4 | fsdp_dtensor | - |" in md

    code, js = run_cli("plan", "--model_name", "Qwen/Qwen3-32B", "--nproc", "8",
                       "--format", "json")
    rows = {(r["impl"], r["mesh"]): r for r in json.loads(js)["rows"]}
    assert len(rows) == 8
    n8, n4 = qwen3_32b_counts(8), qwen3_32b_counts(4)
    fsdp = rows["fsdp_dtensor", "dp1xtp8"]["memory"]
    assert fsdp["params"] == 4 * n8 and fsdp["grads"] == 4 * n8 and fsdp["optimizer"] == 8 * n8
    assert fsdp["master"] == 0
    autotp = rows["autotp", "dp2xtp4"]["memory"]       # ZeRO 1: bf16 module, fp32 over dp
    assert autotp["params"] == 2 * n4 and autotp["master"] == 4 * n4 // 2
    assert autotp["optimizer"] == 8 * n4 // 2
    # autotp at tp=8: 4 all-reduces per layer of [2048, 5120] bf16, the embedding output and
    # lm_head's input gradient, 3 small loss reductions; a ring all-reduce sends 2 * 7/8 of it.
    act = 2048 * 5120 * 2
    comm = rows["autotp", "dp1xtp8"]["comm"]
    tp_ar = sum(c["bytes"] for c in comm if c["group"] == "tp" and c["kind"] == "all_reduce")
    assert tp_ar == 4 * 64 * act + 2 * act + 3 * 2048 * 4
    assert sum(c["wire"] for c in comm if c["kind"] == "all_reduce") == int(tp_ar * 1.75)
    # FSDP2 at dp2: float32 gradients reduce-scattered once per step.
    rs = [c for c in rows["fsdp_dtensor", "dp2xtp4"]["comm"] if c["kind"] == "reduce_scatter"
          and c["group"] == "dp"]
    assert rs[0]["bytes"] == 4 * n4 and rs[0]["wire"] == 4 * n4 // 2


def test_several_zero_stages_one_mesh_and_unknown_values():
    code, js = run_cli("plan", "--model_name", "Qwen/Qwen3-8B", "--nproc", "4", "--impl",
                       "autotp", "--zero_stage", "0", "1", "2", "--dp_size", "2",
                       "--format", "json")
    rows = json.loads(js)["rows"]
    assert code == 0 and [(r["mesh"], r["options"]["zero_stage"]) for r in rows] == [
        ("dp2xtp2", 0), ("dp2xtp2", 1), ("dp2xtp2", 2)]
    # ZeRO 1 splits the master weights and AdamW state over dp; ZeRO 0 does not.
    assert rows[0]["memory"]["optimizer"] == pytest.approx(2 * rows[1]["memory"]["optimizer"],
                                                           rel=1e-6)
    code, text = run_cli("plan", "--model_name", "Qwen/Qwen3-8B", "--nproc", "3")
    assert code == 0 and "not planned: autotp dp1xtp3: Qwen/Qwen3-8B: num_attention_heads" \
        in text and "dp3xtp1  autotp" in text
    assert main(["plan", "--model_name", "tiny"]) == 2                                # --nproc
    assert main(["plan", "--model_name", "tiny", "--nproc", "2", "--impl", "nope"]) == 2


# ---------------------------------------------------------------------- fits and the refusal
def resolved(impl, nproc, dp, **options):
    base = BenchConfig(model_name="Qwen/Qwen3-32B", **options)
    return resolve_for(base, impl, ParallelDims.resolve(nproc, dp, None))


def test_fits_says_why():
    shapes = model_shapes("Qwen/Qwen3-32B")
    ok, row = fits(resolved("fsdp_dtensor", 8, 1), shapes, 80 * GIB)
    assert ok and row.peak <= 80 * GIB and row.mesh == "dp1xtp8"
    ok, row = fits(resolved("autotp", 8, 1), shapes, 80 * GIB)
    assert not ok and row.peak_phase == "optimizer_step" and "ZeRO-1 dp1xtp8" in row.summary()
    # Checkpointing lowers the peak of the activation-bound mesh.
    plain = plan_row(resolved("fsdp_dtensor", 8, 8), shapes)
    ckpt = plan_row(resolved("fsdp_dtensor", 8, 8, activation_checkpointing=True), shapes)
    assert ckpt.memory["activations"] < plain.memory["activations"] / 5
    assert ckpt.peak < plain.peak


def test_a_run_predicted_over_the_gpu_memory_is_refused_with_its_row():
    cfg = resolved("autotp", 1, 1)
    with pytest.raises(ConfigError) as err:
        fit.check_gpu_fit(cfg, 80 * GIB, "NVIDIA H100", local_ranks=1)
    message = str(err.value)
    assert "needs about" in message and "more than 1.2x the 80 GB of the NVIDIA H100" in message
    assert "plan: autotp ZeRO-1 dp1xtp1:" in message and "--force" in message
    assert "\n" not in message
    # Over the memory, but within the plan's margin: allowed.
    row = plan_row(cfg, model_shapes("Qwen/Qwen3-32B"), budget=10**15)
    assert fit.check_gpu_fit(cfg, int(row.peak / 1.1), "GPU", 1) is not None


def test_a_cpu_run_over_the_host_memory_is_refused_with_its_row(monkeypatch):
    monkeypatch.setattr(fit, "available_host_memory_bytes", lambda: 16 * GIB)
    cfg = resolve_for(BenchConfig(model_name="Qwen/Qwen3-8B"), "fsdp_dtensor",
                      ParallelDims(1, 2))
    with pytest.raises(ConfigError) as err:
        fit.check_host_fit(cfg, local_ranks=2)
    message = str(err.value)
    assert "needs at least" in message and "GB of host memory for 2 rank(s)" in message
    assert "plan: fsdp_dtensor dp1xtp2:" in message and "peak" in message
    tiny = resolve_for(BenchConfig(model_name="tiny"), "fsdp_dtensor", ParallelDims(1, 2))
    assert fit.check_host_fit(tiny, local_ranks=2).peak < GIB


# ---------------------------------------------------------------------- --check
def test_check_compares_the_plan_with_the_gpu_results_in_the_docs(tmp_path):
    for path in (REPO / "docs" / "plots").glob("results_*.json"):
        shutil.copy(path, tmp_path)
    code, text = run_cli("plan", "--check", str(tmp_path), "--format", "json")
    rows = json.loads(text)
    assert code == 0 and len(rows) == 2
    for row in rows:
        assert row["memory"] == "cuda_allocator" and row["error"] is None
        assert abs(row["error_pct"]) < 2 and abs(row["setup_error_pct"]) < 2, row
    code, text = run_cli("plan", "--check", str(tmp_path))
    assert "worst GPU row:" in text and "Qwen/Qwen3-1.7B (28L)" in text


def test_check_holds_every_gpu_row_of_plan_md():
    """docs/plan.md 4.3's table: every complete GPU run in docs/results/ within 3% of the plan,
    eager and compiled; a run that ended in an OOM is listed, not compared."""
    runs = REPO / "docs" / "results" / "h200-2026-12-03"
    dirs = sorted(str(p.parent) for p in runs.rglob("results_*.json"))
    code, text = run_cli("plan", "--check", *dirs, "--format", "json")
    rows = json.loads(text)
    assert code == 0 and len(rows) == len(dirs)
    planned = [r for r in rows if r["error"] is None]
    assert {r["model"] for r in planned} >= {f"Qwen/Qwen3-{m}" for m in ("0.6B", "1.7B", "4B", "8B")}
    assert any(r["compile"] for r in planned) and any(r["batch_size"] == 8 for r in planned)
    for row in planned:
        assert abs(row["error_pct"]) < 3, row
    cut_short = [r for r in rows if r["error"] and "ended failed" in r["error"]]
    assert [r["file"].split("/")[-2] for r in cut_short] == ["autotp-Qwen3-4B-bs2-acoff"]


def test_check_on_cpu_made_results(cpu_runs, tmp_path):
    honest, _ = cpu_runs
    doc = json.loads(next(honest.glob("results_*.json")).read_text())
    (tmp_path / "results_unknown.json").write_text(json.dumps(
        {**doc, "config": {**doc["config"], "model_name": "no/such-model-here"}}))
    code, text = run_cli("plan", "--check", str(honest), str(tmp_path), "--format", "json")
    rows = {r["model"]: r for r in json.loads(text)}
    assert code == 0
    row = rows["tiny"]
    assert row["memory"] == "process_rss" and row["error"] is None
    # Host RSS is dominated by the process itself (0.4-1.4 GB with torch and transformers,
    # more in bf16); the plan adds 1.4 GB to its peak, so it bounds the RSS from above.
    assert 0 < row["measured_gb"] <= row["predicted_gb"], row
    assert "no/such-model-here" in rows["no/such-model-here"]["error"]
    code, text = run_cli("plan", "--check", str(honest))
    assert "(RSS)" in text and "worst GPU row" not in text


def test_the_sweep_example_in_the_docs_runs():
    from test_docs import blocks_marked

    (code,) = blocks_marked(REPO / "docs" / "plan.md", "test_the_sweep_example_in_the_docs_runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "plan.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["dp1xtp8", "dp2xtp4", "dp4xtp2", "dp8xtp1"]
    assert lines[0] == "dp1xtp8 fits " and "skip: fsdp_dtensor dp8xtp1:" in lines[3]


def test_the_plan_options_are_the_runs():
    """The run's options come from BenchConfig; the plan takes them too (but its own --impl,
    --zero_stage, --dp_size, --tp_size, which take several values or none)."""
    options = {a.dest for a in plan_cli.parser()._actions}
    assert {f.name for f in BenchConfig.option_fields()} <= options
