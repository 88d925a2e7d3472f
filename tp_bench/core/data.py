"""Synthetic token batches, identical for every strategy.

Tokens follow a fixed Zipf-like distribution over the vocabulary, so the loss falls from about
ln(vocab) towards the distribution's entropy within tens of steps: two strategies that train the
same model draw the same loss curve, and one that does not learn shows it. A batch depends only on
(seed, dp rank, step, micro-batch): every tp rank of a dp replica sees identical tokens, different
dp replicas see different tokens, and a reference can rebuild any rank's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ZIPF_EXPONENT = 1.1


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor   # [batch, seq] int64
    labels: torch.Tensor      # [batch, seq] int64; the model shifts them for the causal loss

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device, non_blocking=True),
                     self.labels.to(device, non_blocking=True))

    @staticmethod
    def cat(batches: list["Batch"]) -> "Batch":
        return Batch(torch.cat([b.input_ids for b in batches]),
                     torch.cat([b.labels for b in batches]))


def _mix(*values: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 steps); stable across processes."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state & 0x7FFFFFFFFFFFFFFF


class SyntheticData:
    def __init__(self, vocab_size: int, batch_size: int, seq_length: int, seed: int):
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.seed = seed
        ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
        weights = ranks.pow(-ZIPF_EXPONENT)
        self._cdf = torch.cumsum(weights / weights.sum(), 0)

    def batch(self, step: int, micro: int = 0, dp_rank: int = 0) -> Batch:
        """The micro-batch ``micro`` of ``step`` for data-parallel replica ``dp_rank`` (on CPU)."""
        generator = torch.Generator().manual_seed(_mix(self.seed, dp_rank, step, micro))
        u = torch.rand(self.batch_size, self.seq_length, generator=generator, dtype=torch.float64)
        ids = torch.searchsorted(self._cdf, u).clamp_(max=self.vocab_size - 1)
        return Batch(input_ids=ids, labels=ids.clone())

    def global_batch(self, step: int, micro: int, dp_size: int) -> Batch:
        """All replicas' micro-batches concatenated: what a single-process reference trains on."""
        return Batch.cat([self.batch(step, micro, r) for r in range(dp_size)])
