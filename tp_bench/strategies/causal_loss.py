"""The mean causal-LM loss of the HuggingFace-model stacks, computed from the model's logits.

HuggingFace's own loss (``model(labels=...)``) is the same arithmetic, but it runs inside the
model's forward, where ``--compile`` (one graph per decoder layer) does not reach it: eagerly it
materializes a float32 copy of the logits and a float32 log-softmax, the largest transients of
a step at a large vocabulary. Outside the model it can be compiled, as torchtitan compiles its
loss: inductor fuses the upcast into the softmax and the gradient is written once, in the
logits' dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tp_bench.core.data import Batch

IGNORE_INDEX = -100   # torch's, HuggingFace's and torchtitan's cross-entropy ignore index

ForwardLoss = Callable[[Callable, Batch], torch.Tensor]


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HuggingFace's ``ForCausalLMLoss``: position t predicts label t+1 (the last position has
    none), float32 cross-entropy, mean over the valid labels. Vocabulary-sharded DTensor logits
    work under ``loss_parallel``."""
    labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX)


def causal_lm_loss(compiled: bool) -> ForwardLoss:
    """A ``Parallelized.forward_loss``: the model's logits, then the loss (compiled or not)."""
    loss = torch.compile(shifted_cross_entropy) if compiled else shifted_cross_entropy

    def forward_loss(model: Callable, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, use_cache=False).logits
        return loss(logits, batch.labels)

    return forward_loss


eager_causal_lm_loss = causal_lm_loss(compiled=False)
