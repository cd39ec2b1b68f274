"""Where the cluster's parts run when it spans several Ray nodes.

A topology names nodes (or takes every alive node of the Ray cluster) and how many prefill and
decode workers each runs. Each named node gets one KV store actor and its workers, all pinned to
it with Ray's ``NodeAffinitySchedulingStrategy`` (hard: a part never runs elsewhere, so "local"
means local); each worker reads its own node's store first. A node is found in Ray by its node id,
by a custom resource it was started with (``ray start --resources '{"box-a": 1}'``), or by its IP
address when only one node has it. No topology (the default) is the single-node cluster: one store
and workers wherever Ray puts them.

``NodeWatch`` notices a node that left the Ray cluster (its raylet died or was removed): its actors
cannot come back (pinned to a node that is gone), so the cluster forgets them.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


class TopologyError(ValueError):
    """The topology cannot be placed on this Ray cluster."""


@dataclass(frozen=True)
class NodeSpec:
    name: str  # ours: shown in status, used in worker placement and store events
    match: str = ""  # a Ray node id, a custom resource the node has, or its IP; "" = ``name``
    n_prefill: int = 0
    n_decode: int = 0


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NodeSpec, ...] = ()
    every_node: bool = False  # one store and the per-node counts on every alive Ray node
    prefill_per_node: int = 1
    decode_per_node: int = 1

    def __post_init__(self) -> None:
        if self.every_node and self.nodes:
            raise TopologyError("a topology names nodes or takes every node, not both")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise TopologyError(f"topology node names must be unique and non-empty, got {names}")
        for n in self.nodes:
            if n.n_prefill < 0 or n.n_decode < 0:
                raise TopologyError(f"node {n.name!r}: worker counts must be >= 0")
        if self.prefill_per_node < 0 or self.decode_per_node < 0:
            raise TopologyError("prefill_per_node and decode_per_node must be >= 0")

    @property
    def multi_node(self) -> bool:
        return self.every_node or bool(self.nodes)


@dataclass(frozen=True)
class PlacedNode:
    name: str
    node_id: str  # Ray's
    n_prefill: int
    n_decode: int


def resolve(topology: Topology, ray_nodes: list[dict]) -> list[PlacedNode]:
    """The topology's nodes as alive Ray nodes (``ray.nodes()``); raises naming what is missing."""
    alive = [n for n in ray_nodes if n.get("Alive")]
    if topology.every_node:
        return [PlacedNode(f"node-{i}", n["NodeID"], topology.prefill_per_node, topology.decode_per_node)
                for i, n in enumerate(sorted(alive, key=lambda n: n["NodeID"]))]
    placed, used = [], set()
    for spec in topology.nodes:
        key = spec.match or spec.name
        found = [n for n in alive if n["NodeID"] == key] or [n for n in alive if key in n.get("Resources", {})]
        if not found:
            found = [n for n in alive if n.get("NodeManagerAddress") == key]
            if len(found) > 1:
                raise TopologyError(f"topology node {spec.name!r}: {len(found)} Ray nodes have address {key}; "
                                    "match it by node id or a custom resource instead")
        if not found:
            raise TopologyError(f"topology node {spec.name!r}: no alive Ray node has id, resource or address "
                                f"{key!r} (alive: {', '.join(n['NodeID'][:12] for n in alive)})")
        node_id = found[0]["NodeID"]
        if node_id in used:
            raise TopologyError(f"topology node {spec.name!r} is the same Ray node as another one")
        used.add(node_id)
        placed.append(PlacedNode(spec.name, node_id, spec.n_prefill, spec.n_decode))
    if not any(p.n_prefill for p in placed) or not any(p.n_decode for p in placed):
        raise TopologyError("the topology needs at least one prefill and one decode worker")
    return placed


def pinned(node_id: str) -> dict:
    """Ray actor options that keep an actor on one node (and let it die with it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


class NodeWatch:
    """Calls ``on_lost(name)`` once for each watched node that is no longer alive in Ray.
    ``check`` is cheap to call often: it asks Ray at most every ``interval_s``."""

    def __init__(self, nodes: dict[str, str], on_lost: Callable[[str], None], interval_s: float = 1.0):
        self.nodes = dict(nodes)  # our name -> Ray node id
        self.on_lost, self.interval_s = on_lost, interval_s
        self.lost: set[str] = set()
        self._last = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if not self.nodes or now - self._last < self.interval_s:
            return
        self._last = now
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for name, node_id in self.nodes.items():
            if name not in self.lost and node_id not in alive:
                self.lost.add(name)
                self.on_lost(name)
