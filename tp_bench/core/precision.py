"""The numeric contract of a run: which dtype is computed, stored and reduced, and how.

One policy for every strategy and for the parity reference (``compute_policy``); one dtype map.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_policy(dtype: str, autocast: bool) -> str:
    """How ``--dtype`` is applied; every strategy (and the parity reference) implements the same:

    "cast"      every parameter, norms and embeddings too, is used in ``dtype`` for compute (a
                copy of the float32 master weights that the optimizer updates); the residual
                stream is in ``dtype``. DeepSpeed's bf16 mode, FSDP2's MixedPrecisionPolicy.
    "autocast"  float32 parameters; torch.autocast casts matmul inputs, while norms, embedding
                lookups and the residual stream stay float32.
    "none"      float32 throughout.

    The two mixed policies compute slightly different things (a bf16 norm weight of 1.0 moves
    only once its fp32 master has drifted half a bf16 step); runs are compared by their numeric
    contract (compute, master and reduce dtypes), and the policy is shown beside it.
    """
    if dtype == "float32":
        return "none"
    return "autocast" if autocast else "cast"


def precision_record(dtype: str, autocast: bool, param_dtype: str, mechanism: str,
                     loss_scaling: Optional[str]) -> dict[str, Any]:
    """The result's ``precision`` block, the same keys for every strategy: master weights,
    AdamW state and gradient reduction are float32 in every policy."""
    return {
        "param_dtype": param_dtype,           # what the module's parameters are stored as
        "master_weights": "float32",
        "optimizer_state_dtype": "float32",
        "compute_dtype": dtype,
        "grad_reduce_dtype": "float32",
        "policy": compute_policy(dtype, autocast),
        "mechanism": mechanism,
        "loss_scaling": loss_scaling,
    }
