"""Synthetic data: deterministic per (seed, dp rank, step, micro), identical across tp ranks."""

import torch

from tp_bench.core.data import SyntheticData


def test_deterministic_and_distinct():
    data = SyntheticData(vocab_size=1000, batch_size=2, seq_length=64, seed=1)
    again = SyntheticData(vocab_size=1000, batch_size=2, seq_length=64, seed=1)
    a = data.batch(step=3, micro=0, dp_rank=0)
    assert torch.equal(a.input_ids, again.batch(3, 0, 0).input_ids)   # any tp rank rebuilds it
    assert torch.equal(a.input_ids, a.labels)
    assert not torch.equal(a.input_ids, data.batch(3, 0, 1).input_ids)  # other dp replica
    assert not torch.equal(a.input_ids, data.batch(4, 0, 0).input_ids)  # other step
    assert not torch.equal(a.input_ids, data.batch(3, 1, 0).input_ids)  # other micro-batch
    other_seed = SyntheticData(vocab_size=1000, batch_size=2, seq_length=64, seed=2)
    assert not torch.equal(a.input_ids, other_seed.batch(3, 0, 0).input_ids)


def test_token_range_and_skew():
    data = SyntheticData(vocab_size=50, batch_size=4, seq_length=512, seed=0)
    ids = data.batch(0).input_ids
    assert ids.dtype == torch.int64 and ids.shape == (4, 512)
    assert ids.min() >= 0 and ids.max() < 50
    counts = torch.bincount(ids.flatten(), minlength=50)
    assert counts[0] > counts[25] > 0   # Zipf-like: learnable, so loss curves mean something


def test_global_batch_is_the_replicas_concatenated():
    data = SyntheticData(vocab_size=100, batch_size=2, seq_length=8, seed=0)
    g = data.global_batch(step=1, micro=0, dp_size=3)
    assert g.input_ids.shape == (6, 8)
    assert torch.equal(g.input_ids[2:4], data.batch(1, 0, 1).input_ids)
