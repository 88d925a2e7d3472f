"""``--norm_impl fused``: HuggingFace's RMSNorm modules computed by ``F.rms_norm``.

HuggingFace's RMSNorm is five to six kernels per call (upcast to float32, square, mean, rsqrt,
scale, downcast, weight) and keeps float32 copies of its input for backward; a Qwen3 layer has
four of them (two around the blocks, q_norm and k_norm). On CUDA ``F.rms_norm`` is one fused
kernel that computes in float32 inside and saves only its input and one float per row; it is
what torchtitan's model uses. The arithmetic is the same (float32 statistics, epsilon inside the
square root); in float32 the results agree to rounding, in bfloat16 the fused kernel rounds once
instead of twice (before and after the weight).

The swap keeps the module and its class (a subclass), so parameter names, TP plans, FSDP units
and ``isinstance`` checks are unchanged. Mixed dtypes (an autocast bfloat16 input with a float32
weight) keep HuggingFace's forward, whose output dtype follows type promotion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_bench.models.retype import is_retyped, retype


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:
        return super(type(self), self).forward(hidden_states)
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def is_hf_rms_norm(module: nn.Module) -> bool:
    """A HuggingFace RMSNorm (LlamaRMSNorm, Qwen3RMSNorm, ...): a weight and an epsilon."""
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def use_fused_rms_norm(model: nn.Module) -> int:
    """Swap every HuggingFace RMSNorm of ``model`` to the fused kernel; returns how many."""
    swapped = 0
    for module in model.modules():
        if is_retyped(module) or not is_hf_rms_norm(module):
            continue
        retype(module, "Fused", {"forward": _fused_forward})
        swapped += 1
    return swapped
