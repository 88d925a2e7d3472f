"""Gradient-norm clipping over parameters that live on different device meshes.

With FSDP2 over "dp" and TP over "tp", the parallelized linears hold 2D (dp, tp) DTensors while
embeddings and norms hold 1D dp DTensors; ``torch.nn.utils.clip_grad_norm_`` stacks their norms
and fails ("All operands ... must have the same mesh"). So: one norm per (mesh, placements)
group, each reduced to a plain tensor, combined, then each group clipped with that total.
Nothing here reads the norm on the host.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor

# Reducing a 2D partial norm takes one all-reduce per mesh dim; DTensor warns about it on every
# rank. For a scalar once per step that cost is nil, so the warning is noise here.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def _group_key(grad: torch.Tensor):
    if isinstance(grad, DTensor):
        return (grad.device_mesh, tuple(grad.placements))
    return ("local", grad.device)


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip in place to ``max_norm`` (no clipping when 0); return the pre-clip total L2 norm."""
    groups: dict = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(_group_key(p.grad), []).append(p)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norms.append(norm.float())
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
