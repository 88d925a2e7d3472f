"""Vocabulary parallelism over a tensor-parallel process group (plain tensors, no DTensor).

Each tp rank holds a contiguous range of vocabulary rows of the embedding and of the lm_head.
The ranges follow ``torch.chunk``: ceil(vocab / tp) rows per rank, the last rank takes what is
left, so a vocabulary that does not divide by tp needs no padding (and no padded logit can win
the softmax, because there is none). DTensor shards the same way, so both strategies split the
vocabulary identically.

- ``VocabParallelEmbedding``: masked lookup of the ids in this rank's range, zeros elsewhere,
  summed over tp (all-reduce); the backward of that sum is the identity.
- ``VocabParallelLMHead``: column-parallel projection whose logits stay sharded; its input's
  gradient is summed over tp in backward.
- ``vocab_parallel_causal_cross_entropy``: the exact causal-LM loss over logits split across
  tp ranks (max and sum-exp all-reduced, target logit gathered by sum), with the analytic
  backward (softmax minus one-hot on this rank's columns). No rank holds the full logits.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def vocab_range(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows that ``tp_rank`` holds (torch.chunk's split)."""
    per_rank = math.ceil(vocab_size / tp_size)
    start = min(tp_rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size)


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over tp in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce (sum) over tp forward; identity backward (every rank's upstream gradient is
    the same, since everything downstream is replicated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _VocabShard(nn.Module):
    """Holds rows [vocab_start, vocab_end) of a [vocab, hidden] weight, split over ``group``."""

    def __init__(self, weight_shard: torch.Tensor, vocab_size: int, vocab_start: int, group):
        super().__init__()
        self.weight = weight_shard if isinstance(weight_shard, nn.Parameter) \
            else nn.Parameter(weight_shard)
        self.vocab_size = vocab_size
        self.vocab_start = vocab_start
        self.vocab_end = vocab_start + self.weight.shape[0]
        self.group = group

    @classmethod
    def from_full_weight(cls, weight: torch.Tensor, group):
        """Take this rank's rows of a full weight (its values are kept)."""
        vocab_size = weight.shape[0]
        start, end = vocab_range(vocab_size, dist.get_rank(group), dist.get_world_size(group))
        shard = nn.Parameter(weight.detach()[start:end].clone(), requires_grad=weight.requires_grad)
        return cls(shard, vocab_size, start, group)

    def extra_repr(self) -> str:
        return (f"vocab [{self.vocab_start}, {self.vocab_end}) of {self.vocab_size}, "
                f"dim {self.weight.shape[1]}")


class VocabParallelEmbedding(_VocabShard):
    """An ``nn.Embedding`` whose rows are split over the tp group."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group) -> "VocabParallelEmbedding":
        return cls.from_full_weight(embedding.weight, group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return _ReduceFromTP.apply(out, self.group)


class VocabParallelLMHead(_VocabShard):
    """Output projection with vocabulary-sharded weight; returns this rank's logit columns."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, group) -> "VocabParallelLMHead":
        if linear.bias is not None:
            raise ValueError("vocabulary-parallel lm_head: a bias is not supported")
        return cls.from_full_weight(linear.weight, group)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTP.apply(hidden, self.group), self.weight)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of [tokens, local vocab] logits against global target ids."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group):
        logits = logits.float()
        # Subtract the global max for a stable exp; it cancels in the loss and its gradient.
        global_max = logits.max(dim=-1).values
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - global_max.unsqueeze(-1)

        local_target = target - vocab_start
        here = (local_target >= 0) & (local_target < logits.shape[-1])
        local_target = local_target.masked_fill(~here, 0)
        rows = torch.arange(logits.shape[0], device=logits.device)
        target_logit = shifted[rows, local_target].masked_fill(~here, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = shifted.exp_()  # in place: shifted is no longer needed
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit

        exp.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocabulary, this rank's columns
        ctx.save_for_backward(exp, local_target, here)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, here = ctx.saved_tensors
        grad = softmax  # saved for this backward only: reuse its memory
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= here.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 group, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ``ignore_index``.

    ``logits``: [..., local vocab] (this rank's columns, starting at ``vocab_start``);
    ``target``: [...] global ids. Equals ``F.cross_entropy`` on the gathered logits.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    target = target.reshape(-1)
    valid = target != ignore_index
    per_token = _VocabParallelCrossEntropy.apply(logits, target.masked_fill(~valid, 0),
                                                 vocab_start, group)
    # Ignored tokens get weight 0, so their (meaningless) loss gets zero gradient.
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


def vocab_parallel_causal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                        vocab_start: int, group,
                                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The causal-LM loss as HuggingFace computes it (position t predicts label t+1), over
    vocabulary-sharded logits [batch, seq, local vocab] and labels [batch, seq]."""
    return vocab_parallel_cross_entropy(logits[:, :-1, :], labels[:, 1:], vocab_start, group,
                                        ignore_index)
