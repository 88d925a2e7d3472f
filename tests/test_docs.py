"""The code in README.md and docs/ runs: every bash or python block says how it is checked (run
here, run by .ci/run, or not run here and why), and the ones marked tested run here."""

import json
import re

from launch import REPO, torchrun

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<marker><!-- (?P<how>[^>]*) -->\n)?```(?P<lang>bash|python)\n"
                   r"(?P<code>.*?)^```$", re.M | re.S)


def blocks(page):
    return [m.groupdict() for m in FENCE.finditer(page.read_text())]


def blocks_marked(page, name):
    found = [b["code"] for b in blocks(page) if b["how"] and b["how"].endswith(name)]
    assert found, f"{page.name}: no block marked tested: {name}"
    return found


def test_every_runnable_block_says_how_it_is_checked():
    ci = (REPO / ".ci" / "run").read_text()
    for page in PAGES:
        for block in blocks(page):
            how = block["how"] or ""
            where = f"{page.name}: block {block['code'][:60]!r}"
            assert how.startswith(("tested: ", "not run here: ", "run by .ci/run")), where
            if how.startswith("tested: "):
                target = how.split()[1]
                path, _, test = target.partition("::")
                text = (REPO / "tests" / path).read_text()
                assert not test or f"def {test}(" in text, where
            if how == "run by .ci/run":
                for line in block["code"].splitlines():
                    command = line.split(" --benchmark-json")[0]
                    assert command in ci, f"{where}: .ci/run does not run {command!r}"


def test_readme_quick_start(tmp_path):
    (code,) = blocks_marked(REPO / "README.md", "test_readme_quick_start")
    (tmp_path / "benchmark.py").symlink_to(REPO / "benchmark.py")
    script = tmp_path / "quick_start.sh"
    script.write_text("set -euo pipefail\n" + code)
    proc = torchrun_shell(script, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"^[12] +(autotp|fsdp)", line)]
    assert sorted(r.split()[1] for r in rows) == ["autotp", "fsdp_dtensor"], proc.stdout
    for impl in ("autotp", "fsdp_dtensor"):
        doc = json.loads((tmp_path / "results" / f"results_{impl}_tp2_dp1.json").read_text())
        assert doc["status"] == "complete" and doc["summary"]["num_steps"] == 7


def torchrun_shell(script, cwd):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


TINY_MISTRAL = {"model_type": "mistral", "vocab_size": 512, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": None,
                "tie_word_embeddings": False}


def test_adding_a_model_and_a_strategy(tmp_path):
    """design.md's examples, as a user would save them: the Mistral builder, the tp_only stack
    and its registration, then tp_only on the Mistral model against the reference at tp=2."""
    model, strategy, registration = blocks_marked(REPO / "docs" / "design.md",
                                                 "test_adding_a_model_and_a_strategy")
    (tmp_path / "mistral_builder.py").write_text(model)
    (tmp_path / "tp_only.py").write_text(strategy)
    (tmp_path / "launcher.py").write_text("\n".join([
        "import sys",
        f"sys.path.insert(0, {str(tmp_path)!r})",
        "import mistral_builder  # noqa: F401  (registers the builder)",
        registration.strip(),
        "from tp_bench.frontends.cli import entry",
        "entry()", ""]))
    config = tmp_path / "tiny_mistral.json"
    config.write_text(json.dumps(TINY_MISTRAL))
    report = tmp_path / "parity.json"
    proc = torchrun(2, str(tmp_path / "launcher.py"), "parity", "--impl", "tp_only",
                    "--model_name", str(config), "--seq_length", "32", "--batch_size", "2",
                    "--dtype", "float32", "--learning_rate", "1e-3", "--parity_steps", "4",
                    "--report", str(report), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["ok"] and result["config"]["impl"] == "tp_only"
    assert result["step0_loss_diff"] <= 1e-5 and result["max_grad_rel_diff"] <= 1e-4
    assert result["loss_change"] > 0.1
