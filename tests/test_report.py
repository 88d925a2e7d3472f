"""tp-bench compare: rows, ratios, comparability, the three output formats, bad input, the
table of repeated configurations."""

import json
import statistics
from pathlib import Path

import pytest

from launch import python
from result_docs import make_doc, write
from tp_bench.analysis import compare as report
from tp_bench.analysis import repeats
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


# ---------------------------------------------------------------------- repeated configurations
A_STEPS = (0.10, 0.13, 0.11)      # impl fsdp_dtensor, rounds 1-3
B_STEPS = (0.06, 0.05, 0.09)      # impl autotp, rounds 1-3


def rounds_of_two_impls(tmp_path, a_steps=A_STEPS, b_steps=B_STEPS, statuses=None):
    """A1 B1 A2 B2 ..., as an interleaved call writes them; ``statuses[(impl, k)]`` marks a
    run as not complete."""
    statuses = statuses or {}
    paths = []
    for k, (a, b) in enumerate(zip(a_steps, b_steps), start=1):
        for impl, step_s in (("fsdp_dtensor", a), ("autotp", b)):
            doc = make_doc(step_s=step_s, impl=impl,
                           status=statuses.get((impl, k), "complete"))
            paths.append(write(tmp_path, f"{impl}_{k}.json", doc))
    return paths


def summary(path, key="avg_tokens_per_sec"):
    return json.loads(path.read_text())["summary"][key]


def quartiles(values):
    """q1, median, q3 by linear interpolation (numpy's default, as tp_bench.core.stats)."""
    return statistics.quantiles(values, n=4, method="inclusive")


def test_repeated_configurations_are_grouped_with_medians_and_per_round_ratios(tmp_path):
    paths = rounds_of_two_impls(tmp_path)
    groups = repeats.group_runs(report.compare(paths, None))
    assert [[r.index for r in g.runs] for g in groups] == [[1, 3, 5], [2, 4, 6]]
    assert [g.rounds for g in groups] == [[1, 2, 3], [1, 2, 3]]
    first, second = repeats.rows(groups)
    assert (first["impl"], second["impl"]) == ("fsdp_dtensor", "autotp")
    a = [summary(p) for p in paths[0::2]]
    b = [summary(p) for p in paths[1::2]]
    for row, tps, files in ((first, a, paths[0::2]), (second, b, paths[1::2])):
        assert row["tokens_per_sec_median"] == pytest.approx(statistics.median(tps))
        assert (row["tokens_per_sec_min"], row["tokens_per_sec_max"]) == \
            pytest.approx((min(tps), max(tps)))
        assert row["step_ms_median"] == pytest.approx(
            statistics.median(summary(p, "median_step_time_ms") for p in files))
    assert first["paired"] is None and first["ratio_of_medians"] == pytest.approx(1.0)
    assert second["ratio_of_medians"] == pytest.approx(statistics.median(b) / statistics.median(a))
    per_round = [y / x for x, y in zip(a, b)]
    q1, mid, q3 = quartiles(per_round)
    paired = second["paired"]
    assert paired["pairs"] == 3
    assert (paired["median"], paired["q1"], paired["q3"]) == pytest.approx((mid, q1, q3))
    assert (paired["min"], paired["max"]) == pytest.approx((min(per_round), max(per_round)))
    # by round, not the ratio of the medians (0.11/0.06 against 0.10/0.06 here)
    assert paired["median"] != pytest.approx(second["ratio_of_medians"], rel=1e-3)


