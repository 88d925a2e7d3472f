"""Vocabulary-parallel embedding, lm_head and causal cross-entropy equal the plain modules on the
gathered values (forward and gradients), at tp=2 and tp=4, with and without ignored labels, with
a vocabulary that divides by tp and one that does not."""

import pytest

from launch import torchrun


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_plain_modules(tp):
    proc = torchrun(tp, "tests/vocab_parallel_check.py", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"vocab parallel checks passed at tp={tp}" in proc.stdout
