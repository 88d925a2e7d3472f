"""(dp, tp) mesh shapes as the suite names and selects them (torch-free: the pytest plugin
parses --tp-bench-mesh at start-up, in every pytest run)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeshShape:
    dp: int
    tp: int

    @property
    def id(self) -> str:
        return f"dp{self.dp}-tp{self.tp}"

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        """``2x4`` -> dp 2, tp 4."""
        try:
            dp, tp = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"mesh {text!r}: expected DPxTP, e.g. 2x4") from None
        if dp < 1 or tp < 1:
            raise ValueError(f"mesh {text!r}: sizes must be >= 1")
        return cls(dp, tp)


def mesh_shapes(world_size: int) -> list[MeshShape]:
    """Every (dp, tp) with dp x tp = world size, dp ascending."""
    return [MeshShape(dp, world_size // dp) for dp in range(1, world_size + 1)
            if world_size % dp == 0]
