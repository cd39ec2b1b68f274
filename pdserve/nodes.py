"""The cluster's stores, one per node, and what the driver does with them (a mixin of
``pdserve.cluster.LocalCluster``).

On one node (no topology) there is one store, named ``store``, and every worker uses it. On several
Ray nodes (``pdserve.topology``) each node has its store, ``store@<node>``, pinned there with its
workers; ``node_of`` maps each worker to its node. Here:
- which store a request's KV is in (the prefill worker's node) and which another node's worker must
  read it from (the store handle travels with the call; Ray moves the bytes between nodes);
- draining every live store's events into the Conductor (each event names its node);
- carrying out the Conductor's hot-block copies (``StoreActor.replicate``, in the background);
- a lost node: its workers and store leave the supervisor and the Conductor for good, and the
  requests they served recover through the ordinary paths (``pdserve.driver``).
"""
from __future__ import annotations

from kvstore.actor import start_store
from pdserve.topology import NodeWatch, PlacedNode, pinned
from scheduler.replication import Replicate


def store_name(node: str | None) -> str:
    return "store" if node is None else f"store@{node}"


class NodeParts:
    # set by LocalCluster: stores (node -> handle; one node "" when single), node_of (worker -> node),
    # node_ids (node -> Ray node id), lost_nodes, store (the first store, single-node API)

    def _start_stores(self, placed: list[PlacedNode] | None, spec, fingerprint, layout, store_config) -> None:
        import dataclasses

        self.lost_nodes: set[str] = set()
        self.node_watch: NodeWatch | None = None
        if placed is None:
            self.node_ids: dict[str, str] = {}
            self.stores = {"": start_store(spec, fingerprint, layout, store_config)}
        else:
            self.node_ids = {p.name: p.node_id for p in placed}
            self.stores = {}
            for p in placed:  # each store's config names its node: its events say where a block is
                cfg = dataclasses.replace(store_config, node=p.name)
                self.stores[p.name] = start_store(spec, fingerprint, layout, cfg, options=pinned(p.node_id))
        self.store = next(iter(self.stores.values()))

    def _store_of(self, worker: str):
        """The store of ``worker``'s node (the only store on one node)."""
        return self.stores[self.node_of.get(worker, "")]

    def _source_for(self, reader: str, holder_worker: str | None = None, node: str | None = None):
        """The store ``reader`` must read another node's blocks from, or None when they are in its own."""
        if not self.node_of:
            return None
        node = node if node is not None else self.node_of.get(holder_worker)
        if node is None or node == self.node_of.get(reader) or node in self.lost_nodes:
            return None
        return self.stores.get(node)

    def _store_members(self) -> dict[str, object]:
        """Supervisor names of the stores: ``store`` on one node, ``store@<node>`` on several."""
        return {store_name(n or None): h for n, h in self.stores.items()}

    def _drain_store_events(self) -> None:
        for node, store in self.stores.items():
            if node in self.lost_nodes:
                continue
            try:
                events = self.ray.get(store.drain_events.remote(), timeout=self.resilience.store_timeout_s)
            except Exception:  # noqa: BLE001 - a store that does not answer has no news
                continue
            self.conductor.apply_events(events)

    # -- hot-block replication -------------------------------------------------------------------
    def _replicate(self) -> None:
        """The Conductor's copy orders, each in the background (a copy never delays a request)."""
        for order in self.conductor.take_replications():
            if order.source in self.lost_nodes or order.target in self.lost_nodes:
                continue
            self._pool.submit(self._copy, order)

    def _copy(self, order: Replicate) -> None:
        t = self.resilience.store_timeout_s
        try:
            held = self.ray.get(self.stores[order.target].replicate.remote(self.stores[order.source],
                                                                           list(order.keys), t), timeout=2 * t)
        except Exception:  # noqa: BLE001 - a copy that fails costs a later fetch, nothing else
            self.counters.add(replication_failures=1)
            return
        if held:
            self.conductor.replicated(order, list(held), order.tokens)
            self.counters.add(replications=1)

    # -- node loss -------------------------------------------------------------------------------
    def _watch_nodes(self) -> None:
        if self.node_ids:
            self.node_watch = NodeWatch(self.node_ids, self._node_lost)

    def _node_lost(self, node: str) -> None:
        """``node`` left the Ray cluster: its workers and store cannot come back (pinned there)."""
        self.lost_nodes.add(node)
        self.counters.add(nodes_lost=1)
        self.conductor.forget_node(node)
        gone = [w for w, n in self.node_of.items() if n == node] + [store_name(node)]
        self.supervisor.retire(gone)

    def node_status(self, health: dict, workers: dict) -> dict[str, dict]:
        """Per node: its state, its store's stats and its workers (``status()['nodes']``)."""
        out = {}
        for node, store in self.stores.items():
            name = node or "node-0"
            entry = {"state": "lost" if node in self.lost_nodes else "alive",
                     "ray_node_id": self.node_ids.get(node, ""),
                     "workers": [w for w in workers if self.node_of.get(w, "") == node]}
            if node not in self.lost_nodes:
                try:
                    entry["store"] = self.ray.get(store.snapshot.remote(), timeout=2.0)
                except Exception:  # noqa: BLE001
                    entry["store"] = {}
                h = health.get(store_name(node or None), {})
                entry["store"].update(state=h.get("state", "dead"), restarts=h.get("restarts", 0))
            out[name] = entry
        return out
