"""Run under torchrun (gloo): VocabParallelEmbedding / LMHead / cross-entropy against the plain
modules on the gathered values. Exits non-zero with the first mismatch (test helper)."""


import torch
import torch.distributed as dist
import torch.nn.functional as F

from tp_bench.core.dist import leave
from tp_bench.strategies.vocab_parallel import (VocabParallelEmbedding, VocabParallelLMHead,
                                              vocab_parallel_causal_cross_entropy,
                                              vocab_parallel_cross_entropy, vocab_range)

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
group = dist.new_group(list(range(world)))
torch.manual_seed(0)   # every rank draws the same full tensors


def close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert got.shape == want.shape and err <= tol, f"{name}: rel err {err:.3e} (tol {tol:g})"


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    pieces = [None] * world
    dist.all_gather_object(pieces, local.detach())
    return torch.cat(pieces, dim=0)


def gather_cols(local: torch.Tensor) -> torch.Tensor:
    pieces = [None] * world
    dist.all_gather_object(pieces, local.detach())
    return torch.cat(pieces, dim=-1)


for vocab in (64, 61):   # divisible by 2 and 4; and not (61 = 16+16+16+13 at tp 4)
    hidden = 8
    start, end = vocab_range(vocab, rank, world)
    ranges = [vocab_range(vocab, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))

    # Embedding: forward and weight gradient, ids on every shard boundary and both ends.
    full = torch.nn.Embedding(vocab, hidden)
    edges = sorted({i for r in ranges for i in (r[0], r[1] - 1)} | {0, vocab - 1})
    ids = torch.cat([torch.tensor(edges), torch.randint(0, vocab, (4 * vocab,))])[:4 * vocab].view(4, -1)
    upstream = torch.randn(*ids.shape, hidden)
    want = full(ids)
    (want * upstream).sum().backward()
    emb = VocabParallelEmbedding.from_embedding(full, group)
    assert (emb.vocab_start, emb.vocab_end) == (start, end)
    got = emb(ids)
    (got * upstream).sum().backward()
    close(f"embedding forward (vocab {vocab})", got, want)
    close(f"embedding weight grad (vocab {vocab})", gather_rows(emb.weight.grad), full.weight.grad)

    # lm_head + causal cross-entropy: loss, logits gradient and input gradient.
    linear = torch.nn.Linear(hidden, vocab, bias=False)
    head = VocabParallelLMHead.from_linear(linear, group)
    h_full = torch.randn(2, 7, hidden, requires_grad=True)
    h_tp = h_full.detach().clone().requires_grad_(True)
    for ignore in (False, True):
        labels = torch.randint(0, vocab, (2, 7))
        if ignore:
            labels[0, 2:5] = -100
            labels[1, -1] = -100
        logits_full = linear(h_full)
        logits_full.retain_grad()
        want = F.cross_entropy(logits_full[:, :-1].reshape(-1, vocab).float(),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
        want.backward()
        logits_tp = head(h_tp)
        logits_tp.retain_grad()
        got = vocab_parallel_causal_cross_entropy(logits_tp, labels, head.vocab_start, group)
        got.backward()
        tag = f"(vocab {vocab}, ignore_index {'used' if ignore else 'unused'})"
        close(f"causal loss {tag}", got, want)
        close(f"logits {tag}", gather_cols(logits_tp), logits_full)
        close(f"logits grad {tag}", gather_cols(logits_tp.grad), logits_full.grad)
        close(f"hidden grad {tag}", h_tp.grad, h_full.grad)
        close(f"lm_head weight grad {tag}", gather_rows(head.weight.grad), linear.weight.grad)
        for t in (h_full, h_tp, linear.weight, head.weight):
            t.grad = None

    # Plain (non-causal) form on 2D logits.
    logits = torch.randn(11, vocab, dtype=torch.float32, requires_grad=True)
    target = torch.randint(0, vocab, (11,))
    want = F.cross_entropy(logits, target)
    local = logits.detach()[:, start:end].clone().requires_grad_(True)
    got = vocab_parallel_cross_entropy(local, target, start, group)
    got.backward()
    want.backward()
    close(f"cross-entropy 2D (vocab {vocab})", got, want)
    close(f"cross-entropy 2D grad (vocab {vocab})", local.grad, logits.grad[:, start:end])

if rank == 0:
    print(f"vocab parallel checks passed at tp={world}", flush=True)
dist.destroy_process_group()
leave(0)
