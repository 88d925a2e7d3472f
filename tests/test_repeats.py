"""tp-bench compare over repeated runs: configurations grouped, medians, per-round ratios."""

import json
import statistics

import pytest

from result_docs import make_doc, write
from tp_bench.analysis import compare, repeats
from tp_bench.frontends import cli

A_STEPS = (0.10, 0.12, 0.11)      # configuration A, rounds 1-3
B_STEPS = (0.05, 0.08, 0.04)      # configuration B (compile=True), rounds 1-3


def interleaved(tmp_path):
    """A1 B1 A2 B2 A3 B3, as an interleaved device call writes them."""
    paths = []
    for k, (a, b) in enumerate(zip(A_STEPS, B_STEPS), start=1):
        paths.append(write(tmp_path, f"a{k}.json", make_doc(step_s=a)))
        paths.append(write(tmp_path, f"b{k}.json", make_doc(step_s=b, compile=True)))
    return paths


def tokens_per_sec(path):
    return json.loads(path.read_text())["summary"]["avg_tokens_per_sec"]


def test_groups_medians_and_per_round_ratios(tmp_path):
    paths = interleaved(tmp_path)
    groups = repeats.group_runs(compare.compare(paths))
    assert [[r.index for r in g.runs] for g in groups] == [[1, 3, 5], [2, 4, 6]]
    first, second = repeats.rows(groups)
    a = [tokens_per_sec(p) for p in paths[0::2]]
    b = [tokens_per_sec(p) for p in paths[1::2]]
    assert first["tokens_per_sec_median"] == pytest.approx(statistics.median(a))
    assert (first["tokens_per_sec_min"], first["tokens_per_sec_max"]) == (min(a), max(a))
    assert first["paired"] is None and first["ratio_of_medians"] == pytest.approx(1.0)
    assert second["ratio_of_medians"] == pytest.approx(statistics.median(b) / statistics.median(a))
    per_round = [y / x for x, y in zip(a, b)]
    assert second["paired"]["pairs"] == 3
    assert second["paired"]["median"] == pytest.approx(statistics.median(per_round))
    assert (second["paired"]["min"], second["paired"]["max"]) == \
        pytest.approx((min(per_round), max(per_round)))
    # the pairing is by round: the median of the per-round ratios is not the ratio of medians
    assert second["paired"]["median"] != pytest.approx(second["ratio_of_medians"])
    assert second["differs"] == ["compile=true"]


def test_incomplete_runs_are_left_out(tmp_path):
    paths = interleaved(tmp_path)
    paths.append(write(tmp_path, "a4.json", make_doc(step_s=1.0, status="partial")))
    groups = repeats.group_runs(compare.compare(paths))
    assert [len(g.runs) for g in groups] == [3, 3]


def test_the_compare_command_adds_the_table_only_for_repeats(tmp_path, capsys):
    paths = [str(p) for p in interleaved(tmp_path)]
    assert cli.main(["compare", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("group"))
    assert [line.split()[0] for line in lines[header + 2:header + 4]] == ["G1", "G2"]
    assert "#2,#4,#6" in lines[header + 3]
    assert cli.main(["compare", *paths, "--format", "markdown"]) == 0
    assert "| group | impl | mesh | runs |" in capsys.readouterr().out
    assert cli.main(["compare", *paths, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [row["group"] for row in doc["repeats"]] == [1, 2] and len(doc["runs"]) == 6

    once = paths[:2]                      # each configuration once: no second table
    assert cli.main(["compare", *once]) == 0
    assert not any(line.startswith("group") for line in capsys.readouterr().out.splitlines())
    assert cli.main(["compare", *once, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["repeats"] == []
