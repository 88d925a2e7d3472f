"""Importing torchtitan (the release this stack is written against) with only what its dense
models and their parallelization need.

torchtitan 0.3.0 imports two things at module level that the dense Qwen3 / Llama3 path never
uses, and that a machine may lack:

- ``torch.distributed.fsdp.DataParallelMeshDims`` (torch >= 2.12): only passed to
  ``fully_shard`` under the "full_dtensor" and "spmd_types" SPMD backends. This stack pins
  "partial_dtensor", which never passes it, so on an older torch a placeholder stands in.
- triton: imported (and ``@triton.jit`` applied) by the MoE expert-parallel token dispatcher's
  kernels. A CUDA build of torch brings triton along; a CPU-only machine has none, and a large
  binary wheel would be installed only to be imported. Where triton is absent, that one module
  is replaced by one whose functions raise if a MoE model ever calls them.

Nothing is patched where the real thing exists.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from typing import Any, Optional

from tp_bench.core.errors import ConfigError

SUPPORTED_VERSION = "0.3.0"
INSTALL = ("bash scripts/install.sh, or pip install 'tp_bench[torchtitan]' and "
           f"pip install --no-deps torchtitan=={SUPPORTED_VERSION}")
_EP_KERNELS = "torchtitan.distributed.minimal_async_ep"


def version() -> Optional[str]:
    try:
        return importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        return None


def import_torchtitan() -> None:
    """Import the parts of torchtitan this stack uses; ConfigError (what to install) if that
    cannot work here."""
    found = version()
    if found is None:
        raise ConfigError(f"--impl torchtitan needs torchtitan {SUPPORTED_VERSION}, which is "
                          f"not installed: {INSTALL}")
    if found.split(".")[:2] != SUPPORTED_VERSION.split(".")[:2]:
        raise ConfigError(f"--impl torchtitan is written against torchtitan "
                          f"{SUPPORTED_VERSION}; torchtitan {found} is installed (its model and "
                          f"parallelization API changes between releases): {INSTALL}")
    _placeholder_mesh_dims()
    _placeholder_ep_kernels()
    try:
        for module in ("torchtitan.models.qwen3", "torchtitan.models.llama3",
                       "torchtitan.components.loss"):
            importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"--impl torchtitan: torchtitan {found} cannot be imported here "
                          f"({exc}); {INSTALL}") from exc


def _placeholder_mesh_dims() -> None:
    import torch.distributed.fsdp as fsdp

    if hasattr(fsdp, "DataParallelMeshDims"):
        return

    @dataclasses.dataclass(frozen=True)
    class DataParallelMeshDims:
        """Stands in for torch >= 2.12's class; never reaches ``fully_shard`` here."""

        shard: Any = None
        replicate: Any = None

    fsdp.DataParallelMeshDims = DataParallelMeshDims


def _placeholder_ep_kernels() -> None:
    if importlib.util.find_spec("triton") is not None or _EP_KERNELS in sys.modules:
        return

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torchtitan's MoE expert-parallel kernels need triton, which is "
                           "not installed")

    module = types.ModuleType(_EP_KERNELS, "Placeholder: MoE expert-parallel kernels (triton).")
    for name in ("combine_op", "dispatch_op", "init_buffer",
                 "maybe_update_minimal_async_ep_config"):
        setattr(module, name, unavailable)
    module.MinimalAsyncEPDispatchMetadata = type("MinimalAsyncEPDispatchMetadata", (), {})
    sys.modules[_EP_KERNELS] = module