def test_compare_command_prints_the_repeats_table(tmp_path, capsys):
    paths = [str(p) for p in rounds_of_two_impls(tmp_path)]
    expected = repeats.rows(repeats.group_runs(report.compare(paths)))
    assert cli.main(["compare", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("group")]
    assert len(header) == 1
    g1, g2 = lines[header[0] + 2], lines[header[0] + 3]
    assert set(lines[header[0] + 1].replace(" ", "")) == {"-"}
    assert g1.split()[:4] == ["G1", "fsdp_dtensor", "dp1xtp2", "#1,#3,#5"]
    assert g2.split()[:4] == ["G2", "autotp", "dp1xtp2", "#2,#4,#6"]
    assert f"{expected[1]['tokens_per_sec_median']:,.0f}" in g2.split()
    assert g1.split()[-2:] == ["1.00x", "-"]
    assert g2.rstrip().endswith(f"{expected[1]['paired']['median']:.2f}x "
                                f"[{expected[1]['paired']['q1']:.2f}-"
                                f"{expected[1]['paired']['q3']:.2f}] (n=3)")

    assert cli.main(["compare", *paths, "--format", "markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    top = md.index(next(line for line in md if line.startswith("| group | impl | mesh | runs |")))
    assert md[top + 1].startswith("| --- | --- | --- | --- | ---: |")
    assert md[top + 2].startswith("| G1 | fsdp_dtensor | dp1xtp2 | #1,#3,#5 |")
    assert md[top + 3].startswith("| G2 | autotp | dp1xtp2 | #2,#4,#6 |")
    assert {line.count("|") for line in md[top:top + 4]} == {md[top].count("|")}

    assert cli.main(["compare", *paths, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["runs"]) == 6 and len(doc["repeats"]) == 2
    assert [row["runs"] for row in doc["repeats"]] == [[1, 3, 5], [2, 4, 6]]
    assert doc["repeats"][0]["paired"] is None
    assert doc["repeats"][1]["paired"] == pytest.approx(expected[1]["paired"])
    assert doc["repeats"][1]["ratio_of_medians"] == pytest.approx(expected[1]["ratio_of_medians"])


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_no_repeats_no_group_table(tmp_path, capsys, fmt):
    paths = [str(p) for p in rounds_of_two_impls(tmp_path, A_STEPS[:1], B_STEPS[:1])]
    paths.append(str(write(tmp_path, "c.json", make_doc(step_s=0.07, compile=True))))
    assert cli.main(["compare", *paths, "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert "G1" not in out and "Repeated configurations" not in out
    assert not any(line.lstrip("| ").startswith("group") for line in out.splitlines())
    assert cli.main(["compare", *paths, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["repeats"] == [] and len(doc["runs"]) == 3


def test_incomplete_runs_are_left_out_of_the_groups_but_keep_their_round(tmp_path, capsys):
    # round 1 of fsdp_dtensor failed (so the baseline is autotp's round 1), round 3 of autotp
    # is partial: the pairs are rounds 2 and 4 only
    paths = rounds_of_two_impls(tmp_path, (0.2, *A_STEPS), (*B_STEPS, 0.04),
                                {("fsdp_dtensor", 1): "failed", ("autotp", 3): "partial"})
    incomplete = {str(paths[0]), str(paths[5])}
    groups = repeats.group_runs(report.compare(paths), paths)
    assert [g.runs[0].config["impl"] for g in groups] == ["autotp", "fsdp_dtensor"]
    assert [g.rounds for g in groups] == [[1, 2, 4], [2, 3, 4]]
    assert not incomplete & {str(r.path) for g in groups for r in g.runs}
    a = {k: summary(paths[2 * k - 2]) for k in (2, 3, 4)}
    b = {k: summary(paths[2 * k - 1]) for k in (1, 2, 4)}
    per_round = [a[2] / b[2], a[4] / b[4]]
    second = repeats.rows(groups)[1]
    assert second["paired"]["pairs"] == 2
    assert second["paired"]["median"] == pytest.approx(statistics.median(per_round))
    assert second["tokens_per_sec_median"] == pytest.approx(statistics.median(a.values()))

    assert cli.main(["compare", *map(str, paths), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [len(row["runs"]) for row in doc["repeats"]] == [3, 3]
    assert doc["repeats"][1]["paired"]["median"] == pytest.approx(statistics.median(per_round))


def test_baseline_option_does_not_shift_the_rounds(tmp_path, capsys):
    paths = [str(p) for p in rounds_of_two_impls(tmp_path)]
    a = [summary(Path(p)) for p in paths[0::2]]
    b = [summary(Path(p)) for p in paths[1::2]]
    # the second fsdp_dtensor run as the baseline: listed first, still round 2 of its group
    assert cli.main(["compare", *paths, "--baseline", paths[2], "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    first, second = doc["repeats"]
    assert first["impl"] == "fsdp_dtensor" and first["runs"] == [2, 1, 5]
    assert second["paired"]["median"] == pytest.approx(
        statistics.median(y / x for x, y in zip(a, b)))
