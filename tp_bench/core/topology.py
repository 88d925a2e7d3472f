"""Where the ranks run: every rank's node, and whether each TP and DP group stays inside one.

A node is named by its host name, or by ``TP_BENCH_NODE_NAME`` where several nodes share one
(containers that all call themselves the same, or two launchers on one machine standing for two
nodes). TP groups that span nodes are refused unless asked for: tensor parallelism puts a
collective in every layer, and over the inter-node network that is almost never what anyone
wants.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tp_bench.core.dims import ParallelDims
from tp_bench.core.errors import ConfigError


def node_name() -> str:
    return os.environ.get("TP_BENCH_NODE_NAME") or socket.gethostname()


@dataclass(frozen=True)
class Topology:
    nodes: tuple[str, ...]          # every rank's node, by rank

    @property
    def node_names(self) -> list[str]:
        return list(dict.fromkeys(self.nodes))

    @property
    def ranks_per_node(self) -> dict[str, int]:
        return dict(Counter(self.nodes))

    def spans_nodes(self, ranks: list[int]) -> bool:
        return len({self.nodes[r] for r in ranks}) > 1

    def groups(self, dims: ParallelDims, kind: str) -> list[list[int]]:
        """Every TP group (rows) or DP group (columns) of the mesh."""
        if kind == "tp":
            return [dims.tp_ranks(r) for r in range(0, dims.world_size, dims.tp)]
        return [dims.dp_ranks(r) for r in range(dims.tp)]

    def check_tp(self, dims: ParallelDims, allow_cross_node: bool) -> None:
        crossing = [g for g in self.groups(dims, "tp") if self.spans_nodes(g)]
        if crossing and not allow_cross_node:
            group = crossing[0]
            where = ", ".join(f"rank {r} on {self.nodes[r]}" for r in group)
            raise ConfigError(f"TP group {group} spans nodes ({where}): tensor parallelism over "
                              f"the inter-node network is almost never wanted; give each node "
                              f"a multiple of --tp_size {dims.tp} ranks or pass "
                              f"--allow_cross_node_tp")

    def record(self, dims: ParallelDims) -> dict[str, Any]:
        """The results' topology block."""
        per_node = self.ranks_per_node
        return {
            "nodes": len(per_node),
            "ranks_per_node": per_node,
            "rank_nodes": list(self.nodes),
            "tp_groups_node_local": not any(self.spans_nodes(g) for g in self.groups(dims, "tp")),
            "dp_groups_node_local": not any(self.spans_nodes(g) for g in self.groups(dims, "dp")),
        }
