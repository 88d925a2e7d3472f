"""The parallel degrees and the device mesh: their one owner.

``ParallelDims`` is (dp, tp), validated once, with the label ``dp{D}xtp{T}`` used everywhere (log
lines, results, suite ids and groups, comparisons). Data parallelism may be hybrid (HSDP,
``dp_replicate`` R > 1): dp = R x S, parameters sharded over S ranks and replicated over R,
labelled ``dp{R}x{S}xtp{T}``. It is torch-free: the pytest plugin parses meshes at start-up in
every pytest run.

``Mesh`` is a ParallelDims placed on the process group: the ("dp", "tp") DeviceMesh with tp
innermost, so rank r sits at (r // tp, r % tp): TP groups are rows of consecutive ranks, DP groups
columns, as in the seed's picture. With HSDP the mesh is ("dp_replicate", "dp_shard", "tp"):
tp innermost, then shard, then replicate, and "dp" is the flattened pair. Each (dims, device
type) is built once per process and reused: communicators hold device memory and are never
freed before the process group is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tp_bench.core.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    dp_replicate: int = 1        # HSDP: replicas of the parameter shards (dp = replicate x shard)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def label(self) -> str:
        if self.dp_replicate > 1:
            return f"dp{self.dp_replicate}x{self.dp_shard}xtp{self.tp}"
        return f"dp{self.dp}xtp{self.tp}"

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp rank, tp rank) of a global rank."""
        return rank // self.tp, rank % self.tp

    def tp_ranks(self, rank: int) -> list[int]:
        """The global ranks of ``rank``'s TP group (its row)."""
        start = rank - rank % self.tp
        return list(range(start, start + self.tp))

    def dp_ranks(self, rank: int) -> list[int]:
        """The global ranks of ``rank``'s DP group (its column)."""
        return list(range(rank % self.tp, self.world_size, self.tp))

    @classmethod
    def resolve(cls, world_size: int, dp: int, tp: Optional[int],
                dp_replicate: int = 1) -> "ParallelDims":
        """The seed's rule: tp defaults to world / dp, and dp x tp must be the world size."""
        if dp_replicate < 1 or dp % dp_replicate:
            raise ConfigError(f"--dp_replicate {dp_replicate} must divide --dp_size {dp}")
        if dp < 1:
            raise ConfigError(f"--dp_size must be >= 1 (got {dp})")
        if tp is None:
            if world_size % dp:
                raise ConfigError(f"world size {world_size} is not divisible by --dp_size {dp}")
            tp = world_size // dp
        if tp < 1:
            raise ConfigError(f"--tp_size must be >= 1 (got {tp})")
        if dp * tp != world_size:
            raise ConfigError(f"dp_size * tp_size must equal the world size: {dp} * {tp} = "
                              f"{dp * tp}, but {world_size} processes were launched")
        return cls(dp, tp, dp_replicate)

    @classmethod
    def parse(cls, text: str) -> "ParallelDims":
        """``2x4`` or ``dp2xtp4`` -> dp 2, tp 4."""
        cleaned = text.lower().replace("dp", "").replace("tp", "")
        try:
            dp, tp = (int(v) for v in cleaned.split("x"))
        except ValueError:
            raise ValueError(f"mesh {text!r}: expected DPxTP, e.g. 2x4") from None
        if dp < 1 or tp < 1:
            raise ValueError(f"mesh {text!r}: sizes must be >= 1")
        return cls(dp, tp)

    @classmethod
    def factorizations(cls, world_size: int) -> list["ParallelDims"]:
        """Every (dp, tp) with dp x tp = world size, dp ascending."""
        return [cls(dp, world_size // dp) for dp in range(1, world_size + 1)
                if world_size % dp == 0]

    def check_heads(self, model_name: str, num_attention_heads: int,
                    num_key_value_heads: int) -> None:
        """Attention heads are split over tp: both head counts must divide by it."""
        for what, heads in (("num_attention_heads", num_attention_heads),
                            ("num_key_value_heads", num_key_value_heads)):
            if heads % self.tp:
                raise ConfigError(f"{model_name}: {what} = {heads} is not divisible by "
                                  f"tp_size = {self.tp}")


class Mesh:
    """This rank's place in a ParallelDims: coordinates, the DeviceMesh and its groups."""

    def __init__(self, dims: ParallelDims, rank: int, device_mesh: Any):
        self.dims = dims
        self.rank = rank
        self.dp_rank, self.tp_rank = dims.coords(rank)
        self.device_mesh = device_mesh           # DeviceMesh ("dp", "tp")

    @property
    def tp_mesh(self) -> Any:
        return self.device_mesh["tp"]

    @property
    def dp_mesh(self) -> Any:
        """Every data-parallel rank of this tp position (the batch and the loss's dp mean)."""
        return self.device_mesh["dp"]

    @property
    def fsdp_mesh(self) -> Any:
        """What FSDP2 shards over: the dp mesh, or (replicate, shard) for HSDP."""
        if self.dims.dp_replicate > 1:
            return self.device_mesh["dp_replicate", "dp_shard"]
        return self.dp_mesh

    @property
    def tp_group(self) -> Any:
        return self.tp_mesh.get_group()

    @property
    def dp_group(self) -> Any:
        return self.dp_mesh.get_group()


_DEVICE_MESHES: dict[tuple[ParallelDims, str], Any] = {}


def build_mesh(dims: ParallelDims, rank: int, device_type: str) -> Mesh:
    """The Mesh of ``dims`` on the default process group (built once per process)."""
    key = (dims, device_type)
    if key not in _DEVICE_MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        if dims.dp_replicate > 1:
            mesh = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard, dims.tp),
                                    mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
            mesh["dp_replicate", "dp_shard"]._flatten("dp")
        else:
            mesh = init_device_mesh(device_type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
        _DEVICE_MESHES[key] = mesh
    return Mesh(dims, rank, _DEVICE_MESHES[key])


def forget_meshes() -> None:
    """Drop the cached meshes (their process group is being destroyed)."""
    _DEVICE_MESHES.clear()
