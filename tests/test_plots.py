"""tp-bench compare --plot: four PNGs, coinciding loss curves named, a clear message without
matplotlib."""

import sys

import pytest

from result_docs import make_doc, write
from tp_bench.analysis import compare as report, plots
from tp_bench.frontends import cli
from tp_bench.core.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def comparison(tmp_path):
    same = make_doc(step_s=0.1)
    faster = make_doc(step_s=0.05, impl="other_impl", sequence_parallel=False)
    other_seq = make_doc(seq=128)
    for i, step in enumerate(other_seq["steps"]):
        step["loss"] += 0.5 + 0.01 * i
    return report.compare([write(tmp_path, "a.json", same), write(tmp_path, "b.json", faster),
                           write(tmp_path, "c.json", other_seq)])


def test_writes_four_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    written = plots.write_plots(comparison(tmp_path), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["loss.png", "memory.png", "phases.png",
                                               "throughput.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


def test_coinciding_loss_curves_are_grouped(tmp_path):
    assert plots.coinciding_losses(comparison(tmp_path)) == [[1, 2]]


def test_labels_say_what_sets_a_run_apart(tmp_path):
    runs = comparison(tmp_path).runs
    assert plots.run_label(runs[0]) == "#1 fsdp_dtensor dp1xtp2"
    assert plots.run_label(runs[1]) == "#2 other_impl dp1xtp2\nsequence_parallel=false"
    assert plots.run_label(runs[2]) == "#3 fsdp_dtensor dp1xtp2\nseq_length=128"


def test_without_matplotlib_the_message_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails
    with pytest.raises(ConfigError, match=r"pip install 'tp_bench\[plot\]'"):
        plots.write_plots(comparison(tmp_path), tmp_path / "plots")
    assert cli.main(["compare", str(tmp_path / "a.json"), "--plot", str(tmp_path / "p")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
