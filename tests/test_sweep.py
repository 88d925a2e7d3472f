"""tp-bench sweep end to end on CPU (tiny preset, 2 ranks, a small grid): every configuration its
own launch with an outcome, faults that cost their configuration only (a failure, an
out-of-memory, a hang, a different model rejected by the parity guard), the confirmation's
ratio, and a second invocation that resumes without running anything again."""

import json
import time

import pytest

from launch import python
from tp_bench.analysis.plots import pareto_front
from tp_bench.frontends.sweep import _ratios

RUN = ["--impls", "fsdp_dtensor", "--model_name", "tiny", "--num_layers", "1",
       "--seq_length", "32", "--batch_size", "2", "--num_training_steps", "6",
       "--warmup_steps", "2", "--dtype", "float32", "--learning_rate", "1e-3",
       "--nproc_per_node", "2", "--confirm_rounds", "2", "--budget_minutes", "40",
       "--program", "tests/fault_injection.py"]
GRID = ["--grid", "batch_size=4", "sequence_parallel=false", "activation_checkpointing=true",
        "use_vocab_parallel=false"]
FAULTS = {"TP_BENCH_TEST_FAULT": "sweep:oom@batch_size=4;fail@activation_checkpointing=true;"
                                 "hang@use_vocab_parallel=false;drift@sequence_parallel=false"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    start = time.monotonic()
    proc = python("-m", "tp_bench", "sweep", *RUN, *GRID, "--timeout_s", "45", "--out",
                  str(out), "--plot", env=FAULTS, timeout=2400)
    return out, proc, time.monotonic() - start


def test_every_configuration_has_its_outcome_and_the_sweep_goes_on(sweep):
    out, proc, _ = sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    by_option = {json.dumps(row["options"], sort_keys=True): row
                 for row in summary["configurations"]}

    def outcome(**options):
        return by_option[json.dumps(options, sort_keys=True)]

    assert outcome()["outcome"] == "ok"                                   # the defaults
    assert outcome(batch_size=4)["outcome"] == "oom"
    assert outcome(batch_size=4, activation_checkpointing=True)["outcome"] == "oom"
    assert outcome(activation_checkpointing=True)["outcome"] == "failed"
    assert "injected failure" in outcome(activation_checkpointing=True)["reason"]
    assert outcome(use_vocab_parallel=False)["outcome"] == "timeout"
    drifted = outcome(sequence_parallel=False)
    assert drifted["outcome"] == "diverged" and "losses off the reference" in drifted["reason"]
    for row in summary["configurations"]:
        assert (out / "configs" / row["id"] / "log.txt").exists()
    best = summary["best"]["fsdp_dtensor"]
    assert best["id"] == outcome()["id"]     # every other configuration failed one way or another
    assert best["command"].startswith("python -m torch.distributed.run --standalone "
                                      "--nproc_per_node=2 tests/fault_injection.py")
    assert (out / "sweep.md").read_text().count("| fsdp_dtensor") == len(by_option)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_the_confirmation_interleaves_and_gives_a_ratio_with_its_spread(sweep):
    out, proc, _ = sweep
    summary = json.loads((out / "sweep.json").read_text())
    confirmation = summary["confirmation"]
    assert confirmation["rounds"] == 2
    assert len(confirmation["tokens_per_sec"]["fsdp_dtensor best"]) == 2
    (ratio,) = confirmation["ratios"]
    assert ratio["ratio"] == "fsdp_dtensor best / fsdp_dtensor default" and ratio["rounds"] == 2
    assert ratio["q1"] <= ratio["median"] <= ratio["q3"]
    assert sorted(p.name for p in (out / "confirm").iterdir()) == ["round1", "round2"]
    assert "fsdp_dtensor best / fsdp_dtensor default = " in proc.stdout


def test_a_second_invocation_resumes_without_running_again(sweep):
    out, _, first = sweep
    start = time.monotonic()
    proc = python("-m", "tp_bench", "sweep", *RUN, *GRID, "--timeout_s", "45", "--out",
                  str(out), env=FAULTS, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[measured before]") >= 6 and "sweep: " in proc.stdout
    assert time.monotonic() - start < first / 3


def test_ratios_and_the_pareto_front_by_hand():
    rates = {("a", "best"): [110.0, 120.0, 130.0], ("a", "default"): [100.0, 100.0, 100.0],
             ("b", "best"): [120.0, 125.0, 110.0], ("b", "default"): [90.0, 100.0, 100.0]}
    ratios = {r["ratio"]: r for r in _ratios(rates)}
    assert ratios["a best / a default"]["median"] == pytest.approx(1.2)
    assert ratios["a best / a default"]["verdict"] == "a best faster"
    between = ratios["a best / b best"]
    assert between["q1"] < 1.0 < between["q3"] and between["verdict"] == "no measurable difference"
    assert pareto_front([(1.0, 10.0), (2.0, 5.0), (2.0, 20.0), (3.0, 15.0)]) == [(1.0, 10.0),
                                                                                   (2.0, 20.0)]


def test_a_configuration_the_plan_says_cannot_fit_is_skipped_not_launched(tmp_path):
    """With a GPU's memory (here given: 0.01 GB), the plan's peak decides before any launch."""
    from tp_bench.core.config import BenchConfig
    from tp_bench.core.dims import ParallelDims
    from tp_bench.frontends.sweep import Sweep, build_parser

    args = build_parser().parse_args(["--gpu_memory_gb", "0.01", "--out", str(tmp_path),
                                      "--program", "no_such_program.py"])
    args.nproc = 2
    base = BenchConfig(model_name="tiny", seq_length=32, batch_size=2, dtype="float32")
    sweep = Sweep(args, base, ["fsdp_dtensor"], [ParallelDims(1, 2)], {})
    launch = sweep.launch(base.__class__(**{**base.__dict__, "impl": "fsdp_dtensor",
                                            "tp_size": 2}).validate(2))
    assert launch.outcome == "skipped" and launch.seconds == 0.0
    assert launch.reason.startswith("predicted not to fit 0 GB: ")
    assert "peak" in launch.reason and not (launch.directory / "log.txt").exists()
