"""tp-bench compare: rows, ratios, comparability, the three output formats, bad input."""

import json

import pytest

from launch import python
from result_docs import make_doc, write
from tp_bench.analysis import compare as report
from tp_bench.frontends import cli


def test_ratios_to_the_first_run(tmp_path):
    a = write(tmp_path, "a.json", make_doc(step_s=0.1, peak_gb=2.0))
    b = write(tmp_path, "b.json", make_doc(step_s=0.05, impl="other_impl", peak_gb=3.0))
    rows = report.compare([a, b]).rows
    assert rows[0]["ratio"]["tokens_per_sec"] == pytest.approx(1.0)
    assert rows[1]["ratio"]["tokens_per_sec"] == pytest.approx(2.0)
    assert rows[1]["ratio"]["step_ms_median"] == pytest.approx(0.5)
    assert rows[1]["ratio"]["peak_memory_gb"] == pytest.approx(1.5)
    assert rows[1]["comparable"] and rows[1]["impl"] == "other_impl"
    assert (rows[0]["forward_pct"], rows[0]["backward_pct"]) == pytest.approx((30, 50), rel=0.02)


def test_baseline_option_puts_that_run_first(tmp_path):
    a = write(tmp_path, "a.json", make_doc(step_s=0.1))
    b = write(tmp_path, "b.json", make_doc(step_s=0.05))
    comparison = report.compare([a, b], baseline=b)
    assert [r["file"] for r in comparison.rows] == [str(b), str(a)]
    assert comparison.rows[1]["ratio"]["tokens_per_sec"] == pytest.approx(0.5)


@pytest.mark.parametrize("change, reason", [
    ({"seq": 128}, "seq 128 vs 64"),
    ({"dtype": "float32"}, "precision fp32/fp32/fp32 vs bf16/fp32/fp32"),
    ({"layers": 2}, "model tiny (2L) vs tiny (4L)"),
])
def test_different_workloads_are_flagged_not_ranked(tmp_path, change, reason):
    a = write(tmp_path, "a.json", make_doc())
    b = write(tmp_path, "b.json", make_doc(**change))
    comparison = report.compare([a, b])
    row = comparison.rows[1]
    assert not row["comparable"] and row["ratio"] is None
    assert row["not_comparable"] == [reason]
    text = report.format_table(comparison)
    assert f"#2: not comparable with #1: {reason}" in text
    assert text.splitlines()[3].rstrip().endswith("n/c        n/c")


def test_how_a_precision_is_implemented_does_not_matter(tmp_path):
    other = make_doc(impl="other_impl")
    other["precision"] = {**other["precision"], "param_dtype": "bfloat16",
                          "mechanism": "deepspeed bf16"}
    rows = report.compare([write(tmp_path, "a.json", make_doc()),
                           write(tmp_path, "b.json", other)]).rows
    assert rows[1]["comparable"]


def test_differing_settings_and_status_are_noted(tmp_path):
    a = write(tmp_path, "a.json", make_doc())
    b = write(tmp_path, "b.json", make_doc(sequence_parallel=False, status="partial"))
    comparison = report.compare([a, b])
    assert comparison.runs[1].differs == ["sequence_parallel=false"]
    notes = report.notes(comparison)
    assert f"#2: {b} (vs #1: sequence_parallel=false)" in notes
    assert "#2: status partial (10 measured steps)" in notes
    assert "2 (partial)" in report.format_table(comparison)


def test_markdown_and_json_formats(tmp_path):
    a = write(tmp_path, "a.json", make_doc())
    b = write(tmp_path, "b.json", make_doc(step_s=0.2))
    comparison = report.compare([a, b])
    md = report.format_markdown(comparison).splitlines()
    assert md[0].startswith("| # | impl | mesh | nodes x ranks | model | seq | batch | precision")
    assert md[1].startswith("| --- |") and md[1].endswith("---: |")
    assert md[3].count("|") == md[0].count("|") and "| 0.50x |" in md[3]
    doc = json.loads(report.format_json(comparison))
    assert doc["baseline"] == 1 and len(doc["runs"]) == 2
    assert doc["runs"][1]["ratio"]["tokens_per_sec"] == pytest.approx(0.5, rel=1e-6)


def test_directories_expand_to_results_files(tmp_path):
    (tmp_path / "run").mkdir()
    write(tmp_path / "run", "results_x_tp2_dp1.json", make_doc())
    write(tmp_path / "run", "other.json", {"not": "results"})
    assert [r.path.name for r in report.compare([tmp_path / "run"]).runs] == \
        ["results_x_tp2_dp1.json"]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"benchmarks": []}', "a pytest-benchmark file, not tp_bench results"),
    ('{"config": {}}', "not a tp_bench results file"),
    ("[1,", "cannot read results"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tp_bench: error: ") and message in err and err.count("\n") == 1


def test_compare_cpu_runs_end_to_end(cpu_runs, tmp_path):
    honest, slowed = cpu_runs
    proc = python("-m", "tp_bench", "compare", str(honest), str(slowed), "--format",
                  "markdown", "--plot", str(tmp_path / "plots"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].startswith("| 1 | fsdp_dtensor | dp1xtp1 | 1x1 | tiny (2L) | 64 | 2 | "
                               "fp32/fp32/fp32 |")
    ratio = float(lines[3].split("|")[-3].strip().rstrip("x"))
    assert ratio < 0.8                # the slowed run: about a third of the throughput
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == \
        ["loss.png", "memory.png", "phases.png", "throughput.png"]
